"""Ensemble service: ``python -m services.ensemble --model-repository DIR``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Serve every ``platform: "ensemble"`` model of the repository."""
    from services.core.server import run_service
    from services.ensemble.runtime import EnsembleRuntime

    return run_service(
        [EnsembleRuntime], argv, prog="python -m services.ensemble", family="ensemble"
    )


if __name__ == "__main__":
    sys.exit(main())
