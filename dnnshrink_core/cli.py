"""The ``dnnshrink`` command line (also ``python -m dnnshrink_core``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__
from .errors import DnnshrinkError
from .plugins import blocked_plugins, get_plugin_manager, list_plugins


def _cmd_plugins(args: argparse.Namespace) -> int:
    pm = get_plugin_manager(blocked=args.block) if args.block else get_plugin_manager()
    infos = list_plugins(pm)
    rows = [("plugin", "from", "hooks")] + [(i.name, i.distribution, ", ".join(i.hooks)) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    blocked = blocked_plugins(pm)
    if blocked:
        print("blocked: " + ", ".join(blocked))
    if not infos:
        print("no plugins loaded: install dnnshrink (`pip install -e .`) so its entry points are registered")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dnnshrink`` command."""
    parser = argparse.ArgumentParser(prog="dnnshrink", description="Make trained PyTorch networks physically smaller.")
    parser.add_argument("--version", action="version", version=f"dnnshrink {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list the loaded plugins and the hooks each implements")
    plugins.add_argument("--block", action="append", default=[], metavar="NAME",
                         help="do not load plugin NAME (repeatable; DNNSHRINK_BLOCK_PLUGINS works too)")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except DnnshrinkError as exc:
        if args.debug:
            raise
        print(f"dnnshrink: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
