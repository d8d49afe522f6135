"""The tumour region (app.core.region) and when a prediction gets one (ResultBuilder): the map placed
through the framing, thresholded, its largest parts above the model's smallest area kept, in the
image's pixels and inside the image."""

import cv2
import numpy as np
import pytest

from app.core.contract import Framing, LocalisationSpec, ModelMetadata, PreprocessSpec
from app.core.region import CELL_PIXELS, MAX_PARTS, MAX_POINTS, tumour_region
from app.core.result import ModelOutput, Prediction
from app.engine.pipeline import Prepared, ResultBuilder

SPEC = LocalisationSpec(threshold=0.5, min_area=0.001)


def blob_map(side: int = 28, cells: list[tuple[int, int, int]] = ((10, 14, 3),)) -> np.ndarray:
    """A map of zeros with discs of probability 1: (row, column, radius) in map cells."""
    out = np.zeros((side, side), np.float32)
    for row, col, radius in cells:
        cv2.circle(out, (col, row), radius, 1.0, -1)
    return out


def gaussian_map(row: float, col: float, sigma: float, side: int = 28) -> np.ndarray:
    rows, cols = np.mgrid[0:side, 0:side]
    return np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_a_map_blob_lands_where_the_framing_places_it_in_image_pixels():
    framing = Framing(x=40.0, y=10.0, side=224.0)  # 8 image pixels a map cell
    # Over 0.5 within 1.18 sigma = 3 cells of cell (10, 14): a disc about 48 pixels across once placed.
    region = tumour_region(gaussian_map(10, 14, 2.55), SPEC, framing, (320, 256))
    assert region is not None and len(region.contours) == 1
    centre_x, centre_y = 40 + 14.5 * 8, 10 + 10.5 * 8  # the centre of cell (10, 14), in image pixels
    box = region.box
    assert box.x < centre_x < box.x + box.width and box.y < centre_y < box.y + box.height
    assert 40 <= box.width <= 60 and 40 <= box.height <= 60
    assert abs(region.peak.x - centre_x) <= 2 and abs(region.peak.y - centre_y) <= 2
    assert region.peak.probability == pytest.approx(1.0, abs=0.01)
    points = np.array(region.contours[0])
    assert points[:, 0].min() >= box.x - 1 and points[:, 0].max() <= box.x + box.width
    assert region.area_px == pytest.approx(np.pi * 24**2, rel=0.15)
    assert region.area_share == pytest.approx(region.area_px / 224**2, rel=1e-3)
    assert (region.threshold, region.min_area) == (SPEC.threshold, SPEC.min_area)
    assert (region.image_width, region.image_height) == (320, 256)


def test_the_threshold_decides_which_pixels_belong():
    ramp = np.tile(np.linspace(0.0, 1.0, 28, dtype=np.float32), (28, 1))  # rises to the right
    framing = Framing(0.0, 0.0, 280.0)
    low = tumour_region(ramp, LocalisationSpec(0.25, 0.0), framing, (280, 280))
    high = tumour_region(ramp, LocalisationSpec(0.75, 0.0), framing, (280, 280))
    assert low.box.x == pytest.approx(0.25 * 270 + 5, abs=6) and high.box.x == pytest.approx(0.75 * 270 + 5, abs=6)
    assert low.box.x + low.box.width == high.box.x + high.box.width == 280
    assert low.area_px > high.area_px


def test_parts_under_the_smallest_area_are_not_a_region():
    tiny = blob_map(cells=[(10, 10, 1)])  # about 5 cells of 784: 0.6 % of the square
    framing = Framing(0.0, 0.0, 224.0)
    assert tumour_region(tiny, LocalisationSpec(0.5, 0.02), framing, (224, 224)) is None
    assert tumour_region(tiny, LocalisationSpec(0.5, 0.002), framing, (224, 224)) is not None
    assert tumour_region(np.zeros((28, 28), np.float32), SPEC, framing, (224, 224)) is None


def test_the_largest_parts_are_kept_largest_first_and_small_ones_dropped():
    cells = [(1, 26, 1), (20, 20, 4), (5, 20, 2), (20, 5, 3), (14, 12, 0)]
    region = tumour_region(blob_map(cells=cells), SPEC, Framing(0.0, 0.0, 224.0), (224, 224))
    assert len(region.contours) == MAX_PARTS
    areas = [cv2.contourArea(np.array(c, np.float32)) for c in region.contours]
    assert areas == sorted(areas, reverse=True)
    # The largest part (radius 4 at row 20, column 20) comes first; the box spans the three kept ones.
    first = np.array(region.contours[0])
    assert 20 * 8 - 40 < first[:, 0].mean() < 20 * 8 + 40 and 20 * 8 - 40 < first[:, 1].mean() < 20 * 8 + 40
    assert region.box.x < 5 * 8 < region.box.x + region.box.width  # the part at column 5 is kept
    # The fourth largest part (rows 0 to 2, columns 25 to 27) is not.
    assert region.box.y >= 3 * 8 - 4 and region.box.x + region.box.width <= 25 * 8 + 4


def test_a_square_past_the_image_edges_gives_a_region_inside_the_image():
    framing = Framing(x=-60.0, y=-40.0, side=300.0)  # the head crop reaches past the top left corner
    full = np.ones((28, 28), np.float32)
    region = tumour_region(full, SPEC, framing, (200, 150))
    assert (region.box.x, region.box.y, region.box.width, region.box.height) == (0, 0, 200, 150)
    points = np.array([p for c in region.contours for p in c])
    assert points.min() >= 0 and points[:, 0].max() <= 199 and points[:, 1].max() <= 149
    assert region.area_px == pytest.approx(200 * 150, rel=0.01)
    assert region.area_share == pytest.approx(200 * 150 / 300**2, rel=0.01)


def test_a_large_image_is_worked_on_a_smaller_copy_but_answered_in_its_pixels():
    framing = Framing(x=0.0, y=0.0, side=4096.0)
    region = tumour_region(gaussian_map(14, 14, 3.0), SPEC, framing, (4096, 4096))
    centre, grid_pixel = 14.5 * 4096 / 28, 4096 / (28 * CELL_PIXELS)  # the work grid is 224 pixels across
    assert abs(region.box.x + region.box.width / 2 - centre) < grid_pixel and abs(region.peak.x - centre) < grid_pixel
    assert region.box.width == pytest.approx(2 * 1.18 * 3.0 * 4096 / 28, rel=0.1)


def test_a_ragged_region_has_a_bounded_number_of_points():
    rng = np.random.default_rng(0)
    ragged = (rng.random((112, 112)) < 0.9).astype(np.float32)  # one large part with a ragged edge
    ragged[0:56:2, :] = 1.0
    region = tumour_region(ragged, LocalisationSpec(0.5, 0.0), Framing(0.0, 0.0, 1000.0), (1000, 1000))
    assert all(3 <= len(contour) <= MAX_POINTS for contour in region.contours)


def test_a_version_1_framing_stretches_the_map_over_the_whole_image():
    framing = Framing(0.0, 0.0, 400.0, height=200.0)  # squashed input: the whole non-square image
    region = tumour_region(gaussian_map(14, 21, 3.0), SPEC, framing, (400, 200))
    assert abs(region.peak.x - 21.5 * 400 / 28) < 400 / 28 and abs(region.peak.y - 14.5 * 200 / 28) < 200 / 28


# ---------------------------------------------------------------- when a prediction gets a region

LABELS = ("glioma", "notumor")


def builder(localisation: LocalisationSpec | None = SPEC, ood_threshold: float | None = None) -> ResultBuilder:
    from app.core.contract import OodSpec

    meta = ModelMetadata(labels=LABELS, preprocess=PreprocessSpec(size=32), cam_weight="w", cam_bias="b",
                         localisation=localisation,
                         ood=None if ood_threshold is None else OodSpec(threshold=ood_threshold))
    return ResultBuilder(meta, np.ones((2, 4), np.float32), "0" * 64, threshold=0.5)


def prepared(image_size=(224, 224)) -> Prepared:
    return Prepared(np.zeros((32, 32), np.float32), PreprocessSpec(size=32), Framing(0.0, 0.0, 224.0, head_found=True),
                    image_size, "image/png", [], timings_ms={"decode": 1.0, "preprocess": 1.0})


TUMOUR, NO_TUMOUR = np.array([3.0, 0.0]), np.array([0.0, 3.0])


@pytest.mark.parametrize("logits,ood_score,localisation,tumour_map,expected", [
    (TUMOUR, None, SPEC, blob_map(), True),
    (NO_TUMOUR, None, SPEC, blob_map(), False),  # no tumour called
    (TUMOUR, 9.0, SPEC, blob_map(), False),  # not assessed (OOD score over the threshold)
    (TUMOUR, None, None, blob_map(), False),  # the model does not say how to read a map
    (TUMOUR, None, SPEC, None, False),  # no map
    (TUMOUR, None, SPEC, np.zeros((28, 28), np.float32), False),  # nothing over the threshold
])
def test_a_prediction_has_a_region_only_for_an_assessed_called_tumour(logits, ood_score, localisation, tumour_map,
                                                                      expected):
    result = builder(localisation, ood_threshold=1.0).build(
        prepared(), ModelOutput(logits, None, ood_score, tumour_map=tumour_map), "none", started=0.0)
    assert (result.region is not None) is expected
    if expected:
        assert result.tumour_detected is True and result.to_dict()["region"]["box"]["width"] > 0
        assert result.timings_ms.region >= 0.0
        assert Prediction.from_dict(result.to_dict()) == result  # a remote client reads the region back
