"""Conformance: every framework family passes the same tests through the gateway.

One mesh serves an add/sub model and an identity model of each family from one repository; each
test runs once per family. A new family joins by adding a ``Family`` entry to FAMILIES (its
example builder, its add/sub model and tensor names, its identity model and the datatypes it
carries). Covered per family: metadata and config, inference over gRPC and HTTP, batching (where
the model batches), bad input (wrong datatype, wrong shape) with the server still serving,
statistics, metrics, explicit unload/load through the gateway, and every datatype the framework
supports: for each (family, datatype) one gRPC and one HTTP request to the identity model
(``IN_<DTYPE>`` → ``OUT_<DTYPE>``, batch of 2, tests/datatype_samples.py's edge values: extremes,
-0.0, infinities, NaN with a payload, subnormals, empty / NUL / non-UTF-8 bytes) must give the
values back bit for bit. HTTP sends the tested tensor as JSON where JSON holds it exactly
(BOOL, integers, UTF-8 BYTES) and with the binary extension otherwise.

Datatypes per family (✓ carried exactly through the gateway; ✗ refused at model load):

| family     | BOOL, (U)INT8-64, FP16/32/64 | BF16 | BYTES |
|------------|------------------------------|------|-------|
| onnx       | ✓ | ✗ onnxruntime's Python API has no bfloat16 numpy type | ✓ UTF-8 only (ONNX strings are text; other bytes: INVALID_ARGUMENT) |
| torch      | ✓ (UINT16/32/64: torch's limited-op dtypes, carried as is) | ✓ | ✗ no torch tensor type |
| tensorflow | ✓ | ✓ (tf.bfloat16) | ✓ any bytes (tf.string) |
| python     | ✓ | ✓ (numpy "V2" raw bits) | ✓ any bytes |
"""

from __future__ import annotations

import importlib.util
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.datatype_samples import (
    ALL_DATATYPES,
    assert_identical,
    edge_values,
    json_safe,
)
from tests.e2e.conftest import MeshHandle, running_mesh, wait_for


@dataclass(frozen=True)
class Family:
    name: str
    #: the module that builds its examples, and the function in it
    builder: tuple[str, str]
    model: str
    datatype: str
    inputs: tuple[str, str]
    outputs: tuple[str, str]
    #: per-request shape without the batch dimension
    dims: tuple[int, ...]
    batched: bool
    #: framework module that must be importable for the family to run
    needs: str
    #: its identity model (IN_<DTYPE> → OUT_<DTYPE>, dims [-1], batched) and the datatypes it
    #: carries: every datatype the family can exchange
    identity: str
    datatypes: tuple[str, ...]
    #: BYTES are UTF-8 text in this framework: other bytes are refused with INVALID_ARGUMENT
    utf8_bytes_only: bool = False

    def arrays(self, value: int) -> tuple[np.ndarray, np.ndarray]:
        dtype = {"INT32": np.int32, "FP32": np.float32}[self.datatype]
        shape = (1, *self.dims) if self.batched else self.dims
        a = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
        return a, np.full(shape, value, dtype=dtype)


FAMILIES = [
    Family(
        "onnx",
        ("examples.build_repository", "build_repository"),
        "simple",
        "INT32",
        ("INPUT0", "INPUT1"),
        ("OUTPUT0", "OUTPUT1"),
        (16,),
        True,
        "onnxruntime",
        identity="dtypes_onnx",
        datatypes=tuple(d for d in ALL_DATATYPES if d != "BF16"),
        utf8_bytes_only=True,
    ),
    Family(
        "torch",
        ("examples.build_torch", "build_torch_repository"),
        "simple_torch",
        "INT32",
        ("INPUT__0", "INPUT__1"),
        ("OUTPUT__0", "OUTPUT__1"),
        (16,),
        True,
        "torch",
        identity="dtypes_torch",
        datatypes=tuple(d for d in ALL_DATATYPES if d != "BYTES"),
    ),
    Family(
        "tensorflow",
        ("examples.build_tensorflow", "build_tensorflow_repository"),
        "simple_tf",
        "INT32",
        ("INPUT0", "INPUT1"),
        ("OUTPUT0", "OUTPUT1"),
        (16,),
        True,
        "tensorflow",
        identity="dtypes_tf",
        datatypes=ALL_DATATYPES,
    ),
    Family(
        "python",
        ("examples.build_python", "build_python_repository"),
        "add_sub_python",
        "FP32",
        ("INPUT0", "INPUT1"),
        ("OUTPUT0", "OUTPUT1"),
        (4,),
        False,
        "numpy",
        identity="dtypes_python",
        datatypes=ALL_DATATYPES,
    ),
]
AVAILABLE = [f for f in FAMILIES if importlib.util.find_spec(f.needs) is not None]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    root = tmp_path_factory.mktemp("conformance")
    repo = root / "models"
    repo.mkdir()
    for family in AVAILABLE:
        module = importlib.import_module(family.builder[0])
        build: Callable[..., None] = getattr(module, family.builder[1])
        build(repo, [family.model, family.identity])
    with running_mesh(repo, root, "explicit", load_models=("*",)) as handle:
        yield handle


def family_param() -> list[object]:
    return [pytest.param(f, id=f.name) for f in FAMILIES]


def need(family: Family) -> None:
    if family not in AVAILABLE:
        pytest.skip(f"{family.name}: {family.needs} is not installed")


def grpc_inputs(
    family: Family, value: int
) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    a, b = family.arrays(value)
    ins = [grpcclient.InferInput(n, list(a.shape), family.datatype) for n in family.inputs]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return ins, a + b, a - b


@pytest.mark.parametrize("family", family_param())
def test_metadata_and_config(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    h = httpclient.InferenceServerClient(mesh.http_url)
    try:
        batch = [-1] if family.batched else []
        meta = c.get_model_metadata(family.model, as_json=True)
        assert [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]
        ] == [(n, family.datatype, [*batch, *family.dims]) for n in family.inputs]
        assert {t["name"] for t in h.get_model_metadata(family.model)["outputs"]} == set(
            family.outputs
        )
        config = h.get_model_config(family.model)
        assert config["name"] == family.model
        assert (config["max_batch_size"] > 0) == family.batched
        assert c.is_model_ready(family.model) and h.is_model_ready(family.model)
    finally:
        c.close()
        h.close()


@pytest.mark.parametrize("family", family_param())
def test_infer_over_grpc_and_http(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    h = httpclient.InferenceServerClient(mesh.http_url)
    try:
        ins, total, diff = grpc_inputs(family, 3)
        r = c.infer(family.model, ins)
        np.testing.assert_array_equal(r.as_numpy(family.outputs[0]), total)
        np.testing.assert_array_equal(r.as_numpy(family.outputs[1]), diff)
        a, b = family.arrays(5)
        hins = [httpclient.InferInput(n, list(a.shape), family.datatype) for n in family.inputs]
        hins[0].set_data_from_numpy(a, binary_data=True)
        hins[1].set_data_from_numpy(b, binary_data=False)
        hr = h.infer(family.model, hins)
        np.testing.assert_array_equal(hr.as_numpy(family.outputs[0]), a + b)
    finally:
        c.close()
        h.close()


def datatype_params() -> list[object]:
    return [
        pytest.param(f, d, id=f"{f.name}-{d}")
        for f in FAMILIES
        for d in ALL_DATATYPES
        if d in f.datatypes
    ]


def identity_samples(family: Family) -> dict[str, np.ndarray]:
    """Edge values for every input of the family's identity model (shape [2, 4] each)."""
    return {d: edge_values(d, utf8_only=family.utf8_bytes_only) for d in family.datatypes}


@pytest.mark.parametrize("family", family_param())
def test_identity_model_declares_every_datatype(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        meta = c.get_model_metadata(family.identity, as_json=True)
        for kind, prefix in (("inputs", "IN"), ("outputs", "OUT")):
            assert [
                (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[kind]
            ] == [(f"{prefix}_{d}", d, [-1, -1]) for d in family.datatypes]
    finally:
        c.close()


@pytest.mark.parametrize(("family", "datatype"), datatype_params())
def test_every_datatype_round_trips_exactly(
    mesh: MeshHandle, family: Family, datatype: str
) -> None:
    """Every input of the identity model carries edge values; the one output asked for must come
    back bit for bit, over gRPC and over HTTP (JSON for this datatype where JSON can hold the
    values exactly, the binary extension otherwise)."""
    need(family)
    sent = identity_samples(family)
    wanted = f"OUT_{datatype}"
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    h = httpclient.InferenceServerClient(mesh.http_url)
    try:
        ins = [grpcclient.InferInput(f"IN_{d}", list(a.shape), d) for d, a in sent.items()]
        for i, a in zip(ins, sent.values(), strict=True):
            i.set_data_from_numpy(a)
        r = c.infer(family.identity, ins, outputs=[grpcclient.InferRequestedOutput(wanted)])
        assert_identical(r.as_numpy(wanted), sent[datatype], datatype)

        json_out = json_safe(datatype, sent[datatype])
        json_in = json_out
        hins = [httpclient.InferInput(f"IN_{d}", list(a.shape), d) for d, a in sent.items()]
        for i, (d, a) in zip(hins, sent.items(), strict=True):
            i.set_data_from_numpy(a, binary_data=not (json_in and d == datatype))
        out = httpclient.InferRequestedOutput(wanted, binary_data=not json_out)
        got = h.infer(family.identity, hins, outputs=[out]).as_numpy(wanted)
        if json_out and datatype == "BYTES":  # JSON strings come back as str
            got = np.array([v.encode() for v in got.flat], dtype=object).reshape(got.shape)
        assert_identical(got, sent[datatype], datatype)
    finally:
        c.close()
        h.close()


@pytest.mark.parametrize(
    "family", [pytest.param(f, id=f.name) for f in FAMILIES if f.utf8_bytes_only]
)
def test_non_utf8_bytes_are_refused_where_bytes_are_text(mesh: MeshHandle, family: Family) -> None:
    need(family)
    sent = identity_samples(family)
    sent["BYTES"] = edge_values("BYTES")
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        ins = [grpcclient.InferInput(f"IN_{d}", list(a.shape), d) for d, a in sent.items()]
        for i, a in zip(ins, sent.values(), strict=True):
            i.set_data_from_numpy(a)
        with pytest.raises(InferenceServerException) as info:
            c.infer(family.identity, ins)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "IN_BYTES" in info.value.message() and "UTF-8" in info.value.message()
    finally:
        c.close()


@pytest.mark.parametrize("family", family_param())
def test_concurrent_requests_are_batched(mesh: MeshHandle, family: Family) -> None:
    need(family)
    if not family.batched:
        pytest.skip(f"{family.model} has max_batch_size 0: its requests run one by one")
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        before = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        errors: list[BaseException] = []

        def caller() -> None:
            client = grpcclient.InferenceServerClient(mesh.grpc_url)
            try:
                for _ in range(10):
                    ins, total, _ = grpc_inputs(family, 1)
                    np.testing.assert_array_equal(
                        client.infer(family.model, ins).as_numpy(family.outputs[0]), total
                    )
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=caller) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        after = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
        executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
        assert inferences == 120
        assert executions < inferences
    finally:
        c.close()


@pytest.mark.parametrize("family", family_param())
def test_bad_input_is_refused_and_the_model_keeps_serving(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        a, _ = family.arrays(1)
        wrong_type = "FP64" if family.datatype != "FP64" else "INT32"
        bad = [grpcclient.InferInput(n, list(a.shape), wrong_type) for n in family.inputs]
        for i in bad:
            i.set_data_from_numpy(a.astype(np.float64 if wrong_type == "FP64" else np.int32))
        with pytest.raises(InferenceServerException) as info:
            c.infer(family.model, bad)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert wrong_type in info.value.message() and family.datatype in info.value.message()
        shape = [*a.shape[:-1], a.shape[-1] + 1]
        bad = [grpcclient.InferInput(n, shape, family.datatype) for n in family.inputs]
        for i in bad:
            i.set_data_from_numpy(np.zeros(shape, dtype=a.dtype))
        with pytest.raises(InferenceServerException) as info:
            c.infer(family.model, bad)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert family.inputs[0] in info.value.message()
        ins, total, _ = grpc_inputs(family, 2)
        np.testing.assert_array_equal(c.infer(family.model, ins).as_numpy(family.outputs[0]), total)
    finally:
        c.close()


@pytest.mark.parametrize("family", family_param())
def test_statistics_and_metrics(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        before = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        for _ in range(3):
            c.infer(family.model, grpc_inputs(family, 1)[0])
        after = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        success = lambda s: int(s.get("inference_stats", {}).get("success", {}).get("count", 0))  # noqa: E731
        assert success(after) - success(before) == 3
        assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
        url = f"http://{mesh.settings.host}:{mesh.settings.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert any(
            line.startswith("nv_inference_request_success{") and f'model="{family.model}"' in line
            for line in text.splitlines()
        )
    finally:
        c.close()


@pytest.mark.parametrize("family", family_param())
def test_unload_then_load_through_the_gateway(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        c.unload_model(family.model)
        wait_for(lambda: not c.is_model_ready(family.model), 15, f"{family.model} unloaded")
        # Right after an unload Envoy may answer "no healthy upstream" for a moment while the
        # new config arrives (a known transient); the settled answer is the front's NOT_FOUND.
        unloaded_at = time.monotonic()

        def settled_error() -> InferenceServerException | None:
            try:
                c.infer(family.model, grpc_inputs(family, 1)[0])
            except InferenceServerException as exc:
                return exc if family.model in exc.message() else None
            raise AssertionError(f"{family.model} still answered after its unload")

        error = wait_for(settled_error, 15, f"{family.model}: NOT_FOUND after unload")
        assert error.status() == "StatusCode.NOT_FOUND", error
        print(f"{family.name}: settled {time.monotonic() - unloaded_at:.2f} s after unload")
        c.load_model(family.model)
        start = time.monotonic()

        def ready() -> bool:
            try:
                return bool(c.is_model_ready(family.model))
            except InferenceServerException as exc:  # the gateway's cluster is still warming
                if exc.status() != "StatusCode.UNAVAILABLE":
                    raise
                return False

        wait_for(ready, 15, f"{family.model} loaded")

        def serves() -> bool:
            try:
                ins, total, _ = grpc_inputs(family, 1)
                return bool(
                    np.array_equal(c.infer(family.model, ins).as_numpy(family.outputs[0]), total)
                )
            except InferenceServerException:
                return False

        wait_for(serves, 15, f"{family.model} answering after load")
        assert time.monotonic() - start < 15
    finally:
        c.close()
