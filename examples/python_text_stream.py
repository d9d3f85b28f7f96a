"""``text_stream_python``: an LLM-shaped decoupled Python model for Triton's generate extension.

BYTES ``text_input`` [1] → one response per word of the text, each ``text_output`` BYTES [1]
(the word, with the space before it after the first), then the FINAL flag alone. Request
parameters (the generate body's ``parameters`` object, or any other top-level field):
``max_tokens`` (at most this many words; default all) and ``delay_ms`` (pause after each word,
default 0). It stops early when the client stops listening. Try it through the gateway:

    curl -N localhost:8000/v2/models/text_stream_python/generate_stream \\
         -d '{"text_input": "tokens arrive one by one", "parameters": {"delay_ms": 200}}'
"""

from __future__ import annotations

TEXT_STREAM_CONFIG = """name: "text_stream_python"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""

TEXT_STREAM_MODEL = '''"""Stream the words of text_input back one response at a time (decoupled)."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            params = json.loads(request.parameters() or "{}")
            words = text.reshape(-1)[0].decode("utf-8").split()
            limit = int(params.get("max_tokens", len(words)))
            delay_s = float(params.get("delay_ms", 0)) / 1000.0
            thread = threading.Thread(
                target=self.stream, args=(request, words[:limit], delay_s), daemon=True
            )
            thread.start()
            self.threads.append(thread)
        return None

    def stream(self, request, words, delay_s):
        sender = request.get_response_sender()
        for index, word in enumerate(words):
            if request.is_cancelled():
                break
            piece = (word if index == 0 else " " + word).encode("utf-8")
            out = pb_utils.Tensor("text_output", np.array([piece], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            time.sleep(delay_s)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)
'''
