"""TensorRT service: ``python -m services.tensorrt --model-repository DIR``.

Refuses to start (exit code 2, before any port is bound) when tensorrt cannot be imported or no
CUDA GPU is found.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from services.tensorrt.device import service_problem

    problem = service_problem()
    if problem is not None:
        print(f"cannot start: {problem}", file=sys.stderr)
        return 2
    from services.core.server import run_service
    from services.tensorrt.runtime import TensorrtRuntime

    return run_service(
        [TensorrtRuntime], argv, prog="python -m services.tensorrt", family="tensorrt"
    )


if __name__ == "__main__":
    sys.exit(main())
