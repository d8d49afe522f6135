"""Every Prometheus metric of the service, defined once (prefix ``btd_``).

They live in the process-wide default registry, so ``/metrics`` also shows the process and
Python collectors. Buckets are chosen per metric: latencies in seconds from 1 ms to 30 s,
batch sizes as powers of two, confidences on [0, 1].
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from app.core.result import Prediction

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)

REQUEST_DURATION = Histogram(
    "btd_http_request_duration_seconds", "HTTP request duration by route template, method and status",
    ["route", "method", "status"], buckets=LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "btd_stage_duration_seconds", "Per-image duration of each pipeline stage (decode, preprocess, queue, infer, cam, region)",
    ["stage"], buckets=STAGE_BUCKETS,
)
BATCH_SIZE = Histogram("btd_batch_size", "Images per model call (dynamic micro-batching)", buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("btd_queue_depth", "Images waiting for the model")
# Counted from the moment an image is admitted to the model (its upload complete) until its answer:
# an upload still trickling in is no work for the model, and must not scale the deployment out.
IN_FLIGHT = Gauge("btd_in_flight_requests", "Images admitted to the model: decoding, queued or inferring "
                  "(scale-out signal)")
# The label value of an answer that makes no finding (out of distribution): never counted as a class.
NOT_ASSESSED = "not_assessed"
PREDICTIONS = Counter("btd_predictions_total", "Predictions by predicted label; images not assessed (out of "
                      f"distribution) under label {NOT_ASSESSED}", ["label"])
CONFIDENCE = Histogram(
    "btd_prediction_confidence", "Probability of the predicted label (watch for drift); images not assessed "
    f"under label {NOT_ASSESSED}", ["label"],
    buckets=CONFIDENCE_BUCKETS,
)
ERRORS = Counter("btd_errors_total", "Error responses by problem type", ["type"])
MODEL_INFO = Gauge(
    "btd_model_info", "The loaded model (value 1): name, version, file sha256 and execution provider",
    ["name", "version", "sha256", "provider"],
)
DECODE_BYTES = Gauge("btd_decode_bytes", "Memory held by the decodes running, as costed from their images' "
                     "headers (BTD_DECODE_BUDGET_BYTES)")
UPLOAD_BYTES = Gauge("btd_upload_bytes", "Request-body bytes held by requests in progress (BTD_MAX_UPLOAD_BYTES)")
OPEN_CONNECTIONS = Gauge("btd_open_connections", "Open HTTP connections (BTD_MAX_CONNECTIONS)")
READY = Gauge("btd_ready", "1 when the model is loaded, checked and warmed up and the server is not draining")
OUT_OF_DISTRIBUTION = Counter(
    "btd_out_of_distribution_total",
    "Images not assessed (no finding made), by reason: modality, plane, sequence (outside the model's validated "
    "use), model, no-head, small-image",
    ["reason"],
)
HOST_WORKER_FAILURES = Counter(
    "btd_host_worker_failures_total", "Host worker processes stopped and replaced, by reason: timeout, crash, memory",
    ["reason"],
)
RECORDS_WRITTEN = Counter("btd_records_written_total", "Prediction records written to the database")
RECORDS_LOST = Counter(
    "btd_records_lost_total", "Prediction records lost (the answer was given): reason database (a batch the "
    "database refused), queue-full (the database too slow or down for longer than the queue holds), shutdown "
    "(still waiting when the process stopped)", ["reason"],
)
for _reason in ("database", "queue-full", "shutdown"):  # exported at 0 from the start: rate() and alerts see them
    RECORDS_LOST.labels(_reason)
RECORDS_WAITING = Gauge("btd_records_waiting", "Prediction records waiting for the database (BTD_RECORDS_QUEUE_SIZE)")

# The method label takes these; any other verb a client invents is "other" (bounded label values).
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else "other"


# Pipeline stage -> the key of the response's timings_ms that measures it.
STAGES = {"decode": "decode", "preprocess": "preprocess", "queue": "queue", "infer": "inference", "cam": "cam",
          "region": "region"}


def observe_prediction(result: Prediction) -> None:
    """Record the stage timings, label and confidence of one successful prediction, and why it was
    out of distribution (then its label is ``not_assessed``: dashboards of the class mix count only
    the images the model assessed)."""
    for stage, key in STAGES.items():
        STAGE_DURATION.labels(stage).observe(getattr(result.timings_ms, key) / 1000.0)
    label = NOT_ASSESSED if result.in_distribution is False else result.label
    PREDICTIONS.labels(label).inc()
    CONFIDENCE.labels(label).observe(result.confidence)
    for reason in result.ood_reasons:
        OUT_OF_DISTRIBUTION.labels(reason).inc()


def set_model_info(name: str, version: str, sha256: str, provider: str) -> None:
    MODEL_INFO.clear()
    MODEL_INFO.labels(name, version, sha256, provider).set(1)
