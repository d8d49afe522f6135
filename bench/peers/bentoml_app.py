"""A BentoML service as BentoML's guides write one: a ``@bentoml.service`` class that opens the
session in ``__init__`` and a sync ``@bentoml.api`` taking the image as a file (multipart/form-data
field ``image``); one worker.

    cd bench/peers && PYTHONPATH=<repo>:<repo>/bench/peers BTD_BENCH_MODEL=.../btd-resnet50-int8.onnx \
        python -m bentoml serve bentoml_app:Classifier --host 127.0.0.1 --port 8080
    curl -F image=@slice.jpg 127.0.0.1:8080/predict
"""

from pathlib import Path

import bentoml
import peer_model


@bentoml.service(workers=1)
class Classifier:
    def __init__(self) -> None:
        self.classifier = peer_model.Classifier()

    @bentoml.api
    def predict(self, image: Path) -> dict:
        return self.classifier.predict(image.read_bytes())
