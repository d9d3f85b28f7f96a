"""`meshserve infer MODEL`: one inference through the gateway's REST API, from the command line.

The model's metadata (``GET /v2/models/<m>[/versions/<v>]``) gives its inputs. Each input is
taken from ``--input NAME=VALUES`` (JSON: a number, a string, or a nested list; one value or a
flat list is broadcast / reshaped to the input's shape) or, when not given, filled with random
data of the right datatype (``--seed`` makes it repeatable). Variable dimensions (-1) are the
batch (``--batch``, default 1) for the first one of a batching model and 1 otherwise, unless
``--shape NAME=2,16`` says. The answer is printed per output (name, datatype, shape, values), with
the version that served it, or as the raw JSON response with ``--json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: Triton datatype → numpy dtype for the inputs this command can fill (REST JSON carries these)
NUMPY_OF = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

Call = Callable[..., Any]


class InferCommandError(ValueError):
    """A bad ``--input`` / ``--shape`` or an input this command cannot fill; says what to fix."""


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """``["A=1", "B=[1,2]"]`` → ``{"A": "1", "B": "[1,2]"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InferCommandError(f"{what} '{item}' is not NAME=VALUE")
        out[name] = value
    return out


def input_shape(
    meta: Mapping[str, Any], batching: bool, batch: int, given: str | None = None
) -> list[int]:
    """The shape to send for input ``meta`` (``{"name", "datatype", "shape"}``)."""
    if given is not None:
        try:
            shape = [int(d) for d in given.split(",") if d.strip()]
        except ValueError:
            raise InferCommandError(
                f"--shape {meta['name']}={given}: give integers separated by commas, e.g. 1,16"
            ) from None
        if any(d < 0 for d in shape):
            raise InferCommandError(f"--shape {meta['name']}={given}: dimensions must be >= 0")
        return shape
    dims = [int(d) for d in meta["shape"]]
    return [
        batch if (d < 0 and i == 0 and batching) else (1 if d < 0 else d)
        for i, d in enumerate(dims)
    ]


def input_values(
    meta: Mapping[str, Any], shape: list[int], text: str | None, rng: np.random.Generator
) -> list[Any]:
    """The flat JSON ``data`` of one input: parsed from ``text`` or random."""
    name, datatype = meta["name"], meta["datatype"]
    count = int(np.prod(shape)) if shape else 1
    if text is not None:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text  # a bare word is a string
        flat = list(np.asarray(parsed, dtype=object).reshape(-1))
        if len(flat) == 1 and count != 1:
            flat = flat * count
        if len(flat) != count:
            raise InferCommandError(
                f"--input {name}: {len(flat)} value(s) given, shape {shape} needs {count}"
            )
        return [_json_value(v, datatype, name) for v in flat]
    if datatype == "BYTES":
        return [str(v) for v in rng.integers(0, 10, count)]
    dtype = NUMPY_OF.get(datatype)
    if dtype is None:
        raise InferCommandError(
            f"input {name} is {datatype}, which REST JSON cannot carry; use a gRPC client"
        )
    if datatype == "BOOL":
        return [bool(v) for v in rng.integers(0, 2, count)]
    if np.issubdtype(dtype, np.floating):
        return [float(v) for v in rng.random(count).astype(dtype)]
    return [int(v) for v in rng.integers(0, 10, count)]


def _json_value(value: Any, datatype: str, name: str) -> Any:
    try:
        if datatype == "BYTES":
            return value if isinstance(value, str) else json.dumps(value)
        if datatype == "BOOL":
            return bool(value)
        dtype = NUMPY_OF.get(datatype)
        if dtype is None:
            raise InferCommandError(f"input {name} is {datatype}, which REST JSON cannot carry")
        if np.issubdtype(dtype, np.floating):
            return float(value)
        return int(value)
    except (TypeError, ValueError):
        raise InferCommandError(f"--input {name}: {value!r} is not a {datatype} value") from None


def build_request(
    metadata: Mapping[str, Any],
    batching: bool,
    values: Mapping[str, str],
    shapes: Mapping[str, str],
    batch: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """The REST infer request body for a model with ``metadata``."""
    known = {i["name"] for i in metadata.get("inputs", [])}
    unknown = sorted((set(values) | set(shapes)) - known)
    if unknown:
        raise InferCommandError(
            f"model '{metadata.get('name')}' has no input {', '.join(unknown)}; "
            f"its inputs: {', '.join(sorted(known))}"
        )
    rng = np.random.default_rng(seed)
    inputs = []
    for meta in metadata.get("inputs", []):
        shape = input_shape(meta, batching, batch, shapes.get(meta["name"]))
        data = input_values(meta, shape, values.get(meta["name"]), rng)
        inputs.append(
            {"name": meta["name"], "datatype": meta["datatype"], "shape": shape, "data": data}
        )
    return {"inputs": inputs}


def render(answer: Mapping[str, Any]) -> str:
    """What ``meshserve infer`` prints for a REST infer response."""
    lines = [f"model {answer.get('model_name')} version {answer.get('model_version', '-')}"]
    for out in answer.get("outputs", []):
        shape = [int(d) for d in out.get("shape", [])]
        data = out.get("data", [])
        shown: Any = data
        if shape and data and np.prod(shape) == len(data):
            shown = np.array(data, dtype=object).reshape(shape).tolist()
        text = json.dumps(shown)
        if len(text) > 400:
            text = text[:400] + f" ... ({len(data)} values)"
        lines.append(f"{out['name']} {out.get('datatype')} {shape}: {text}")
    return "\n".join(lines)


def run(
    call: Call,
    base: str,
    model: str,
    version: str,
    inputs: Sequence[str],
    shapes: Sequence[str],
    batch: int,
    seed: int,
    raw: bool,
) -> int:
    """``meshserve infer``: ``call(url, method, body)`` is the CLI's HTTP helper."""
    path = f"{base}/v2/models/{model}" + (f"/versions/{version}" if version else "")
    try:
        values = parse_assignments(inputs, "--input")
        given_shapes = parse_assignments(shapes, "--shape")
        metadata = call(path)
        config = call(f"{path}/config")
        batching = int((config or {}).get("max_batch_size", 0) or 0) > 0
        body = build_request(metadata, batching, values, given_shapes, batch, seed)
    except InferCommandError as exc:
        raise SystemExit(f"meshserve: {exc}") from None
    answer = call(f"{path}/infer", "POST", body)
    print(json.dumps(answer, indent=2) if raw else render(answer))
    return 0
