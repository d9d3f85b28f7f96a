"""TensorFlow service: ``python -m services.tensorflow --model-repository DIR``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from services.tensorflow.graphdef import TensorflowGraphdefRuntime
        from services.tensorflow.runtime import TensorflowRuntime
    except ImportError as exc:
        print(
            f"tensorflow is not installed ({exc}); install the extra: pip install '.[tensorflow]'",
            file=sys.stderr,
        )
        return 2
    from services.core.server import run_service

    return run_service(
        [TensorflowRuntime, TensorflowGraphdefRuntime],
        argv,
        prog="python -m services.tensorflow",
        family="tensorflow",
    )


if __name__ == "__main__":
    sys.exit(main())
