"""Ray Serve: one deployment (one replica) whose ``__call__`` takes the raw JPEG body, behind Serve's
HTTP proxy on 127.0.0.1; a local Ray started for it (no dashboard). ``GET /predict`` answers once the
deployment is up (the benchmark's readiness check). Not in the default set: Ray is a cluster runtime
(GCS, raylet, proxy and replica processes), heavy for a 2-core machine.

    PYTHONPATH=<repo>:<repo>/bench/peers BTD_BENCH_MODEL=models/btd-resnet50-int8.onnx \
        python bench/peers/ray_app.py --port 8080
    curl --data-binary @slice.jpg -H 'Content-Type: image/jpeg' 127.0.0.1:8080/predict
"""

import argparse
import os
import signal
import threading

import ray
from peer_model import Classifier
from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Btd:
    def __init__(self) -> None:
        self.classifier = Classifier()

    async def __call__(self, request: Request) -> dict:
        if request.method == "GET":
            return {"ready": True}
        return self.classifier.predict(await request.body())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    port = parser.parse_args().port
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Btd.bind(), route_prefix="/predict")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    # SIGTERM reached the whole process group (raylet, GCS) too: a graceful serve.shutdown() would wait on
    # them; stop the local Ray instead, bounded, and leave.
    threading.Timer(10.0, os._exit, args=(0,)).start()
    ray.shutdown()
    os._exit(0)
