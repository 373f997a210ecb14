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


# kind → (the hook that gives the plugin by name, the hook that lists the names, the keyword
# the lookup hook takes, where dnnshrink's own ones come from)
LOOKUPS = {
    "algorithm": ("dnnshrink_algorithm", "dnnshrink_algorithm_names", "name", "morphnet"),
    "cost model": ("dnnshrink_cost_model", "dnnshrink_cost_model_names", "name", "costs"),
    "exporter": ("dnnshrink_exporter", "dnnshrink_export_formats", "fmt", "exporters"),
    "mask extractor": ("dnnshrink_mask_extractor", "dnnshrink_mask_extractor_names", "name", "morphnet"),
    "regularizer": ("dnnshrink_regularizer", "dnnshrink_regularizer_names", "name", "morphnet"),
}


def plugin_names(kind: str) -> List[str]:
    """The names the loaded plugins give for ``kind`` (a key of :data:`LOOKUPS`), sorted."""
    _, names_hook, _, _ = LOOKUPS[kind]
    return sorted({n for names in getattr(get_plugin_manager().hook, names_hook)() for n in names})


def lookup(kind: str, name: str) -> object:
    """The loaded plugin object of ``kind`` called ``name``; otherwise a :class:`PluginError`
    that lists the loaded names and says where dnnshrink's own ones come from."""
    from .errors import PluginError

    hook, _, keyword, home = LOOKUPS[kind]
    found = getattr(get_plugin_manager().hook, hook)(**{keyword: name})
    if found is None:
        known = ", ".join(plugin_names(kind)) or "none"
        raise PluginError(f"no {kind} called {name!r} is loaded; choose one of: {known} (dnnshrink's own come with "
                          f"its `{home}` plugin; `dnnshrink plugins` lists what is loaded)")
    return found
