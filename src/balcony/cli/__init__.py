"""`balcony VERB`: the command line. `cli.parser` builds the parser, `cli.commands` does each verb."""

from __future__ import annotations

import sys

from ..core.errors import BalconyError
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) is not None and getattr(args, "max_new_tokens", 1) < 1:
        print("balcony: error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (BalconyError, FileNotFoundError) as err:
        print(f"balcony: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
