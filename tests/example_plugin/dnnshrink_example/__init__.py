"""A third-party dnnshrink plugin (the worked example of docs/plugins.md)."""
