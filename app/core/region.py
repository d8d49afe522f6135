"""The tumour region of a localising model (``contract.TUMOUR_MAP_NAME``): its tumour map, placed on
the decoded image through the preprocessing framing (as the CAM is: ``postprocess.place_cam``),
thresholded, and the largest connected parts kept as polygons, a box, an area and a peak, in the
image's pixels. A pure function: arrays in, a ``Region`` (or None) out.

The map is placed on a grid over the image with at most ``CELL_PIXELS`` pixels a map cell (224 across
the input square for a 28 x 28 map), never finer than the image: bilinear interpolation adds no detail
beyond that, and the work does not grow with the image size (``bench/bench_region.py``);
coordinates are scaled back to the image's pixels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from app.core.contract import Framing, LocalisationSpec
from app.core.postprocess import place_cam
from app.core.result import Region, RegionBox, RegionPeak

MAX_PARTS = 3  # connected parts reported, largest first (a tumour with satellites; not a speckle list)
MAX_POINTS = 64  # points of one contour at most (the simplification coarsens until it fits)
CELL_PIXELS = 8  # grid pixels a map cell at most, along each axis


def tumour_region(tumour_map: np.ndarray, spec: LocalisationSpec, framing: Framing,
                  image_size: tuple[int, int]) -> Region | None:
    """The region of ``tumour_map`` (``[h, w]`` probabilities over the model's input square) in the
    ``image_size`` (width, height) image the ``framing`` was measured on; None when no connected part
    of the thresholded map covers ``spec.min_area`` of the input square."""
    width, height = image_size
    tumour_map = np.asarray(tumour_map, dtype=np.float32)
    map_h, map_w = tumour_map.shape
    scale = min(1.0, CELL_PIXELS * map_w / framing.side, CELL_PIXELS * map_h / framing.box_height)
    view_w, view_h = max(1, round(width * scale)), max(1, round(height * scale))
    sx, sy = width / view_w, height / view_h  # image pixels per grid pixel
    probability = place_cam(tumour_map, framing, image_size, (view_w, view_h))
    mask = (probability >= np.float32(spec.threshold)).view(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    square_area = framing.side * framing.box_height  # image pixels
    min_view_pixels = max(1.0, spec.min_area * square_area / (sx * sy))
    areas = stats[1:count, cv2.CC_STAT_AREA]
    largest = np.argsort(-areas, kind="stable")[:MAX_PARTS]
    kept = [int(i) + 1 for i in largest if areas[i] >= min_view_pixels]
    if not kept:
        return None
    contours = [_contour(labels == k, sx, sy, width, height) for k in kept]
    left = int(min(stats[k, cv2.CC_STAT_LEFT] for k in kept))
    top = int(min(stats[k, cv2.CC_STAT_TOP] for k in kept))
    right = int(max(stats[k, cv2.CC_STAT_LEFT] + stats[k, cv2.CC_STAT_WIDTH] for k in kept))
    bottom = int(max(stats[k, cv2.CC_STAT_TOP] + stats[k, cv2.CC_STAT_HEIGHT] for k in kept))
    x0, y0 = min(math.floor(left * sx), width - 1), min(math.floor(top * sy), height - 1)
    x1, y1 = min(math.ceil(right * sx), width), min(math.ceil(bottom * sy), height)
    area = float(sum(areas[k - 1] for k in kept)) * sx * sy
    inside = np.isin(labels, kept)
    peak_v, peak_u = np.unravel_index(int(np.argmax(np.where(inside, probability, -1.0))), probability.shape)
    return Region(
        contours=contours,
        box=RegionBox(x0, y0, max(1, x1 - x0), max(1, y1 - y0)),
        area_px=round(area, 1),
        area_share=round(min(1.0, area / square_area), 5),
        peak=RegionPeak(*_to_image(peak_u, peak_v, sx, sy, width, height),
                        round(float(np.clip(probability[peak_v, peak_u], 0.0, 1.0)), 4)),
        threshold=spec.threshold,
        min_area=spec.min_area,
        image_width=width,
        image_height=height,
    )


def _to_image(u: float, v: float, sx: float, sy: float, width: int, height: int) -> tuple[float, float]:
    """A view pixel centre -> the image's pixel coordinates (pixel centres), inside the image."""
    x = min(max((u + 0.5) * sx - 0.5, 0.0), width - 1.0)
    y = min(max((v + 0.5) * sy - 0.5, 0.0), height - 1.0)
    return round(float(x), 1), round(float(y), 1)


def _contour(part: np.ndarray, sx: float, sy: float, width: int, height: int) -> list[list[float]]:
    """The outer contour of one connected part (a boolean view-size mask), simplified to at most
    ``MAX_POINTS`` points, in image pixels."""
    found, _ = cv2.findContours(part.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = max(found, key=cv2.contourArea)
    epsilon = 0.5  # view pixels: half a pixel keeps the shape; doubled until the point count fits
    points = cv2.approxPolyDP(outline, epsilon, closed=True)
    while len(points) > MAX_POINTS:
        epsilon *= 2.0
        points = cv2.approxPolyDP(outline, epsilon, closed=True)
    return [list(_to_image(float(u), float(v), sx, sy, width, height)) for u, v in points.reshape(-1, 2)]
