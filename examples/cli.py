"""The command line every example builder shares: ``python -m examples.build_<family> DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

#: every Triton datatype, in the protocol's order (the dtypes_* identity examples use them)
TRITON_DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)


def config_type(datatype: str) -> str:
    """The config enum name of a Triton datatype (BYTES → TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def write_if_changed(path: Path, data: bytes | str) -> None:
    """Write atomically, and only when the content differs (rebuilds stay cheap, mtimes stable)."""
    raw = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.read_bytes() == raw:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)


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
