"""A python-backend stand-in for Triton's onnxruntime backend, for tests only: this machine's tritonserver (the
nvidia-pytriton wheel's) has the python backend alone, so the tests swap ``platform: "onnxruntime_onnx"`` for
``backend: "python"`` in the model's config and put this file beside its ``model.onnx``. It runs that file with
ONNX Runtime CPU, one session.run per request, and answers with every output the config names. The tokenizer
step and the ensemble around it are the exported ones, unchanged.
"""

import os
import site
import sys

for _folder in reversed([p for p in os.environ.get("TQC_SERVE_STUB_PATH", "").split(os.pathsep) if p]):
    site.addsitedir(_folder)
    sys.path[:] = [_folder] + [p for p in sys.path if p != _folder]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            values = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in zip(self.outputs, values)]))
        return responses
