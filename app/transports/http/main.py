"""The FastAPI application: ``create_app(settings)``. The model is loaded in the lifespan, in the
background, so ``/livez`` answers while a big model (or a TensorRT engine build) loads; ``/readyz``
turns green after load, contract check and warm-up, and red again while draining on shutdown.

Run it with ``python -m app`` (or ``uvicorn --factory app.transports.http.main:create_app``)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from app.engine import metrics
from app.engine.monitoring.exporter import PerformanceExporter
from app.engine.records.schema import SHADOW_COMPARISONS
from app.engine.monitoring.monitor import DriftMonitor
from app.engine.records.store import RecordStore, safe_url
from app.engine.records.writer import RecordWriter
from app.engine.reload import ModelReloader
from app.engine.service import InferenceService
from app.engine.shadow import Shadow, ShadowOptions
from app.settings import Settings
from app.transports.http import openapi_docs as docs
from app.transports.http.api_keys import KeyStore
from app.transports.http.audit import AuditLog
from app.transports.http.feedback import router as feedback_router
from app.transports.http.guard import GuardMiddleware
from app.transports.http.middleware import RequestContextMiddleware
from app.transports.http.problems import install_problem_handlers
from app.transports.http.routes import router
from app.transports.http.schemas import Problem
from app.transports.http.v2 import router as v2_router
from app.transports.http.v2_schemas import InferRequest

log = logging.getLogger("app")

API_TITLE = "btd: brain-MRI tumour classification"
API_VERSION = "1.0.0"
LIFESPAN_CLOSE_S = 2.0
RECORDS_CLOSE_S = 5.0  # the longest the record writer may take to write what waits at shutdown
API_DESCRIPTION = (
    "Classifies brain-MRI slices (PNG, JPEG, DICOM) into tumour classes with calibrated probabilities and an "
    "optional class activation map. Decision support for trained readers, not a diagnostic device. "
    "Every error is RFC 9457 application/problem+json."
)


@dataclass
class RuntimeState:
    """What the health endpoints report; the service exists once the model is ready."""

    service: InferenceService | None = None
    load_error: str | None = None
    draining: bool = False
    reloader: ModelReloader | None = None  # model updates (BTD_MODEL_WATCH, SIGHUP)
    tasks: set[asyncio.Task] = field(default_factory=set)  # the watch and reloads, cancelled at shutdown

    @property
    def ready(self) -> bool:
        return self.service is not None and not self.draining

    def not_ready_reason(self) -> str:
        if self.draining:
            return "the server is shutting down"
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        return "the model is loading and warming up"


async def _load_model(app: FastAPI, on_fatal: Callable[[], None] | None) -> None:
    state: RuntimeState = app.state.runtime
    settings: Settings = app.state.settings
    log.info("loading model %s, BTD_MODEL_VARIANT=%s (auto: its -int8 file on the CPU, -fp16 on a GPU, when beside "
             "it); /readyz answers 503 until it is loaded, checked and warmed up", settings.model_path,
             settings.model_variant)
    try:
        service = await asyncio.to_thread(InferenceService.load, settings.model_path, settings.engine_options(),
                                          settings.service_options())
    except Exception as exc:  # any load failure: report it on /livez, /readyz and in the log, then stop
        state.load_error = str(exc)
        log.error("cannot serve: %s", exc)
        if on_fatal is not None:
            on_fatal()
        return
    service.start()
    app.state.monitor = start_monitor(settings, service)  # before the service shows: /v1/monitoring reads it
    state.service = service
    metrics.READY.set(1)
    engine = service.engine
    log.info("ready: %s %s (%s) on %s, %d intra-op threads, %d host %s", engine.metadata.model_name,
             engine.metadata.model_version, engine.variant, engine.runner.provider, engine.runner.intra_op_threads,
             service.host.workers, service.host.kind)
    await start_updates(state, service, settings)
    await start_shadow(service, settings, app.state.records)


async def start_shadow(service: InferenceService, settings: Settings, records: RecordWriter | None) -> None:
    """The shadow model (BTD_SHADOW_MODEL), loaded after the live one is ready; one that cannot be
    loaded is logged and left out: it never stops the service."""
    if settings.shadow_model is None:
        return
    options = ShadowOptions(settings.shadow_model, settings.shadow_share, settings.shadow_queue_size)
    on_compared = None if records is None else partial(records.add, table=SHADOW_COMPARISONS)
    try:
        shadow = await asyncio.to_thread(Shadow.load, options, settings.engine_options(), on_compared)
    except Exception as exc:  # a bad candidate costs the comparison, never the service
        log.error("shadow model %s not loaded (%s: %s); serving without it", settings.shadow_model,
                  type(exc).__name__, exc)
        return
    shadow.start()
    service.shadow = shadow
    meta = shadow.engine.metadata
    log.info("shadow: %s %s sees %g of the answered images (BTD_SHADOW_SHARE); its answers are only compared",
             meta.model_name, meta.model_version, settings.shadow_share)


async def start_updates(state: RuntimeState, service: InferenceService, settings: Settings) -> None:
    """Model updates: the reloader, its watch on the model path (BTD_MODEL_WATCH) and SIGHUP."""
    reloader = ModelReloader(service, settings.model_path, settings.engine_options())
    await reloader.start()
    state.reloader = reloader

    def spawn(coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    if settings.model_watch:
        spawn(reloader.watch())
    try:  # only the main thread's loop takes signals (not a TestClient's)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: spawn(reloader.reload()))
    except (RuntimeError, ValueError, NotImplementedError, AttributeError):
        pass


def create_app(settings: Settings | None = None, *, on_fatal: Callable[[], None] | None = None,
               background_load: bool = True) -> FastAPI:
    """The app. ``on_fatal`` is called if the model cannot be loaded (``python -m app`` exits then).
    ``background_load=False`` makes startup wait for the model (tools that cannot poll /readyz)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: RuntimeState = app.state.runtime
        state.draining, state.load_error = False, None  # a fresh start (the app may be started again)
        app.state.records = start_records(settings)
        app.state.performance = start_performance(settings, app.state.records)
        loading = asyncio.create_task(_load_model(app, on_fatal))
        if not background_load:
            await loading
        try:
            yield
        finally:
            state.draining = True
            metrics.READY.set(0)
            if not loading.done():
                loading.cancel()
            for task in list(state.tasks):
                task.cancel()
            if state.service is not None:
                # The server already waited for in-flight requests; what is left belongs to cancelled ones.
                await state.service.close(min(settings.drain_timeout_s, LIFESPAN_CLOSE_S))
                state.service = None
            performance, app.state.performance = app.state.performance, None
            if performance is not None:
                await asyncio.to_thread(performance.close)
            monitor, app.state.monitor = app.state.monitor, None
            if monitor is not None:
                await asyncio.to_thread(monitor.close)
            records, app.state.records = app.state.records, None
            if records is not None:  # the answers given are in; their records are written (or counted lost)
                await asyncio.to_thread(records.close, min(settings.drain_timeout_s, RECORDS_CLOSE_S))

    app = FastAPI(title=API_TITLE, version=API_VERSION, description=API_DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.runtime = RuntimeState()
    app.state.audit = AuditLog(settings.audit_log)
    app.state.records = None  # the record writer while the lifespan runs (BTD_RECORDS)
    app.state.performance = None  # the live performance gauges' exporter (BTD_PERFORMANCE_INTERVAL_S)
    app.state.monitor = None  # the drift monitor once the model is loaded
    install_problem_handlers(app)
    # Innermost first: the guard (hosts, cross-site, keys, rate), CORS outside it (a preflight carries
    # no key), the request context outermost (request id, headers and metrics on every answer).
    app.add_middleware(GuardMiddleware, settings=settings, keys=key_store(settings), audit=app.state.audit)
    if settings.origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Server-Timing", "Retry-After"])
    app.add_middleware(RequestContextMiddleware, settings=settings)
    app.include_router(router)
    app.include_router(feedback_router)
    app.include_router(v2_router)
    if importlib.util.find_spec("app.transports.http.web") is not None:  # the clinician page and /docs (web engineer)
        from app.transports.http.web import router as web_router

        app.include_router(web_router)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


def start_records(settings: Settings) -> RecordWriter | None:
    """The prediction record writer, started (its thread migrates the database first, so a database
    that is down never delays the model's load or an answer), or None with BTD_RECORDS off."""
    options = settings.record_options()
    if options is None:
        return None
    writer = RecordWriter(options)
    writer.start()
    log.info("recording predictions in %s (BTD_RECORDS=false turns it off)", safe_url(options.url))
    return writer


def start_performance(settings: Settings, records: RecordWriter | None) -> PerformanceExporter | None:
    """The live performance gauges' exporter, started once the writer has migrated the database; None
    without records or with BTD_PERFORMANCE_INTERVAL_S=0."""
    if records is None or not settings.performance_interval_s:
        return None
    exporter = PerformanceExporter(RecordStore(records.options.url, busy_timeout_s=records.options.busy_timeout_s),
                                   settings.performance_interval_s, ready=lambda: records.migrated)
    exporter.start()
    return exporter
def start_monitor(settings: Settings, service: InferenceService) -> DriftMonitor:
    """The drift monitor of the loaded model, started: its thread reads the records (its own
    connection) every BTD_DRIFT_INTERVAL_S. Without records or a baseline it reports why."""
    options = settings.record_options()
    engine = service.engine
    store = None if options is None else RecordStore(options.url, busy_timeout_s=options.busy_timeout_s)
    monitor = DriftMonitor(engine.metadata.model_version, engine.model.baseline, store, settings.monitor_options(),
                           live_model=lambda: (service.engine.metadata.model_version, service.engine.model.baseline))
    monitor.start()
    return monitor


def key_store(settings: Settings) -> KeyStore | None:
    """The API keys, or None when none are configured (raises ``KeyFileError`` for a bad keys file)."""
    if not settings.auth_enabled:
        return None
    inline = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
    return KeyStore(settings.api_keys_file, inline)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document (cached), with the Problem schema every error response refers to."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (Problem, InferRequest):  # bodies the routes parse by hand, referred to by name
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas.setdefault(model.__name__, schema)
        spec["components"]["securitySchemes"] = docs.SECURITY_SCHEMES
        app.openapi_schema = spec
    return app.openapi_schema
