"""``btd dicomweb``: the DICOMweb round trip for one study. Its MR slices are found with QIDO-RS,
fetched with WADO-RS, classified, and their SR and CAM overlay stored with STOW-RS (or C-STORE).

A fetched instance stays bytes in this process (at most ``MAX_INSTANCE_BYTES``, read as they arrive):
it is parsed only where it is classified, in an isolated worker (``LocalClassifier``) or by the service
(dicomweb-client's ``retrieve_instance`` would parse it here, a deflated bomb included)."""

from __future__ import annotations

import logging
from urllib.parse import quote

from app.transports.pacs.multipart import decode_related
from app.transports.pacs.processing import (
    CLASSIFIED_SOP_CLASSES,
    Processor,
    SliceFailed,
    dicomweb_client,
    study_key,
)

log = logging.getLogger("btd.pacs")

SOP_CLASS_TAG, SERIES_TAG, INSTANCE_TAG = "00080016", "0020000E", "00080018"
MAX_INSTANCE_BYTES = 64 * 1024 * 1024  # twice the service's largest request body (BTD_MAX_BODY_BYTES)
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _value(instance: dict, tag: str) -> str:
    return str((instance.get(tag, {}).get("Value") or [""])[0])


def fetch_instance(client, study_uid: str, series_uid: str, instance_uid: str,
                   max_bytes: int = MAX_INSTANCE_BYTES) -> bytes:
    """WADO-RS of one instance as its Part 10 bytes, unparsed (in the transfer syntax the server has).
    ``SliceFailed`` past ``max_bytes`` or without a DICOM part."""
    url = (f"{client.base_url}/studies/{quote(study_uid, safe='')}/series/{quote(series_uid, safe='')}"
           f"/instances/{quote(instance_uid, safe='')}")
    with client._session.get(url, headers={"Accept": ACCEPT_DICOM}, stream=True, timeout=client._timeout) as response:
        response.raise_for_status()
        chunks, size = [], 0
        for chunk in response.iter_content(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise SliceFailed(f"the instance is larger than {max_bytes} bytes; not fetched further")
            chunks.append(chunk)
        content_type = response.headers.get("content-type", "")
    try:
        parts = decode_related(b"".join(chunks), content_type)
    except ValueError:
        raise SliceFailed("the WADO-RS answer is not multipart/related DICOM") from None
    if not parts:
        raise SliceFailed("the WADO-RS answer holds no DICOM part")
    return parts[0][1]


def process_study(wado_url: str, study_uid: str, processor: Processor, series_uid: str | None = None,
                  auth: tuple[str, str] | None = None) -> int:
    """Classify every MR slice of the study (or one series) at ``wado_url``; returns how many results
    reached the destination. One log line for the study."""
    client = dicomweb_client(wado_url, auth=auth)
    key = study_key(study_uid)
    instances = client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                            fields=[SOP_CLASS_TAG])
    sent = 0
    for instance in instances:
        processor.tracker.update(key, received=1)
        if _value(instance, SOP_CLASS_TAG) not in CLASSIFIED_SOP_CLASSES:
            processor.tracker.update(key, skipped=1)
            continue
        try:
            data = fetch_instance(client, study_uid, _value(instance, SERIES_TAG), _value(instance, INSTANCE_TAG))
        except SliceFailed as exc:
            log.warning("study %s: a slice could not be fetched: %s", key, exc)
            processor.tracker.update(key, failed=1)
            continue
        processor.tracker.update(key, pending=1)
        sent += processor.process(key, data)
    processor.tracker.flush()
    return sent


def process_study_series(wado_url: str, study_uid: str, processor, limits, series_uid: str | None = None,
                         auth: tuple[str, str] | None = None, spill_dir=None,
                         max_pixels: int | None = None) -> int:
    """Series mode: fetch the study's (or one series') MR and Enhanced MR instances series by series into
    a ``SeriesAssembler`` (on disk, under ``limits``), and process each series once all of it is fetched.
    Returns how many series' results reached the destination."""
    from app.core.decode import DEFAULT_MAX_PIXELS
    from app.transports.pacs.assembly import SeriesAssembler
    from app.transports.pacs.series_processing import SERIES_SOP_CLASSES

    client = dicomweb_client(wado_url, auth=auth)
    key = study_key(study_uid)
    instances = client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                            fields=[SOP_CLASS_TAG, SERIES_TAG])
    by_series: dict[str, list[dict]] = {}
    for instance in instances:
        if _value(instance, SOP_CLASS_TAG) not in SERIES_SOP_CLASSES:
            processor.tracker.update(key, received=1, skipped=1)
            continue
        by_series.setdefault(_value(instance, SERIES_TAG), []).append(instance)
    sent = 0
    ready = []
    assembler = SeriesAssembler(limits, ready.append, spill_dir)
    try:
        for uid, members in by_series.items():
            whole = True
            for instance in members:
                try:
                    data = fetch_instance(client, study_uid, uid, _value(instance, INSTANCE_TAG))
                    header = processor.classifier.read_header(data, max_pixels or DEFAULT_MAX_PIXELS)
                except SliceFailed as exc:
                    log.warning("study %s: an instance could not be fetched: %s", key, exc)
                    processor.tracker.update(key, received=1, failed=1)
                    continue
                except Exception as exc:  # noqa: BLE001 - a bad object: its message could quote a tag value
                    log.warning("study %s: an instance could not be read (%s)", key, type(exc).__name__)
                    processor.tracker.update(key, received=1, failed=1)
                    continue
                if not assembler.add(header, data):
                    log.error("study %s: a series is larger than BTD_SERIES_TOTAL_SLICES / _BYTES allow: not "
                              "processed", key)
                    whole = False
                    break
            assembler.flush()  # the whole series is here: no quiet period to wait for
            for series in ready:
                if whole:
                    sent += processor.process(series)
                assembler.release(series)
            ready.clear()
    finally:
        assembler.close()
    processor.tracker.flush()
    return sent
