"""LitServe with its dynamic batching (up to 8 requests, 5 ms wait), as LitServe's image examples
write it: JSON ``{"image": "<base64 JPEG>"}`` decoded in ``decode_request``, the stacked tensors run in
``predict``; one inference worker on the CPU, one API server process.

    PYTHONPATH=<repo>:<repo>/bench/peers BTD_BENCH_MODEL=models/btd-resnet50-int8.onnx \
        python bench/peers/litserve_app.py --port 8080
    POST 127.0.0.1:8080/predict   {"image": "<base64 JPEG>"}
"""

import argparse
import base64

import litserve as ls
import numpy as np
from peer_model import Classifier


class BtdAPI(ls.LitAPI):
    def setup(self, device):
        self.classifier = Classifier()

    def decode_request(self, request):
        return self.classifier.tensor(base64.b64decode(request["image"]))

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.classifier.infer(x)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    port = parser.parse_args().port
    server = ls.LitServer(BtdAPI(max_batch_size=8, batch_timeout=0.005), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
