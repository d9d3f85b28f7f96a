"""Python-backend service: ``python -m services.python --model-repository DIR``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Serve every ``backend: "python"`` model of the repository."""
    from services.core.allocator import tune_for_tensors

    tune_for_tensors()  # before any thread exists: torch's tensors come from malloc
    from services.core.server import run_service
    from services.python.runtime import PythonRuntime

    return run_service([PythonRuntime], argv, prog="python -m services.python", family="python")


if __name__ == "__main__":
    sys.exit(main())
