"""The response cache through the gateway, for each family: the conformance mesh runs every
service with ``--cache-config local,size=1048576`` and serves ``<model>_cached``, the family's
add/sub model with ``response_cache { enable: true }``. A repeated request is answered without
running the model; the gateway's statistics (merged over the family's services) and the mesh's
metrics count the hit; the uncached model beside it runs every request."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.conformance.families import Family, cached_model, family_param, need
from tests.e2e.conftest import MeshHandle


def _counts(c: grpcclient.InferenceServerClient, model: str) -> tuple[int, int, int, int]:
    """(successes, inferences run, cache hits, cache misses) as the gateway reports them."""
    s = c.get_inference_statistics(model).model_stats[0]
    i = s.inference_stats
    return i.success.count, s.inference_count, i.cache_hit.count, i.cache_miss.count


def _inputs(family: Family, value: int) -> tuple[list[grpcclient.InferInput], np.ndarray]:
    a, b = family.arrays(value)
    ins = [grpcclient.InferInput(n, list(a.shape), family.datatype) for n in family.inputs]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return ins, a + b


@pytest.mark.parametrize("family", family_param())
def test_a_repeated_request_is_answered_from_the_cache(mesh: MeshHandle, family: Family) -> None:
    need(family)
    model = cached_model(family.model)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        before = _counts(c, model)
        for _ in range(3):
            inputs, total = _inputs(family, 41)
            got = c.infer(model, inputs).as_numpy(family.outputs[0])
            np.testing.assert_array_equal(got, total)
        after = _counts(c, model)
        assert tuple(x - y for x, y in zip(after, before, strict=True)) == (3, 1, 2, 1)

        plain_before = _counts(c, family.model)
        for _ in range(2):
            c.infer(family.model, _inputs(family, 41)[0])
        plain_after = _counts(c, family.model)
        assert plain_after[1] - plain_before[1] == 2 and plain_after[2] == plain_before[2]
    finally:
        c.close()
    url = f"http://{mesh.settings.host}:{mesh.settings.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    hits = re.findall(
        rf'^nv_cache_num_hits_per_model\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.M
    )
    assert hits and sum(float(h) for h in hits) >= 2


@pytest.mark.parametrize("family", family_param())
def test_http_json_hits_the_entry_a_grpc_request_made(mesh: MeshHandle, family: Family) -> None:
    need(family)
    model = cached_model(family.model)
    g = grpcclient.InferenceServerClient(mesh.grpc_url)
    h = httpclient.InferenceServerClient(mesh.http_url)
    try:
        g.infer(model, _inputs(family, 43)[0])
        before = _counts(g, model)
        a, b = family.arrays(43)
        ins = [httpclient.InferInput(n, list(a.shape), family.datatype) for n in family.inputs]
        ins[0].set_data_from_numpy(a, binary_data=False)
        ins[1].set_data_from_numpy(b, binary_data=False)
        got = h.infer(model, ins).as_numpy(family.outputs[1])
        np.testing.assert_array_equal(got, a - b)
        after = _counts(g, model)
        assert (after[2] - before[2], after[1] - before[1]) == (1, 0)
    finally:
        g.close()
        h.close()
