"""Conformance of datatypes: every datatype each framework supports, through the gateway.

For each (family, datatype) one gRPC and one HTTP request to the family's identity model
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
from tests.e2e.conformance.families import FAMILIES, Family, family_param, need
from tests.e2e.conftest import MeshHandle


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
