"""Every Prometheus metric of the service, defined once (prefix ``btd_``).

They live in the process-wide default registry, so ``/metrics`` also shows the process and
Python collectors. Buckets are chosen per metric: latencies in seconds from 1 ms to 30 s,
batch sizes as powers of two, confidences on [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.core.decision import NOT_ASSESSED
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
MODEL_RELOADS = Counter(
    "btd_model_reloads_total", "Model updates while serving (BTD_MODEL_WATCH, SIGHUP), by result: swapped, "
    "unchanged (the same file content), refused (the candidate failed its checks; the live model stays)", ["result"],
)
RELOAD_RESULTS = ("swapped", "unchanged", "refused")
for _result in RELOAD_RESULTS:
    MODEL_RELOADS.labels(_result)
# Shadow mode (BTD_SHADOW_MODEL): what a candidate answers is only compared with the live answer.
SHADOW_CHECKS = ("label", "tumour")  # the same label; the same tumour decision
SHADOW_COMPARISONS = Counter(
    "btd_shadow_comparisons_total", "Images the shadow model also answered, by check (label: the same label; "
    "tumour: the same tumour decision) and result (agree, disagree)", ["check", "result"],
)
SHADOW_SKIPPED = Counter(
    "btd_shadow_skipped_total", "Sampled images the shadow model did not answer, by reason: busy (its queue was "
    "full), error (it failed), dicom (it would have to decode a DICOM outside the isolated workers)", ["reason"],
)
for _check in SHADOW_CHECKS:
    for _agreement in ("agree", "disagree"):
        SHADOW_COMPARISONS.labels(_check, _agreement)
for _reason in ("busy", "error", "dicom"):
    SHADOW_SKIPPED.labels(_reason)
SHADOW_MODEL_INFO = Gauge("btd_shadow_model_info", "The shadow model (value 1): name, version, file sha256",
                          ["name", "version", "sha256"])
SHADOW_WAITING = Gauge("btd_shadow_waiting", "Images waiting for the shadow model (BTD_SHADOW_QUEUE_SIZE)")
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
# The PACS transports' series (btd dicom-listen, btd dicomweb), by what became of them (SERIES_OUTCOMES).
SERIES_OUTCOMES = ("complete", "timed-out", "dropped-too-large", "failed")
PACS_SERIES = Counter("btd_pacs_series_total", "Series received by the PACS transports, by outcome: complete "
                      "(quiet period), timed-out (processed after BTD_SERIES_MAX_AGE_S), dropped-too-large, failed",
                      ["outcome"])
PACS_HELD_BYTES = Gauge("btd_pacs_series_held_bytes", "Received bytes held on disk by series not yet complete")
RECORDS_WRITTEN = Counter("btd_records_written_total", "Prediction records written to the database")
RECORDS_LOST = Counter(
    "btd_records_lost_total", "Prediction records lost (the answer was given): reason database (a batch the "
    "database refused), queue-full (the database too slow or down for longer than the queue holds), shutdown "
    "(still waiting when the process stopped)", ["reason"],
)
for _reason in ("database", "queue-full", "shutdown"):  # exported at 0 from the start: rate() and alerts see them
    RECORDS_LOST.labels(_reason)
RECORDS_WAITING = Gauge("btd_records_waiting", "Prediction records waiting for the database (BTD_RECORDS_QUEUE_SIZE)")
# Drift against the model's validation baseline (app.engine.monitoring), refreshed off the request path.
# Labels: the loaded model's version and the signal (app.core.baseline.SIGNALS): bounded.
DRIFT_PSI = Gauge("btd_drift_psi", "Population stability index of the recent answers' signal against the model's "
                  "validation baseline (BTD_DRIFT_WINDOW answers)", ["model_version", "signal"])
DRIFT_KS = Gauge("btd_drift_ks", "Kolmogorov-Smirnov statistic (at the baseline's bin edges) of a continuous "
                 "signal against the validation baseline", ["model_version", "signal"])
DRIFT_OVER = Gauge("btd_drift_over_threshold", "1 when the signal breaks the drift rule: PSI over "
                   "BTD_DRIFT_PSI_THRESHOLD with at least BTD_DRIFT_MIN_RECORDS answers in the window",
                   ["model_version", "signal"])
DRIFT_WINDOW = Gauge("btd_drift_window_records", "Answers in the drift window", ["model_version"])
DRIFT_THRESHOLD = Gauge("btd_drift_psi_threshold", "The drift rule's PSI threshold (BTD_DRIFT_PSI_THRESHOLD)")
DRIFT_REFRESHED = Gauge("btd_drift_last_refresh_timestamp_seconds", "When drift was last computed (Unix time)")



class LivePerformance(Collector):
    """Live performance per model version against readers' feedback (``app.engine.monitoring``): the
    latest report (``update``, from the exporter's thread) as gauges whose only label is the model
    version, so a scrape reads a dict and never waits for the database. A figure with no case yet
    (e.g. no reader found a tumour) has no sample."""

    PROPORTIONS: ClassVar[dict[str, str]] = {"sensitivity": "sensitivity of the tumour decision against readers",
                                             "specificity": "specificity of the tumour decision against readers",
                                             "class_agreement": "share of confirmed cases where the model's class "
                                                                "is the readers'"}
    BOUNDS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("", "value", ""), ("_lower", "lower", ", lower bound of its 95% Wilson interval"),
        ("_upper", "upper", ", upper bound of its 95% Wilson interval"))

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"models": {}}
        self.updated_at: float | None = None

    def update(self, report: dict[str, Any], at: float) -> None:
        self.report, self.updated_at = report, at  # one assignment each: a scrape sees the old or the new

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families({"models": {}}, None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(self.report, self.updated_at))

    def _families(self, report: dict[str, Any], updated_at: float | None) -> list[GaugeMetricFamily]:
        labels = ["model_version"]
        confirmed = GaugeMetricFamily("btd_live_confirmed_cases", "Recorded predictions with a reader's finding "
                                      "(readers' feedback), by model version", labels=labels)
        ece = GaugeMetricFamily("btd_live_tumour_ece", "Expected calibration error of the tumour probability "
                                "against readers' findings on confirmed cases", labels=labels)
        families = [confirmed, ece]
        for version, model in report["models"].items():
            confirmed.add_metric([version], model["confirmed"])
            if model["calibration"]["ece"] is not None:
                ece.add_metric([version], model["calibration"]["ece"])
        for name, what in self.PROPORTIONS.items():
            for suffix, bound, text in self.BOUNDS:
                family = GaugeMetricFamily(f"btd_live_{name}{suffix}", f"Live {what}{text}, by model version",
                                           labels=labels)
                for version, model in report["models"].items():
                    if model[name][bound] is not None:
                        family.add_metric([version], model[name][bound])
                families.append(family)
        refreshed = GaugeMetricFamily("btd_live_performance_updated_timestamp_seconds", "When the live "
                                      "performance gauges were last computed (Unix time; absent until then)")
        if updated_at is not None:
            refreshed.add_metric([], updated_at)
        return [*families, refreshed]


LIVE_PERFORMANCE = LivePerformance()
REGISTRY.register(LIVE_PERFORMANCE)

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
