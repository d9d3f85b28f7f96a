"""PyTorch service: ``python -m services.torch --model-repository DIR``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from services.core.allocator import tune_for_tensors

    tune_for_tensors()  # before any thread exists: torch's tensors come from malloc
    try:
        from services.torch.runtime import TorchRuntime
    except ImportError as exc:
        print(
            f"torch is not installed ({exc}); install the extra: pip install '.[torch]'",
            file=sys.stderr,
        )
        return 2
    from services.core.server import run_service

    return run_service([TorchRuntime], argv, prog="python -m services.torch", family="torch")


if __name__ == "__main__":
    sys.exit(main())
