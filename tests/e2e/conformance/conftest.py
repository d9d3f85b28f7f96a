"""The one mesh of the conformance package: every available family's add/sub and identity
models (and its stateful accumulator and ragged-batching model, where it has them), plus a copy of the add/sub model with
the response cache on (``<model>_cached``), from one repository; explicit model control, all
loaded at start; every service with a response cache. Package-scoped, so the test modules here
share a single mesh start. The families in ``ON_GPU`` (families.py) get KIND_GPU instances."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.conformance.families import AVAILABLE, ON_GPU, cached_model
from tests.e2e.conftest import MeshHandle, add_cached_copy, running_mesh, use_gpu


@pytest.fixture(scope="package")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    root = tmp_path_factory.mktemp("conformance")
    repo = root / "models"
    repo.mkdir()
    for family in AVAILABLE:
        module = importlib.import_module(family.builder[0])
        build: Callable[..., None] = getattr(module, family.builder[1])
        models = [family.model, family.identity, *filter(None, [family.sequence, family.ragged])]
        build(repo, models)
        add_cached_copy(repo, family.model, cached_model(family.model))
        if family.name in ON_GPU:
            use_gpu(repo, [*models, cached_model(family.model)])
    with running_mesh(
        repo, root, "explicit", load_models=("*",), cache_config=("local,size=1048576",)
    ) as handle:
        yield handle
