"""The tumour region of a result as a DICOM **Segmentation** (highdicom): binary, one segment
"tumour region", on the source MR instance's frame (its rows, columns, pixel spacing, position and
orientation), the model named as the segment's algorithm. The mask is the region's contours filled
(``Prediction.region``: the thresholded tumour map's largest parts, simplified to a bounded number of
points), in the source's pixels.

Like the other DICOM results (``results``) it copies the source's patient and study modules and
derives its UIDs from the source's UIDs, the model's sha256 and the threshold: the same slice through
the same model gives the same object. The series work (a Segmentation per series) calls
:func:`build_segmentation` once per slice with a region.
"""

from __future__ import annotations

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


def build_segmentation(source: Dataset, result: Prediction) -> hd.seg.Segmentation | None:
    """The Segmentation of ``result``'s tumour region on ``source`` (the classified MR instance: its
    header, pixel data not needed); None when the result has no region."""
    if result.region is None:
        return None
    rows, columns = int(source.Rows), int(source.Columns)
    mask = region_mask(result.region, rows, columns)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_sequence(result),
    )
    key = (result.model.sha256, f"{result.threshold:g}")
    seg = hd.seg.Segmentation(
        source_images=[evidence_copy(source)],
        pixel_array=mask[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=result_uid("seg-series", source.SeriesInstanceUID, *key),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=result_uid("seg", source.SOPInstanceUID, *key),
        instance_number=instance_number_of(source),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=result.model.name[:64],
        software_versions=result.model.version[:64],
        device_serial_number=result.model.sha256[:16],  # the model file, as the equipment's serial
        series_description=SERIES_DESCRIPTION,
        content_label="TUMOUR",
        content_description=f"tumour region of {result.model.name} {result.model.version}"[:64],
        omit_empty_frames=False,  # one frame, the source's, even if the fill is empty
    )
    return seg
