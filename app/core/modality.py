"""Is this slice an MR slice? A DICOM says so in its Modality; a PNG or JPEG does not, so for them a
pixel rule looks for the one non-MR head image this service is known to be sent: a CT slice.

CT's look: the skull is the brightest thing in the picture, a thick saturated ring along the edge of
the head, with grey brain tissue directly inside it and nothing as bright within. In MR the bright
rim is scalp fat, with the dark skull (no signal from cortical bone) between it and the brain. The
rule measures, on the largest bright object (the head) scaled to its 99.5th percentile:

- ``bright_rim``: the share of the outer 12% of the head's radius at >= 0.85 (the skull in CT);
- ``bright_inside``: the share of the part deeper than 25% of the radius at >= 0.85 (CT: almost none);
- the radial profile (mean intensity in bins of 1% of the radius): its peak within the outer 20%,
  and the darkest bin in the 20% inward of that peak, over the median inside: MR's dark skull makes
  that ratio small; CT has no dark band between bone and brain.

Measured with ``scripts/measure_ct_rule.py`` (figures also in the README, under API): on brain-mri-4class it flags all 67 CT-looking
slices found there and 2 of the 1,129 grouped-test MR slices (0.18%); 0 of 2,104 figshare slices,
1 of 2,060 LGG FLAIR and 6 of 3,748 LGG T1 slices. Pure: an array in, a bool out.
"""

from __future__ import annotations

import cv2
import numpy as np

RULE_SIDE = 224  # the rule runs on a copy whose long side is at most this: the size it was measured at
FOREGROUND = 0.08  # of the 99.5th percentile: the head's silhouette
BRIGHT = 0.85  # of the 99.5th percentile: bone in CT
MIN_PEAK = 0.7
MIN_DIP_RATIO = 0.8
MIN_BRIGHT_RIM = 0.35
MAX_BRIGHT_INSIDE = 0.02


def looks_like_ct(gray: np.ndarray) -> bool:
    """True when the 2-D slice has CT's look (see the module docstring)."""
    height, width = gray.shape
    scale = min(1.0, RULE_SIDE / max(height, width))
    image = np.asarray(gray, dtype=np.float32)
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    low, high = float(image.min()), float(np.percentile(image, 99.5))
    if not high > low:
        return False
    unit = np.clip((image - low) / (high - low), 0.0, 1.0)
    contours, _ = cv2.findContours((unit > FOREGROUND).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return False
    head = np.zeros(unit.shape, np.uint8)  # the largest outline, filled (holes in it closed)
    cv2.drawContours(head, [max(contours, key=cv2.contourArea)], -1, 1, thickness=cv2.FILLED)
    depth = cv2.distanceTransform(head, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    radius = float(depth.max())
    if radius < 10:
        return False
    rim, inside = (depth > 0) & (depth <= 0.12 * radius), depth > 0.3 * radius
    if not rim.any() or not inside.any():
        return False
    bright = unit >= BRIGHT
    if bright[rim].mean() < MIN_BRIGHT_RIM or bright[depth > 0.25 * radius].mean() > MAX_BRIGHT_INSIDE:
        return False
    bins = np.minimum((depth / (radius / 100.0)).astype(np.int32), 100)
    counts = np.bincount(bins.ravel(), minlength=101)[1:41]
    sums = np.bincount(bins.ravel(), weights=unit.ravel(), minlength=101)[1:41]
    profile = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    peak_at = int(np.argmax(profile[:20]))
    dip = float(profile[peak_at:peak_at + 20].min())
    median_inside = max(float(np.median(unit[inside])), 1e-3)
    return bool(profile[peak_at] >= MIN_PEAK and dip / median_inside >= MIN_DIP_RATIO)
