"""The ensemble service over a repository of ensembles, and the service that runs their steps.

Here one service with the ONNX and Python families stands in for the gateway
(``MESHSERVE_GATEWAY`` names its gRPC port): it answers ModelInfer and ModelStreamInfer for its
models exactly as the gateway would route them. Ensembles whose steps
span families, nested ensembles and cancellation through Envoy are in tests/e2e.
The services are package-scoped: started once for the package's test modules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.support import ServerThread, settings_for

CHAIN = """name: "chain"
platform: "ensemble"
max_batch_size: 8
input [
  { name: "A" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "B" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "TWICE_A" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "TWICE_B" data_type: TYPE_INT32 dims: [ 16 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "simple"
      model_version: -1
      input_map { key: "INPUT0" value: "A" }
      input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "SUM" }
      output_map { key: "OUTPUT1" value: "DIFF" }
    },
    {
      model_name: "simple"
      model_version: -1
      input_map { key: "INPUT0" value: "SUM" }
      input_map { key: "INPUT1" value: "DIFF" }
      output_map { key: "OUTPUT0" value: "TWICE_A" }
      output_map { key: "OUTPUT1" value: "TWICE_B" }
    }
  ]
}
"""

# Two branches from the same inputs: one adds, the other runs on swapped inputs.
FORK = """name: "fork"
platform: "ensemble"
max_batch_size: 8
input [
  { name: "A" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "B" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "A_MINUS_B" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "B_MINUS_A" data_type: TYPE_INT32 dims: [ 16 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "simple"
      input_map { key: "INPUT0" value: "A" }
      input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT1" value: "A_MINUS_B" }
    },
    {
      model_name: "simple"
      input_map { key: "INPUT0" value: "B" }
      input_map { key: "INPUT1" value: "A" }
      output_map { key: "OUTPUT1" value: "B_MINUS_A" }
    }
  ]
}
"""

# Loads (the model exists) but its step asks for a version the ONNX service does not have.
MISSING_VERSION = CHAIN.replace('"chain"', '"missing_version"').replace(
    'model_version: -1\n      input_map { key: "INPUT0" value: "SUM" }',
    'model_version: 7\n      input_map { key: "INPUT0" value: "SUM" }',
)

# Fails to load: step 1 reads a tensor nobody writes.
UNMAPPED = CHAIN.replace('"chain"', '"unmapped"').replace(
    'input_map { key: "INPUT1" value: "DIFF" }', 'input_map { key: "INPUT1" value: "NOPE" }'
)


# Fails to load: an unknown step_routing parameter.
BAD_ROUTING = CHAIN.replace('"chain"', '"bad_routing"') + (
    'parameters { key: "step_routing" value: { string_value: "carrier_pigeon" } }\n'
)


def _write_decoupled_models(root: Path) -> None:
    """``repeat_then_simple`` (examples/build_ensemble.py) and its steps, and a slow copy
    (``slow_repeat_then_simple``: a response every 200 ms) for cancellation."""
    from examples.build_ensemble import ENSEMBLES
    from examples.build_python import build_python_repository

    build_python_repository(root, ["repeat_count_python"])
    example = ENSEMBLES["repeat_then_simple"].config()
    _write_ensemble(root, example)
    slow = root / "slow_repeat_count_python"
    (slow / "1").mkdir(parents=True)
    (slow / "1" / "model.py").write_text(
        (root / "repeat_count_python" / "1" / "model.py").read_text()
    )
    (slow / "config.pbtxt").write_text(
        (root / "repeat_count_python" / "config.pbtxt")
        .read_text()
        .replace('"repeat_count_python"', '"slow_repeat_count_python"')
        .replace('string_value: "0"', 'string_value: "200"')
    )
    _write_ensemble(
        root,
        example.replace('"repeat_then_simple"', '"slow_repeat_then_simple"').replace(
            '"repeat_count_python"', '"slow_repeat_count_python"'
        ),
    )


def _write_ensemble(root: Path, text: str) -> None:
    name = text.split('"')[1]
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(text)


@pytest.fixture(scope="package")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerThread, Path, ServerThread]]:
    from examples.build_repository import build_repository
    from services.ensemble.runtime import EnsembleRuntime
    from services.onnx.runtime import OnnxRuntime
    from services.python.runtime import PythonRuntime

    root = tmp_path_factory.mktemp("ensemble_models")
    build_repository(root, ["simple"])
    for text in (CHAIN, FORK, MISSING_VERSION, UNMAPPED, BAD_ROUTING):
        _write_ensemble(root, text)
    _write_decoupled_models(root)
    onnx = ServerThread(settings_for(root), [OnnxRuntime, PythonRuntime]).start()
    saved = os.environ.get("MESHSERVE_GATEWAY")
    os.environ["MESHSERVE_GATEWAY"] = onnx.grpc_url
    try:
        ensemble = ServerThread(settings_for(root), [EnsembleRuntime]).start()
    except BaseException:
        onnx.stop()
        raise
    finally:
        if saved is None:
            os.environ.pop("MESHSERVE_GATEWAY", None)
        else:
            os.environ["MESHSERVE_GATEWAY"] = saved
    try:
        yield ensemble, root, onnx
    finally:
        ensemble.stop()
        onnx.stop()


@pytest.fixture
def client(
    servers: tuple[ServerThread, Path, ServerThread],
) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(servers[0].grpc_url) as c:
        yield c
