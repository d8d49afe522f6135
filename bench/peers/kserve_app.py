"""KServe's Python model server with a custom model, as KServe's custom-model guide writes one: a
``kserve.Model`` whose ``load`` opens the session and whose ``predict`` takes the V1 protocol's
``{"instances": [{"image": {"b64": ...}}]}``; one uvicorn worker, HTTP only (no gRPC server).

    PYTHONPATH=<repo>:<repo>/bench/peers BTD_BENCH_MODEL=models/btd-resnet50-int8.onnx \
        python bench/peers/kserve_app.py --port 8080
    POST 127.0.0.1:8080/v1/models/btd:predict   {"instances": [{"image": {"b64": "<base64 JPEG>"}}]}
"""

import argparse
import base64

import uvicorn
from kserve import Model, ModelServer
from kserve.errors import InvalidInput
from peer_model import Classifier


class BtdModel(Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.classifier = None
        self.load()

    def load(self) -> bool:
        self.classifier = Classifier()
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        try:
            return {"predictions": [self.classifier.predict(base64.b64decode(instance["image"]["b64"]))
                                    for instance in payload["instances"]]}
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(str(exc)) from None


class _LoopbackConfig(uvicorn.Config):
    """KServe's REST server binds 0.0.0.0; the benchmark serves on the loopback only."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    port = parser.parse_known_args()[0].port
    uvicorn.Config = _LoopbackConfig
    ModelServer(http_port=port, enable_grpc=False).start([BtdModel("btd")])
