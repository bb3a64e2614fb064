"""The tool version, recorded in every store's attributes (``tool_version``) and printed by
``--version``; its own module so that the store can read it without the package's API."""

__version__ = "0.1.0"
