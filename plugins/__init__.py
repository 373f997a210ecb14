"""dnnshrink's default plugins, imported as ``dnnshrink_plugins``.

Each subpackage is registered through the ``dnnshrink`` entry-point group, exactly like
a third party's plugin; the core never imports them by name.
"""
