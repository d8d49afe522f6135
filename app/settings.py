"""Service settings: environment variables with the prefix ``BTD_``, validated at start.

``load_settings()`` reads them and, when one is wrong, raises ``InvalidSettings`` whose message names
each variable as the user set it (``BTD_MAX_BATCH_SIZE``), not by its Python field name.

Routes read them through the ``get_settings`` dependency, so tests can override them with
``app.dependency_overrides[get_settings]`` or pass a ``Settings`` object to ``create_app``.
The inference core never reads them: ``engine_options()`` and ``service_options()`` turn them into
its plain options, here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretBytes, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.decode import DEFAULT_MAX_PIXELS, MultiframePolicy
from app.engine.budget import worst_cost
from app.engine.engine import EngineOptions, ModelVariant
from app.engine.monitoring.drift import DEFAULT_PSI_THRESHOLD, DEFAULT_WINDOW, DriftRule
from app.engine.monitoring.monitor import DEFAULT_HISTORY, DEFAULT_INTERVAL_S, MonitorOptions
from app.engine.records.options import RecordOptions, sqlite_url
from app.engine.runner import RuntimeOptions, default_buckets
from app.engine.series import SeriesLimits
from app.engine.service import ServiceOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = REPO_ROOT / "models" / "btd-resnet50.onnx"
DEFAULT_RECORDS_DIR = REPO_ROOT / "data"
DATABASE_FILE = "btd.db"
KNOWN_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BTD_", extra="ignore", frozen=True)

    model_path: Path = Field(DEFAULT_MODEL_PATH, description="ONNX model file following the model contract, or a "
                             "model directory: its `current` entry (a link to a version), else its newest .onnx "
                             "file (README, \"Model updates\")")
    # Model updates while serving (README, "Model updates").
    model_watch: bool = Field(False, description="watch BTD_MODEL_PATH and swap in a new model (loaded, checked "
                              "and warmed up beside the live one) when it changes; SIGHUP does the same once")
    shadow_model: Path | None = Field(None, description="a candidate model file run in shadow on a share of the "
                                      "answered requests, off the response path; its answers are only compared")
    shadow_share: float = Field(0.1, ge=0.0, le=1.0, description="share of answered /v1/predict images the shadow "
                                "model also sees")
    shadow_queue_size: int = Field(32, ge=1, description="images waiting for the shadow model; beyond, new ones "
                               "are skipped (counted in btd_shadow_skipped_total)")
    host: str = Field("127.0.0.1", description="address `python -m app` binds")
    port: int = Field(8000, ge=1, le=65535, description="port `python -m app` binds")
    providers: str = Field(
        "auto",
        description='"auto" (TensorRT > CUDA > CPU among those installed) or a comma list of ONNX Runtime '
        "execution providers in order of preference",
    )
    trt_fp16: bool = Field(False, description="TensorRT: allow fp16 kernels")
    trt_engine_cache_dir: Path | None = Field(
        None, description="TensorRT: directory to cache built engines in (unset: no cache)"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads of each model run (0: the CPUs "
                                  "this process may use, shared among BTD_MODEL_RUNS on the CPU)")
    model_runs: int = Field(1, ge=1, le=64, description="batches the model runs at once on the CPU provider, the CPUs "
                            "shared among them (GPU providers run one)")
    model_variant: ModelVariant = Field(
        "auto", description='which file of the model to serve: "auto" (<model>-int8.onnx on the CPU, <model>-fp16.onnx '
        'on a GPU, when beside the model file; else the model file), "fp32" (the model file), "fp16" or "int8"'
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="largest batch the micro-batcher sends to the model")
    batch_buckets: str = Field(
        "auto", description='batch sizes the model is run at (a batch is padded up to the next one): "auto" (powers '
        "of two up to BTD_MAX_BATCH_SIZE, and it) or a comma list; sizes above BTD_MAX_BATCH_SIZE are dropped"
    )
    cuda_graph: bool = Field(False, description="CUDA provider: replay each bucket as a CUDA graph")
    max_wait_ms: float | Literal["auto"] = Field(
        "auto", description='longest a request waits for others to fill a batch: "auto" is 0 on the CPU provider (the '
        "model takes whatever waits when it is free) and 5 on GPU providers"
    )
    queue_size: int = Field(64, ge=1, description="requests that may wait for the model, decoding included; "
                            "beyond: 503 + Retry-After")
    max_queue_wait_ms: float = Field(
        1000.0, gt=0, description="while the oldest waiting request has waited longer, new ones get 503 + Retry-After"
    )
    host_workers: int | Literal["auto"] = Field(
        "auto", description='processes that decode and preprocess (0: threads in the server process; "auto": every '
        "CPU but one with a GPU provider, 0 on the CPU)"
    )
    host_task_timeout_s: float = Field(10.0, gt=0, description="longest decode or CAM rendering in a host worker "
                                       "process; its worker is then killed and replaced (422 decode-too-costly)")
    host_memory_limit_bytes: int = Field(1536 * 1024 * 1024, ge=0, description="address-space limit of each host "
                                         "worker process (a decode past it: 413); 0: none")
    decode_budget_bytes: int = Field(520 * 1024 * 1024, ge=1024 * 1024, description="memory all decodes may take at "
                                     "once, costed from each image's header; beyond: wait, and a new request is refused "
                                     "(503 + Retry-After) while more than this much already waits")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest decoded image, in pixels (413 beyond)")
    request_timeout_s: float = Field(30.0, gt=0, description="time to process one request once received (504 beyond)")
    max_batch_files: int = Field(16, ge=1, le=256, description="most files in one /v1/predict/batch request")
    # A series (POST /v1/predict/series, btd predict --series / NIfTI): its body is BTD_MAX_BODY_BYTES at most.
    max_series_slices: int = Field(512, ge=1, le=10_000, description="most slices in one series (DICOM frames or "
                                   "NIfTI slices, along every axis of a volume; 413 beyond)")
    max_volume_bytes: int = Field(128 * 1024 * 1024, ge=1024 * 1024, description="largest NIfTI volume once a "
                                  ".nii.gz is inflated (413 beyond: a decompression bomb stops there)")
    series_timeout_s: float = Field(300.0, gt=0, description="time to process one series once received (504 beyond)")
    max_series_cam_slices: int = Field(200, ge=0, le=10_000, description="most slices of a series answered with CAM "
                                       "images (cam=png); a longer series is answered without them, and says so")
    multiframe: MultiframePolicy = Field(
        "middle", description='frame of a multi-frame DICOM to classify: "middle" or "first" (a warning says which)'
    )
    tumour_threshold: float | None = Field(
        None, ge=0, le=1, description="tumour decision threshold (unset: the value stored in the model)"
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="log level")
    drain_timeout_s: float = Field(
        20.0, ge=0, description="on SIGTERM: longest wait for in-flight requests before exiting"
    )
    # HTTP limits, enforced by the server (app/transports/http/server.py) and the request middleware.
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024,
                                  description="largest request line plus headers, in bytes (431 beyond)")
    max_headers: int = Field(100, ge=8, le=10_000, description="most header fields in one request (431 beyond)")
    header_timeout_s: float = Field(10.0, gt=0, description="time for a request's line and headers to arrive "
                                    "(408 and the connection closed beyond)")
    body_timeout_s: float = Field(60.0, gt=0, description="time for a request's whole body to arrive (408 beyond)")
    keep_alive_timeout_s: int = Field(5, ge=1, le=3600, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(256, ge=1, description="open connections; a new one beyond gets 503 + Retry-After "
                                 "and is closed")
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="request bodies held in memory by all "
                                  "requests together; a request beyond gets 503 + Retry-After")
    # Browser-facing protections.
    allowed_hosts: str = Field("localhost,127.0.0.1,::1", description="comma list of Host names served (*.example.org "
                               "matches subdomains, * any); IP addresses are always served. Others: 400")
    allowed_origins: str = Field("", description="comma list of web origins (https://viewer.example.org) allowed to "
                                 "POST from a browser, with CORS; other cross-site POSTs: 403")
    # Authentication, rate limits and audit.
    api_keys_file: Path | None = Field(None, description="file of API keys (name:sha256[:scopes] per line, "
                                       "python -m app.transports.http.api_keys); set, or BTD_API_KEYS: keys required on /v1/*")
    api_keys: SecretStr | None = Field(None, description="the same lines as BTD_API_KEYS_FILE, e.g. from a "
                                       "Kubernetes Secret")
    auth_metrics: bool = Field(False, description="with API keys: /metrics needs a key with the metrics scope too")
    auth_docs: bool = Field(False, description="with API keys: /docs and /openapi.json need a key with the docs scope")
    rate_limit_per_minute: int = Field(0, ge=0, description="prediction requests per minute per client (API key "
                                       "name, else address); 0: no limit. Beyond: 429 + Retry-After")
    rate_limit_burst: int = Field(10, ge=1, description="prediction requests a client may send at once "
                                  "before the per-minute rate applies")
    auth_failures_per_minute: int = Field(30, ge=0, description="requests without a valid API key (401) per "
                                          "minute per client address; 0: no limit. Beyond: 429 + Retry-After "
                                          "(a valid key is still served) and one audit line per client a minute")
    auth_failures_burst: int = Field(10, ge=1, description="requests without a valid API key a client address "
                                     "may send at once before the per-minute rate applies")
    dicomweb_user: str | None = Field(None, description="HTTP basic user for DICOMweb servers (btd dicom-listen "
                                      "--stow-url, btd dicomweb); kept off the command line")
    dicomweb_password: SecretStr | None = Field(None, description="its password")
    # PACS transports (btd dicom-listen, btd dicomweb): README, "PACS", series mode.
    pacs_mode: Literal["series", "instance"] = Field(
        "series", description='"series": a received series is classified as one (one SR, one KOS, overlays of its key '
        'slices); "instance": each MR instance gets its own SR and overlay')
    series_idle_s: float = Field(3.0, gt=0, description="a series is complete once no instance of it has arrived "
                                 "for this many seconds (README, \"PACS\", the quiet period: over 10x the largest gap "
                                 "between instances measured through Orthanc's routing rule)")
    series_max_age_s: float = Field(600.0, gt=0, description="a series still receiving instances after this many "
                                    "seconds is processed with what it has (logged, btd_pacs_series_total)")
    series_max_slices: int = Field(2000, ge=1, description="most slices (frames) one series may hold; a series "
                                   "beyond is dropped, not classified (logged, btd_pacs_series_total)")
    series_max_bytes: int = Field(1024 * 1024 * 1024, ge=1024, description="most received bytes one series may "
                                  "hold; a series beyond is dropped, not classified")
    series_total_slices: int = Field(10_000, ge=1, description="most slices held by all series waiting; beyond, "
                                     "C-STORE answers 0xA700 (the sender retries later)")
    series_total_bytes: int = Field(4 * 1024 * 1024 * 1024, ge=1024, description="most received bytes held (on disk) "
                                    "by all series waiting; beyond, C-STORE answers 0xA700")
    series_spill_dir: Path | None = Field(None, description="where received instances wait on disk until their "
                                          "series is complete (unset: the system's temporary directory)")
    series_batch_size: int = Field(8, ge=1, le=64, description="slices of a series classified in one model run")
    audit_log: str = Field("stdout", description='one JSON line per prediction: "stdout", "off" or a file path')
    # Prediction records (README, "Prediction records").
    records: bool = Field(True, description="record every answer (no patient data) in the database")
    records_dir: Path = Field(DEFAULT_RECORDS_DIR, description=f"where the embedded SQLite database ({DATABASE_FILE}) "
                           "lives when BTD_DATABASE_URL is unset; created when missing")
    database_url: SecretStr | None = Field(None, description="SQLAlchemy URL of the records database, e.g. "
                                           "postgresql+psycopg://btd:PASSWORD@db:5432/btd for several replicas "
                                           f"(unset: sqlite:///BTD_RECORDS_DIR/{DATABASE_FILE})")
    records_retention_days: float = Field(365.0, ge=0, description="records older than this are deleted; 0: kept")
    records_max_rows: int = Field(1_000_000, ge=0, description="beyond this many records the oldest are "
                                  "deleted; 0: no bound")
    records_queue_size: int = Field(10_000, ge=1, description="records waiting for the database; beyond, new "
                                    "ones are lost (counted in btd_records_lost_total), never the answers")
    performance_interval_s: float = Field(60.0, ge=0, description="how often the live performance gauges "
                                          "(btd_live_*: readers' feedback against the records) are computed from "
                                          "the database; 0: not exported")
    # Drift against the model's validation baseline (README, "Monitoring").
    drift_window: int = Field(DEFAULT_WINDOW, ge=1, description="the newest answers of the loaded model version "
                              "compared with its validation baseline")
    drift_min_records: int | None = Field(None, ge=1, description="drift is alerted only with at least this "
                                          "many answers in the window (unset: a full BTD_DRIFT_WINDOW)")
    drift_psi_threshold: float = Field(DEFAULT_PSI_THRESHOLD, gt=0, description="drift is alerted when a signal's "
                                       "population stability index is over this")
    drift_interval_s: float = Field(DEFAULT_INTERVAL_S, gt=0, description="how often drift is measured (off the "
                                    "request path)")
    drift_history: int = Field(DEFAULT_HISTORY, ge=1, description="windows of drift over time that "
                               "/v1/monitoring returns")
    # Transport.
    tls_certfile: Path | None = Field(None, description="serve HTTPS with this certificate chain (PEM)")
    tls_keyfile: Path | None = Field(None, description="the private key of BTD_TLS_CERTFILE (PEM)")
    forwarded_allow_ips: str = Field("127.0.0.1", description="proxies whose X-Forwarded-For/-Proto are believed "
                                     "(comma list, * for any): the client address in logs and the audit trail")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("host_workers")
    @classmethod
    def _check_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError('give "auto" or a number of processes (0: threads)')
        return value

    @field_validator("max_wait_ms")
    @classmethod
    def _check_wait(cls, value: float | str) -> float | str:
        if isinstance(value, float) and value < 0:
            raise ValueError("Input should be greater than or equal to 0")
        if isinstance(value, float) and value > 1000:
            raise ValueError("Input should be less than or equal to 1000")
        return value

    @field_validator("batch_buckets")
    @classmethod
    def _check_buckets(cls, value: str) -> str:
        value = value.strip().lower()
        if value == "auto":
            return value
        try:
            sizes = sorted({int(v) for v in value.split(",") if v.strip()})
        except ValueError:
            raise ValueError('give "auto" or a comma list of batch sizes, e.g. 1,2,4,8') from None
        if not sizes or sizes[0] < 1:
            raise ValueError("batch sizes must be positive")
        return ",".join(map(str, sizes))

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: str) -> str:
        value = value.strip()
        if value.lower() == "auto":
            return "auto"
        names = [p.strip() for p in value.split(",") if p.strip()]
        if not names:
            raise ValueError('give "auto" or a comma-separated list of execution providers')
        unknown = [n for n in names if not n.endswith("ExecutionProvider")]
        if unknown:
            raise ValueError(f"not an execution provider name: {', '.join(unknown)} (e.g. {', '.join(KNOWN_PROVIDERS)})")
        return ",".join(names)

    @model_validator(mode="after")
    def _check_pairs(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("set both BTD_TLS_CERTFILE and BTD_TLS_KEYFILE, or neither")
        if self.decode_budget_bytes < worst_cost(self.max_pixels):
            raise ValueError(f"BTD_DECODE_BUDGET_BYTES must hold the largest image's decode: at least "
                             f"{worst_cost(self.max_pixels)} bytes for BTD_MAX_PIXELS={self.max_pixels}")
        if self.max_upload_bytes < self.max_body_bytes:
            raise ValueError("BTD_MAX_UPLOAD_BYTES must be at least BTD_MAX_BODY_BYTES (one largest request)")
        if self.drift_min_records is not None and self.drift_min_records > self.drift_window:
            raise ValueError("BTD_DRIFT_MIN_RECORDS must be at most BTD_DRIFT_WINDOW")
        if self.database_url is not None:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError, NoSuchModuleError

            try:
                make_url(self.database_url.get_secret_value()).get_dialect()
            except (ArgumentError, NoSuchModuleError, ImportError) as exc:
                raise ValueError("BTD_DATABASE_URL: not a database URL this service can use (" +
                                 type(exc).__name__ + "); give e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/DB "
                                 "or sqlite:////PATH/btd.db") from None
        if self.audit_log.strip() == "":
            raise ValueError('BTD_AUDIT_LOG: give "stdout", "off" or a file path')
        return self

    @property
    def host_names(self) -> tuple[str, ...]:
        return _comma_list(self.allowed_hosts, lower=True)

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(origin.rstrip("/") for origin in _comma_list(self.allowed_origins, lower=True))

    @property
    def auth_enabled(self) -> bool:
        return self.api_keys_file is not None or self.api_keys is not None

    def provider_list(self) -> list[str] | None:
        """The explicit provider list, or None for automatic choice."""
        return None if self.providers == "auto" else self.providers.split(",")

    def buckets(self) -> tuple[int, ...]:
        if self.batch_buckets == "auto":
            return default_buckets(self.max_batch_size)
        listed = {int(v) for v in self.batch_buckets.split(",")}
        return tuple(sorted({b for b in listed if b <= self.max_batch_size} | {self.max_batch_size}))

    def engine_options(self) -> EngineOptions:
        """The inference core's options (the one place settings become them)."""
        runtime = RuntimeOptions(
            providers=self.provider_list(), trt_fp16=self.trt_fp16, trt_engine_cache_dir=self.trt_engine_cache_dir,
            intra_op_threads=self.intra_op_threads, model_runs=self.model_runs, buckets=self.buckets(), cuda_graph=self.cuda_graph,
        )
        return EngineOptions(runtime=runtime, variant=self.model_variant, tumour_threshold=self.tumour_threshold,
                             max_pixels=self.max_pixels, multiframe=self.multiframe)

    def series_limits(self) -> SeriesLimits:
        """A series' limits (the one place settings become them)."""
        return SeriesLimits(self.max_series_slices, self.max_volume_bytes, self.series_timeout_s,
                            self.max_series_cam_slices)

    def database(self) -> str:
        """The records database's URL (it may hold a password: never log it as is)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return sqlite_url(self.records_dir / DATABASE_FILE)

    def record_options(self) -> RecordOptions | None:
        """The record writer's options, or None when BTD_RECORDS is off."""
        if not self.records:
            return None
        return RecordOptions(url=self.database(), queue_size=self.records_queue_size,
                             max_age_days=self.records_retention_days, max_rows=self.records_max_rows)

    def monitor_options(self) -> MonitorOptions:
        rule = DriftRule(psi_threshold=self.drift_psi_threshold, window=self.drift_window,
                         min_records=self.drift_min_records or self.drift_window)
        return MonitorOptions(rule=rule, interval_s=self.drift_interval_s, history=self.drift_history)

    def service_options(self) -> ServiceOptions:
        return ServiceOptions(
            max_wait_s=None if self.max_wait_ms == "auto" else self.max_wait_ms / 1000.0, queue_size=self.queue_size,
            max_queue_wait_s=self.max_queue_wait_ms / 1000.0, request_timeout_s=self.request_timeout_s,
            host_workers=None if self.host_workers == "auto" else self.host_workers,
            host_task_timeout_s=min(self.host_task_timeout_s, self.request_timeout_s),
            host_memory_limit_bytes=self.host_memory_limit_bytes or None,
            decode_budget_bytes=self.decode_budget_bytes, max_pixels=self.max_pixels,
        )


def _comma_list(value: str, *, lower: bool = False) -> tuple[str, ...]:
    items = (item.strip() for item in value.split(","))
    return tuple(item.lower() if lower else item for item in items if item)


class InvalidSettings(ValueError):
    """Some ``BTD_*`` variable does not validate; the message has one line per wrong variable."""


def env_name(field: str) -> str:
    """The environment variable that sets a settings field: ``max_batch_size`` -> ``BTD_MAX_BATCH_SIZE``."""
    return f"{Settings.model_config['env_prefix']}{field.upper()}"


def _is_secret(field: str) -> bool:
    info = Settings.model_fields.get(field)
    return info is not None and any(
        t in (SecretStr, SecretBytes) for t in (info.annotation, *getattr(info.annotation, "__args__", ())))


def describe_invalid(error: ValidationError) -> str:
    """One line per problem: the variable, the value it had (unless secret) and what is wrong."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem.get("loc") else ""
        name = env_name(field) if field else "BTD_* settings"
        value = "" if not field or _is_secret(field) or "input" not in problem else f"={problem['input']!r}"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{name}{value}: {message}")
    return "\n".join(lines)


def load_settings() -> Settings:
    """The settings from the environment; raises ``InvalidSettings`` naming each wrong variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise InvalidSettings(describe_invalid(exc)) from None
