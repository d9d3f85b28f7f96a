"""The command line every example builder shares: ``python -m examples.build_<family> DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def builder_parser(prog: str, description: str, names: Iterable[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("root", type=Path, help="repository directory (created if missing)")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        choices=sorted(names),
        help="build only this model (repeatable); default: all",
    )
    return parser


def builder_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    names: Iterable[str],
    build: Callable[[Path, list[str] | None], None],
    label: str,
) -> int:
    """Parse, build the chosen models (all by default), say what was built."""
    names = list(names)
    args = builder_parser(prog, description, names).parse_args(argv)
    build(args.root, args.models)
    print(f"{label} ready at {args.root}: {', '.join(args.models or names)}")
    return 0
