"""Decoupled Python-backend examples (Triton's ``model_transaction_policy { decoupled: true }``).

``repeat_python``: INT32 ``IN`` [-1] → one response per element, each ``OUT`` INT32 [1] (the
element) and ``IDX`` UINT32 [1] (its position), sent from a thread after ``execute`` returned,
``DELAY_MS`` (optional UINT32 [1], default 0) apart; then the FINAL flag alone. An empty ``IN``
gets only the FINAL flag; a negative element fails the request with INVALID_ARG after the
responses before it. The model stops early when the client stops listening
(``request.is_cancelled()``). Clients use ModelStreamInfer (tritonclient ``start_stream`` +
``async_stream_infer``). Written as a Triton user writes such a model.

``repeat_count_python``: a batched decoupled model, the first step of the decoupled ensemble
``repeat_then_simple`` (examples/build_ensemble.py). INT32 ``INPUT0`` [16] and UINT32 ``COUNT``
[1] (max_batch_size 8) → ``COUNT`` responses (the largest of the request's rows), response k
holding ``OUTPUT0`` = INPUT0 and ``OUTPUT1`` = k everywhere (INT32 [16] both, ``simple``'s
inputs), each sent after sleeping the config parameter ``delay_ms`` (default 0); then the FINAL
flag alone. A COUNT above 64 fails the request with INVALID_ARG; the model stops early when the
caller stops listening.

``bls_decoupled_python``: decoupled BLS, a model that is not decoupled calling one that is.
INT32 ``IN`` [-1] (and optional ``DELAY_MS``, passed on) → ``OUT`` INT32 [-1]: every ``OUT``
that ``repeat_python`` streamed back, in order, and ``RESPONSES`` UINT32 [1]: how many responses
the BLS iterator yielded (one per element plus the empty final one). Request parameters:
``bls_mode`` ``"sync"`` (default: ``exec(decoupled=True)``), ``"async"`` (``await
async_exec(decoupled=True)``) or ``"unary"`` (``exec()`` without ``decoupled``, which a
decoupled model refuses); ``bls_model`` names another model to call. An error response from the
called model (e.g. a negative element) fails the request with its text.
"""

from __future__ import annotations

REPEAT_CONFIG = """name: "repeat_python"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "DELAY_MS" data_type: TYPE_UINT32 dims: [ 1 ] optional: true }
]
output [
  { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU } ]
"""

REPEAT_MODEL = '''"""Repeat: one response per element of IN, then the FINAL flag (decoupled)."""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_MS")
            delay_s = float(delay.as_numpy()[0]) / 1000.0 if delay is not None else 0.0
            thread = threading.Thread(
                target=self.repeat, args=(request, values.copy(), delay_s), daemon=True
            )
            thread.start()
            self.threads.append(thread)
        return None

    def repeat(self, request, values, delay_s):
        sender = request.get_response_sender()
        for index, value in enumerate(values):
            if request.is_cancelled():
                break
            if value < 0:
                error = pb_utils.TritonError(
                    f"IN[{index}] is {value}; repeat takes non-negative values",
                    pb_utils.TritonError.INVALID_ARG,
                )
                sender.send(
                    pb_utils.InferenceResponse(error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                return
            out = pb_utils.Tensor("OUT", np.array([value], dtype=np.int32))
            idx = pb_utils.Tensor("IDX", np.array([index], dtype=np.uint32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out, idx]))
            time.sleep(delay_s)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)
'''

BLS_DECOUPLED_CONFIG = """name: "bls_decoupled_python"
backend: "python"
max_batch_size: 0
input [
  { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "DELAY_MS" data_type: TYPE_UINT32 dims: [ 1 ] optional: true }
]
output [
  { name: "OUT" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "RESPONSES" data_type: TYPE_UINT32 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU } ]
"""

BLS_DECOUPLED_MODEL = '''"""Decoupled BLS: OUT = what ``repeat_python`` streams back."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            params = json.loads(request.parameters())
            target = params.get("bls_model", "repeat_python")
            inputs = [pb_utils.get_input_tensor_by_name(request, "IN")]
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_MS")
            if delay is not None:
                inputs.append(delay)
            bls_request = pb_utils.InferenceRequest(
                model_name=target, requested_output_names=["OUT"], inputs=inputs
            )
            mode = params.get("bls_mode", "sync")
            if mode == "async":
                bls_responses = await bls_request.async_exec(decoupled=True)
            elif mode == "unary":
                bls_responses = [bls_request.exec()]
            else:
                bls_responses = bls_request.exec(decoupled=True)
            responses.append(self.combine(target, bls_responses))
        return responses

    def combine(self, target, bls_responses):
        values = []
        count = 0
        for bls_response in bls_responses:
            count += 1
            if bls_response.has_error():
                error = pb_utils.TritonError(
                    f"BLS stream from '{target}' failed after {len(values)} responses: "
                    f"{bls_response.error().message()}"
                )
                return pb_utils.InferenceResponse(error=error)
            # the last response of a decoupled model may be empty
            if len(bls_response.output_tensors()) > 0:
                out = pb_utils.get_output_tensor_by_name(bls_response, "OUT")
                values.append(out.as_numpy().reshape(-1))
        joined = np.concatenate(values) if values else np.zeros(0, dtype=np.int32)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("OUT", joined.astype(np.int32)),
                pb_utils.Tensor("RESPONSES", np.array([count], dtype=np.uint32)),
            ]
        )
'''

REPEAT_COUNT_CONFIG = """name: "repeat_count_python"
backend: "python"
max_batch_size: 8
model_transaction_policy { decoupled: true }
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "COUNT" data_type: TYPE_UINT32 dims: [ 1 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
parameters { key: "delay_ms" value: { string_value: "0" } }
instance_group [ { kind: KIND_CPU } ]
"""

REPEAT_COUNT_MODEL = '''"""Repeat INPUT0 COUNT times, response k with OUTPUT1 = k (decoupled)."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_COUNT = 64


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        delay_ms = parameters.get("delay_ms", {}).get("string_value", "0")
        self.delay_s = float(delay_ms) / 1000.0
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            count = pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()
            thread = threading.Thread(
                target=self.repeat,
                args=(request, values.copy(), int(count.max()) if count.size else 0),
                daemon=True,
            )
            thread.start()
            self.threads.append(thread)
        return None

    def repeat(self, request, values, count):
        sender = request.get_response_sender()
        if count > MAX_COUNT:
            error = pb_utils.TritonError(
                f"COUNT is {count}; at most {MAX_COUNT} responses per request",
                pb_utils.TritonError.INVALID_ARG,
            )
            sender.send(
                pb_utils.InferenceResponse(error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
            return
        for k in range(count):
            time.sleep(self.delay_s)
            if request.is_cancelled():
                break
            out0 = pb_utils.Tensor("OUTPUT0", values)
            out1 = pb_utils.Tensor("OUTPUT1", np.full_like(values, k))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out0, out1]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)
'''
