"""The stateful Python example ``sequence_python``: a Triton model.py that keeps a running sum per
sequence in the model object, keyed by ``request.correlation_id()``, reset on the START flag and
forgotten on END. Two instances: the sequence batcher keeps each sequence on one of them
(services/core/sequence_batcher.py), so each instance sees its sequences' every request."""

SEQUENCE_PYTHON_CONFIG = """name: "sequence_python"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
sequence_batching { max_sequence_idle_microseconds: 5000000 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

SEQUENCE_PYTHON_MODEL = '''"""OUTPUT: the sum of the INPUTs sent so far in this sequence."""

import numpy as np
import triton_python_backend_utils as pb_utils

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            key, flags = request.correlation_id(), request.flags()
            value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            if flags & START or key not in self.sums:
                self.sums[key] = np.zeros_like(value)
            total = self.sums[key] + value
            if flags & END:
                del self.sums[key]
            else:
                self.sums[key] = total
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", total)]))
        return responses
'''
