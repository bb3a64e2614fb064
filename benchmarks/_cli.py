"""The command-line shape every benchmark shares: parse, measure, print tables or JSON."""

from __future__ import annotations

import json
from collections.abc import Callable


def run(parse_args: Callable, measure: Callable, print_tables: Callable, argv=None) -> None:
    """``measure(parse_args(argv))``, then ``--json`` prints the result dict, else tables."""
    args = parse_args(argv)
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)
