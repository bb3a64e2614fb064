"""JSON parsed without a traceback for any input: the one parser of every JSON file featcache and
stitchtrain read back (store metadata and markers, dataset annotations, run-dir records).

Python's parser recurses once per nesting level, so a document nested deeper than the
interpreter's recursion limit (``"[" * 200_000``) raises ``RecursionError``, not
``JSONDecodeError``; ``parse_json`` makes it a ``ValueError`` like any other invalid JSON (bad
syntax, bad UTF-8: ``JSONDecodeError`` and ``UnicodeDecodeError`` are ``ValueError``s), so each
caller's one refusal covers every malformed file.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["parse_json"]


def parse_json(text: str | bytes) -> Any:
    """``json.loads(text)``; any invalid document, nested too deeply included, is a
    ``ValueError``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(
            "JSON nested too deeply for the parser to follow (RecursionError)"
        ) from None
