"""The default channel-propagating generator: a depth-change handler for every common op.

Registered through the ``dnnshrink`` entry point ``generators``. Its hook runs last
(``trylast``), so a third party's handler for the same op wins.
"""
from __future__ import annotations

from typing import Any, Optional

from dnnshrink_core.plugin_api import hookimpl, OpHandler

from .registry import handler_for


@hookimpl(trylast=True)
def dnnshrink_op_handler(node: Any, module: Optional[Any]) -> Optional[OpHandler]:
    """Answer with the default handler for ``node`` when there is one."""
    return handler_for(node, module)
