"""The tumour region of a result as a DICOM **Segmentation** (highdicom): binary, one segment
"tumour region", on the source MR instance's frame (its rows, columns, pixel spacing, position and
orientation), the model named as the segment's algorithm. The mask is the region's contours filled
(``Prediction.region``: the thresholded tumour map's largest parts, simplified to a bounded number of
points), in the source's pixels.

Like the other DICOM results (``results``) it copies the source's patient and study modules and
derives its UIDs from the source's UIDs, the model's sha256 and the threshold: the same slice through
the same model gives the same object. A series gets ONE Segmentation (``series_results``) with a frame
per slice that has a region (:func:`segmentation_of`).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from app.core.result import Prediction, Region
from app.transports.pacs.results import (
    MANUFACTURER,
    SERIES_DESCRIPTION,
    evidence_copy,
    instance_number_of,
    result_uid,
)

SEG_SERIES_NUMBER = 9903
SEGMENT_LABEL = "tumour region"
SEGMENT_NUMBER = 1
GEOMETRY_KEYWORDS = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def region_mask(region: Region, rows: int, columns: int) -> np.ndarray:
    """uint8 ``[rows, columns]``: 1 inside the region's contours (pixel centres), 0 elsewhere."""
    mask = np.zeros((rows, columns), np.uint8)
    polygons = [np.rint(np.array(contour, np.float64)).astype(np.int32) for contour in region.contours]
    cv2.fillPoly(mask, polygons, 1)
    return mask


def algorithm_sequence(result: Prediction) -> hd.AlgorithmIdentificationSequence:
    """The model as the segment's algorithm (name, version, its file's sha256 and the thresholds)."""
    model, region = result.model, result.region
    parameters = {"sha256": model.sha256, "tumour_threshold": f"{result.threshold:g}"}
    if region is not None:
        parameters |= {"map_threshold": f"{region.threshold:g}", "min_area": f"{region.min_area:g}"}
    return hd.AlgorithmIdentificationSequence(name=model.name[:64], family=codes.DCM.ArtificialIntelligence,
                                              version=model.version[:64], parameters=parameters)


def segment_description(result: Prediction) -> hd.seg.SegmentDescription:
    """The one segment, "tumour region", found by ``result``'s model."""
    return hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_sequence(result),
    )


def on_its_frame(source: Dataset) -> bool:
    """Whether a Segmentation can lie on ``source``: a single-frame image with its frame of reference,
    position, orientation and pixel spacing (the results header of a multi-frame object keeps no
    per-frame geometry)."""
    return int(source.get("NumberOfFrames") or 1) == 1 and all(
        source.get(keyword) for keyword in GEOMETRY_KEYWORDS)


def segmentation_of(sources: Sequence[Dataset], results: Sequence[Prediction], *, series_instance_uid: str,
                    sop_instance_uid: str, instance_number: int) -> hd.seg.Segmentation:
    """One Segmentation whose frame i is ``results[i]``'s region on ``sources[i]`` (single-frame MR
    instances of one series, the same size, each with a region): highdicom takes each frame's position
    from its source."""
    first, model = results[0], results[0].model
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    masks = np.stack([region_mask(r.region, rows, columns) for r in results if r.region is not None])
    if len(masks) != len(sources):
        raise ValueError("every result of a Segmentation needs a region")
    return hd.seg.Segmentation(
        source_images=[evidence_copy(sources[0]), *sources[1:]],  # the first gives the patient and study
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(first)],
        series_instance_uid=series_instance_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=model.sha256[:16],  # the model file, as the equipment's serial
        series_description=SERIES_DESCRIPTION,
        content_label="TUMOUR",
        content_description=f"tumour region of {model.name} {model.version}"[:64],
        omit_empty_frames=False,  # one frame per source listed, even if its fill is empty
    )


def build_segmentation(source: Dataset, result: Prediction) -> hd.seg.Segmentation | None:
    """The Segmentation of ``result``'s tumour region on ``source`` (the classified MR instance: its
    header, pixel data not needed); None when the result has no region."""
    if result.region is None:
        return None
    key = (result.model.sha256, f"{result.threshold:g}")
    return segmentation_of([source], [result], series_instance_uid=result_uid("seg-series", source.SeriesInstanceUID,
                                                                              *key),
                           sop_instance_uid=result_uid("seg", source.SOPInstanceUID, *key),
                           instance_number=instance_number_of(source))
