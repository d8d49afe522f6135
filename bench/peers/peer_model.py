"""What every peer server in the side-by-side shares: the same INT8 file, the same preprocessing and
the same ONNX Runtime thread policy as the service, with nothing of the service around it.

Imports numpy, OpenCV, ONNX Runtime and ``app.core.contract`` only (the contract module imports numpy and
OpenCV alone), so it runs in a peer's own virtualenv with the repository on ``PYTHONPATH``. The
peer apps read the model path and the thread count from the environment the benchmark sets:

    BTD_BENCH_MODEL     the ONNX file (the benchmark passes the INT8 file the service serves)
    BTD_BENCH_THREADS   ONNX Runtime intra-op threads (the benchmark passes what the service uses)
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import onnxruntime as ort

from app.core.contract import INPUT_NAME, LOGITS_NAME, OOD_NAME, ModelMetadata, preprocess


def open_session(path: str, threads: int) -> ort.InferenceSession:
    """The service's CPU session options (app/engine/runner.py ``open_session``), restated here so a
    peer needs only the contract module."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


class Classifier:
    """JPEG/PNG bytes -> {"label", "probabilities", "ood_score"}: OpenCV decode, ``app.core.contract.preprocess``
    with the model's own spec, one ``session.run``, softmax(logits / T)."""

    def __init__(self, path: str | None = None, threads: int | None = None) -> None:
        path = path or os.environ["BTD_BENCH_MODEL"]
        threads = threads or int(os.environ.get("BTD_BENCH_THREADS", "0")) or (os.cpu_count() or 1)
        self.session = open_session(path, threads)
        self.meta = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        self.outputs = [LOGITS_NAME] + ([OOD_NAME] if OOD_NAME in {o.name for o in self.session.get_outputs()} else [])
        self.infer(np.zeros((1, self.meta.preprocess.channels, self.meta.preprocess.size,
                             self.meta.preprocess.size), np.float32))  # warm-up

    def tensor(self, data: bytes) -> np.ndarray:
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise ValueError("not a decodable image")
        return preprocess(gray, self.meta.preprocess)

    def infer(self, batch: np.ndarray) -> list[dict]:
        """A stacked batch ``[N, C, S, S]`` -> one answer per row."""
        found = self.session.run(self.outputs, {INPUT_NAME: batch})
        z = found[0].astype(np.float64) / self.meta.temperature
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probabilities = e / e.sum(axis=1, keepdims=True)
        answers = []
        for i, row in enumerate(probabilities):
            answers.append({"label": self.meta.labels[int(row.argmax())],
                            "probabilities": dict(zip(self.meta.labels, row.tolist())),
                            "ood_score": float(found[1][i]) if len(found) > 1 else None})
        return answers

    def predict(self, data: bytes) -> dict:
        return self.infer(self.tensor(data)[None])[0]
