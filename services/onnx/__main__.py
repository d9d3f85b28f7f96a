"""ONNX Runtime service: ``python -m services.onnx --model-repository DIR``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from services.onnx.runtime import OnnxRuntime
    except ImportError as exc:
        print(
            f"onnxruntime is not installed ({exc}); install the extra: pip install '.[onnx]'",
            file=sys.stderr,
        )
        return 2
    from services.core.server import run_service

    return run_service([OnnxRuntime], argv, prog="python -m services.onnx", family="onnx")


if __name__ == "__main__":
    sys.exit(main())
