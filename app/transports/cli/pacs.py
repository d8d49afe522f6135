"""The PACS commands of ``btd``, registered by ``app.transports.cli.btd``:

    btd dicom-listen --ae-title BTD --port 11112 --dest ORTHANC@pacs.example.org:4242
    btd dicom-listen --url http://btd:8000 --stow-url http://pacs.example.org/dicom-web
    btd dicomweb --wado-url http://pacs.example.org/dicom-web --study 1.2.3...

Series mode (``--mode series``, ``BTD_PACS_MODE``; the default) answers each series once (README, "PACS").

Classification runs in process with the model file (``--model``, default the shipped one) or in a
running service (``--url``); results go to a DICOM node by C-STORE (``--dest AET@HOST:PORT``) or to
a DICOMweb server by STOW-RS (``--stow-url``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from app.transports.cli.predict import API_KEY_ENV
from app.transports.cli.store import add_store_argument, open_store

log = logging.getLogger("btd.pacs")



def _add_common(parser: argparse.ArgumentParser, *, stow_default_help: str = "") -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", metavar="FILE", help="classify in this process with this ONNX model "
                       "(default: $BTD_MODEL_PATH or the shipped model)")
    where.add_argument("--url", metavar="URL", help="classify with a running service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                        help=f"with --url, for a service with API keys (default: ${API_KEY_ENV})")
    dest = parser.add_argument_group("where the results go")
    dest.add_argument("--dest", metavar="AET@HOST:PORT", help="DICOM node to C-STORE the SR and overlay to")
    dest.add_argument("--stow-url", metavar="URL", help="DICOMweb base URL to STOW-RS them to" + stow_default_help)
    dest.add_argument("--calling-ae-title", default=None, help="our AE title when sending (default: --ae-title "
                      "or BTD)")
    retry = parser.add_argument_group("retries")
    retry.add_argument("--retries", type=int, default=5, help="retries after a failed send or service call (5)")
    retry.add_argument("--backoff", type=float, default=1.0, help="first wait in seconds, doubled each retry (1)")
    retry.add_argument("--max-backoff", type=float, default=30.0, help="longest wait in seconds (30)")
    parser.add_argument("--mode", choices=("series", "instance"), default=None,
                        help="series: one SR + KOS + key-slice overlays per series; instance: an SR and overlay per "
                        "MR instance (default: $BTD_PACS_MODE, series)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds for DICOM association/DIMSE/network steps and service calls (30)")
    add_store_argument(parser)


def _processor(args: argparse.Namespace, *, study_idle_s: float, default_stow: str | None = None):
    from app.transports.pacs.processing import (
        CStoreSender,
        DicomNode,
        LocalClassifier,
        Processor,
        RetryPolicy,
        ServiceClassifier,
        StowSender,
        StudyTracker,
    )

    stow_url = args.stow_url or (default_stow if not args.dest else None)
    if bool(args.dest) == bool(stow_url):
        raise ValueError("give one destination: --dest AET@HOST:PORT (C-STORE) or --stow-url URL (STOW-RS)")
    calling = args.calling_ae_title or getattr(args, "ae_title", None) or "BTD"
    sender = (CStoreSender(DicomNode.parse(args.dest), calling, args.timeout) if args.dest
              else StowSender(stow_url, args.timeout, dicomweb_auth()))
    if args.url and args.store is not None:
        raise ValueError("--store records answers made here; with --url the service records its own")
    from app.settings import Settings

    settings = Settings()
    retry = RetryPolicy(args.retries, args.backoff, args.max_backoff)
    tracker = StudyTracker(sender.description, study_idle_s)
    if series_mode(args) and args.url:
        raise ValueError("series mode classifies in this process (--model); with --url give --mode instance "
                         "(or BTD_PACS_MODE=instance)")
    if args.url:
        return Processor(ServiceClassifier(args.url, args.timeout, args.api_key), sender, tracker, retry)
    model = Path(args.model) if args.model else settings.model_path
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}; pass --model FILE or --url URL")
    if series_mode(args):
        from app.transports.pacs.series_processing import SeriesClassifier, SeriesProcessor

        classifier = SeriesClassifier(model, settings.series_batch_size, open_store(args.store), settings.max_pixels,
                                      settings.tumour_threshold)
        return SeriesProcessor(classifier, sender, tracker, retry)
    return Processor(LocalClassifier(model, open_store(args.store)), sender, tracker, retry)


def series_mode(args: argparse.Namespace) -> bool:
    from app.settings import Settings

    return (args.mode or Settings().pacs_mode) == "series"


def run_listen(args: argparse.Namespace) -> int:
    from app.settings import Settings
    from app.transports.pacs.listener import Listener, ListenerOptions

    options = ListenerOptions(
        ae_title=args.ae_title, host=args.host, port=args.port, allowed_calling_aets=tuple(args.allow_aet or ()),
        max_associations=args.max_associations, timeout_s=args.timeout, queue_size=args.queue_size,
        queue_bytes=args.queue_mib * 1024 * 1024, max_pixels=Settings().max_pixels,
        workers=args.workers, study_idle_s=args.study_idle,
    )
    processor = _processor(args, study_idle_s=args.study_idle)
    if series_mode(args):
        from app.transports.pacs.assembly import SeriesLimits
        from app.transports.pacs.listener import SeriesListener

        settings = Settings()
        listener: Listener = SeriesListener(options, processor, SeriesLimits.from_settings(settings),
                                            settings.series_spill_dir)
    else:
        listener = Listener(options, processor)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    listener.start()
    stop.wait()
    log.info("dicom-listen: stopping; finishing the queued slices")
    listener.stop(args.drain_timeout)
    close = getattr(listener.processor.classifier, "close", None)
    if close is not None:
        close()
    return 0


def run_dicomweb(args: argparse.Namespace) -> int:
    from app.settings import Settings
    from app.transports.pacs.assembly import SeriesLimits
    from app.transports.pacs.dicomweb import process_study, process_study_series

    processor = _processor(args, study_idle_s=0.0, default_stow=args.wado_url)
    try:
        if series_mode(args):
            settings = Settings()
            process_study_series(args.wado_url, args.study, processor, SeriesLimits.from_settings(settings),
                                 args.series, dicomweb_auth(), settings.series_spill_dir, settings.max_pixels)
        else:
            process_study(args.wado_url, args.study, processor, args.series, dicomweb_auth())
    finally:
        close = getattr(processor.classifier, "close", None)
        if close is not None:  # the isolated reader, and --store's records written
            close()
    stats = processor.tracker.closed[0][1] if processor.tracker.closed else None
    return 0 if stats is not None and stats.failed == 0 and stats.send_failed == 0 else 1


def dicomweb_auth() -> tuple[str, str] | None:
    """HTTP basic credentials for DICOMweb servers from the settings (BTD_DICOMWEB_USER / _PASSWORD)."""
    from app.settings import Settings

    settings = Settings()
    if not settings.dicomweb_user:
        return None
    password = settings.dicomweb_password.get_secret_value() if settings.dicomweb_password else ""
    return settings.dicomweb_user, password


def _ae_title(text: str) -> str:
    if not 0 < len(text.strip()) <= 16 or "\\" in text:
        raise argparse.ArgumentTypeError("an AE title has 1 to 16 characters and no backslash")
    return text.strip()


def add_pacs_parsers(subparsers: Any) -> None:
    listen = subparsers.add_parser(
        "dicom-listen", help="DICOM C-STORE SCP: classify received MR series (or slices), send the results back",
        description="A DICOM C-STORE SCP (pynetdicom) that a PACS routing rule sends MR images to. Series mode "
        "(default): each series, once complete, is classified as one and gets one SR, one KOS of its key slices and "
        "their CAM overlays; instance mode: each slice is classified (in process or by a running service) and gets "
        "its SR and CAM overlay. Results go to the destination (C-STORE or STOW-RS), with retries and back-off. "
        "One log line per series and per study; no patient data in logs.")
    listen.add_argument("--ae-title", type=_ae_title, default="BTD", help="our AE title (BTD)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    listen.add_argument("--port", type=int, default=11112, help="port to listen on (11112)")
    listen.add_argument("--allow-aet", action="append", type=_ae_title, metavar="AET",
                        help="accept associations only from this calling AE title (repeatable; default: any)")
    listen.add_argument("--max-associations", type=int, default=8, help="simultaneous associations (8)")
    listen.add_argument("--queue-size", type=int, default=256,
                        help="slices waiting for classification; beyond, C-STORE answers 0xA700 (256)")
    listen.add_argument("--queue-mib", type=int, default=256,
                        help="MiB of received slices waiting for classification; beyond, C-STORE answers 0xA700 (256)")
    listen.add_argument("--workers", type=int, default=1, help="slices classified at once (1)")
    listen.add_argument("--study-idle", type=float, default=5.0,
                        help="seconds without a new slice after which a study is reported (5)")
    listen.add_argument("--drain-timeout", type=float, default=60.0,
                        help="on SIGTERM: longest wait for queued slices (60)")
    _add_common(listen)
    listen.set_defaults(run=run_listen)

    web = subparsers.add_parser(
        "dicomweb", help="DICOMweb round trip for one study: QIDO/WADO-RS, classify, STOW-RS the results",
        description="Find the study's MR slices (QIDO-RS), fetch them (WADO-RS), classify them (series mode: each "
                    "series as one) and store the results with STOW-RS (to --wado-url unless told otherwise) or "
                    "C-STORE.")
    web.add_argument("--wado-url", required=True, metavar="URL", help="DICOMweb base URL, e.g. .../dicom-web")
    web.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    web.add_argument("--series", metavar="UID", help="only this Series Instance UID")
    _add_common(web, stow_default_help=" (default: --wado-url)")
    web.set_defaults(run=run_dicomweb)
