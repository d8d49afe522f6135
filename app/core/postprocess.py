"""Pure functions from model outputs to the response's pictures: the class activation map (CAM)
and its encodings. Arrays in, plain values out. (The probabilities and the decision: ``decision``.)"""

from __future__ import annotations

import base64

import cv2
import numpy as np

from app.core.contract import Framing, scale_intensity

MAX_VIEW_SIDE = 1024  # long side of the PNG images returned with a CAM
HEATMAP_MAX_ALPHA = 0.6  # opacity of the heatmap where the CAM is 1


def class_activation_map(features: np.ndarray, weights: np.ndarray, class_index: int) -> np.ndarray:
    """CAM at feature resolution: relu(sum_k W[c,k] * features[k]), scaled to [0, 1] by its maximum
    (all zeros when nothing is positive). ``features`` is ``[K, h, w]``, ``weights`` ``[C, K]``."""
    cam = np.tensordot(weights[class_index].astype(np.float32), features.astype(np.float32), axes=(0, 0))
    cam = np.maximum(cam, 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    if peak > 0 and np.isfinite(peak):
        cam = cam / peak
    else:
        cam = np.zeros_like(cam)
    return cam.astype(np.float32)


def cam_grid(cam: np.ndarray, decimals: int = 4) -> dict:
    h, w = cam.shape
    return {"format": "grid", "shape": [int(h), int(w)], "grid": np.round(cam, decimals).astype(float).tolist()}


def view_size(height: int, width: int, max_side: int = MAX_VIEW_SIDE) -> tuple[int, int]:
    """(width, height) of the returned images: the input size, long side capped at ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def gray_view(gray: np.ndarray, max_side: int = MAX_VIEW_SIDE) -> np.ndarray:
    """The slice as the model saw its intensities (min-max scaled), 8-bit, long side capped."""
    width, height = view_size(*gray.shape, max_side=max_side)
    unit = scale_intensity(gray)
    if (height, width) != unit.shape:
        unit = cv2.resize(unit, (width, height), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _png_b64(image: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 1/3/4-channel array
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def place_cam(cam: np.ndarray, framing: Framing, image_size: tuple[int, int], view_size: tuple[int, int]) -> np.ndarray:
    """The model-space CAM drawn onto a ``view_size`` (width, height) picture of the ``image_size``
    image: it covers the framing's square ``[x, x + side) x [y, y + box_height)`` (image pixels),
    bilinear inside it, zero outside; the parts of the square beyond the image are dropped."""
    (image_w, image_h), (view_w, view_h) = image_size, view_size
    sx, sy = view_w / image_w, view_h / image_h
    bx, by, bw, bh = framing.x * sx, framing.y * sy, framing.side * sx, framing.box_height * sy
    if np.allclose((bx, by, bw, bh), (0.0, 0.0, view_w, view_h), atol=1e-6):  # the whole image (version-1 models)
        return cv2.resize(cam, (view_w, view_h), interpolation=cv2.INTER_LINEAR)
    h, w = cam.shape
    # Pixel centres to pixel centres: view u + 0.5 = bx + (grid column + 0.5) * bw / w.
    matrix = np.array([[bw / w, 0.0, bx + 0.5 * bw / w - 0.5], [0.0, bh / h, by + 0.5 * bh / h - 0.5]])
    placed = cv2.warpAffine(cam, matrix, (view_w, view_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    us, vs = np.arange(view_w) + 0.5, np.arange(view_h) + 0.5
    inside = ((vs >= by) & (vs < by + bh))[:, None] & ((us >= bx) & (us < bx + bw))[None, :]
    return np.where(inside, placed, 0.0).astype(np.float32)


def cam_images(view: np.ndarray, cam: np.ndarray, framing: Framing | None = None,
               image_size: tuple[int, int] | None = None) -> dict:
    """CAM placed on the view (through ``framing``, in ``image_size`` pixels; default: stretched over
    the whole view): the view, an RGBA heatmap (alpha follows the CAM) and the overlay, all base64
    PNG of the same size."""
    height, width = view.shape
    if framing is None or image_size is None:
        framing, image_size = Framing(0.0, 0.0, float(width), height=float(height)), (width, height)
    up = np.clip(place_cam(cam, framing, image_size, (width, height)), 0.0, 1.0)
    colours = cv2.applyColorMap(np.rint(up * 255).astype(np.uint8), cv2.COLORMAP_JET)  # BGR
    alpha = up * np.float32(HEATMAP_MAX_ALPHA)
    heatmap = cv2.merge([*cv2.split(colours), np.rint(alpha * 255).astype(np.uint8)])  # BGRA
    # One per-pixel blend in OpenCV (rounded like np.rint), not float copies of three channels.
    overlay = cv2.blendLinear(cv2.cvtColor(view, cv2.COLOR_GRAY2BGR), colours, 1.0 - alpha, alpha)
    return {
        "format": "png",
        "width": int(width),
        "height": int(height),
        "image_png": _png_b64(view),
        "heatmap_png": _png_b64(heatmap),
        "overlay_png": _png_b64(overlay),
    }
