"""The plugin manager: loads plugins from the ``dnnshrink`` entry-point group.

The core never imports a default plugin by name; it asks the hooks. Plugins can be
blocked by name, with :func:`get_plugin_manager` ``(blocked=[...])`` or the
``DNNSHRINK_BLOCK_PLUGINS`` environment variable (comma separated).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import pluggy

from . import hookspecs

PROJECT = "dnnshrink"
ENTRY_POINT_GROUP = "dnnshrink"
BLOCK_ENV = "DNNSHRINK_BLOCK_PLUGINS"

hookimpl = pluggy.HookimplMarker(PROJECT)

_lock = threading.Lock()
_manager: Optional[pluggy.PluginManager] = None


def _blocked_from_env() -> List[str]:
    return [name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()]


def _new_manager(blocked: Iterable[str]) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def get_plugin_manager(blocked: Optional[Sequence[str]] = None) -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading the entry points on first use.

    Passing ``blocked`` (plugin names as listed by ``dnnshrink plugins``) builds a new
    manager without them; the names in ``DNNSHRINK_BLOCK_PLUGINS`` are always blocked.
    Register a plugin at run time with ``get_plugin_manager().register(obj)``.
    """
    global _manager
    with _lock:
        if _manager is None or blocked is not None:
            _manager = _new_manager(list(blocked or ()) + _blocked_from_env())
        return _manager


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its name, where it comes from, and the hooks it implements."""

    name: str
    distribution: str
    hooks: tuple


def list_plugins(pm: Optional[pluggy.PluginManager] = None) -> List[PluginInfo]:
    """Describe every plugin registered with ``pm`` (default: the process-wide manager)."""
    pm = pm or get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # a blocked name
            continue
        dist = dists.get(id(plugin))
        origin = f"{dist.project_name} {dist.version}" if dist is not None else "registered at run time"
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name=name, distribution=origin, hooks=hooks))
    return sorted(infos, key=lambda info: info.name)


def blocked_plugins(pm: Optional[pluggy.PluginManager] = None) -> List[str]:
    """Names blocked in ``pm`` (default: the process-wide manager)."""
    pm = pm or get_plugin_manager()
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is None)
