"""``btd dicomweb``: the DICOMweb round trip for one study. Its MR slices are found with QIDO-RS,
fetched with WADO-RS, classified, and their SR and CAM overlay stored with STOW-RS (or C-STORE)."""

from __future__ import annotations

import io
import logging

from pydicom.dataset import Dataset

from app.transports.pacs.processing import CLASSIFIED_SOP_CLASSES, Processor, dicomweb_client, study_key

log = logging.getLogger("btd.pacs")

SOP_CLASS_TAG, SERIES_TAG, INSTANCE_TAG = "00080016", "0020000E", "00080018"


def _value(instance: dict, tag: str) -> str:
    return str((instance.get(tag, {}).get("Value") or [""])[0])


def _part10(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def process_study(wado_url: str, study_uid: str, processor: Processor, series_uid: str | None = None) -> int:
    """Classify every MR slice of the study (or one series) at ``wado_url``; returns how many results
    reached the destination. One log line for the study."""
    client = dicomweb_client(wado_url)
    key = study_key(study_uid)
    instances = client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                            fields=[SOP_CLASS_TAG])
    sent = 0
    for instance in instances:
        processor.tracker.update(key, received=1)
        if _value(instance, SOP_CLASS_TAG) not in CLASSIFIED_SOP_CLASSES:
            processor.tracker.update(key, skipped=1)
            continue
        dataset = client.retrieve_instance(study_uid, _value(instance, SERIES_TAG), _value(instance, INSTANCE_TAG))
        processor.tracker.update(key, pending=1)
        sent += processor.process(key, _part10(dataset))
    processor.tracker.flush()
    return sent
