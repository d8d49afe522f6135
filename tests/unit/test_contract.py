"""The model contract: preprocessing spec versions, source-invariant preprocessing, metadata."""

import json

import cv2
import numpy as np
import pytest

from app.core.contract import (
    LocalisationSpec,
    ModelMetadata,
    OodSpec,
    PreprocessSpec,
    frame,
    head_region,
    preprocess,
    preprocess_framed,
    scale_intensity,
)
from model_export.data import shared_data_dir


def _head(size: tuple[int, int] = (300, 260), seed: int = 0) -> np.ndarray:
    """A synthetic axial slice: dark background, a bright scalp ring, grey brain with texture and a
    bright lesion, on a canvas of ``size`` (h, w); values in 0..1000 like a 12-bit scan."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx, ry, rx = h * 0.5, w * 0.5, h * 0.38, w * 0.34
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    img = np.where(r < 1.0, 600.0, 0.0) + np.where((r > 0.85) & (r < 1.0), 300.0, 0.0)
    img += (r < 0.85) * 80.0 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    img += 350.0 * np.exp(-((yy - cy + ry * 0.3) ** 2 + (xx - cx - rx * 0.3) ** 2) / (2 * (h * 0.05) ** 2))
    img += rng.normal(0.0, 8.0, img.shape)
    return np.clip(img, 0.0, None).astype(np.float32)


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean |a - b| in units of the [0, 1] intensity range, Pearson correlation) of two input tensors."""
    mean_abs = float(np.mean(np.abs(a - b))) * 0.226  # 0.226: the normalisation's std, back to [0, 1] units
    return mean_abs, float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def _close(a: np.ndarray, b: np.ndarray, tolerance: float) -> None:
    """Near-identical: a sub-pixel shift of sharp edges is allowed, a different crop or contrast is not."""
    mean_abs, correlation = _difference(a, b)
    assert mean_abs < tolerance and correlation > 0.97, f"mean |difference| {mean_abs:.4f}, r {correlation:.4f}"


SPEC = PreprocessSpec()


def test_default_spec_is_version_2_source_invariant():
    assert (SPEC.version, SPEC.crop, SPEC.aspect, SPEC.intensity) == (2, "head", "pad", "head-percentiles")


def test_preprocess_shapes_and_dtype():
    out = preprocess(_head(), SPEC)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and np.isfinite(out).all()


def test_black_border_does_not_change_the_input():
    img = _head()
    bordered = cv2.copyMakeBorder(img, 60, 10, 5, 90, cv2.BORDER_CONSTANT, value=0.0)
    _close(preprocess(img, SPEC), preprocess(bordered, SPEC), 0.025)
    # What version 1 (whole image, squashed) made of the same change: a different input.
    legacy = PreprocessSpec.legacy()
    assert _difference(preprocess(img, legacy), preprocess(bordered, legacy))[1] < 0.8


def test_offset_on_a_larger_canvas_does_not_change_the_input():
    img = _head()
    canvas = np.zeros((520, 480), np.float32)
    canvas[200:500, 30:290] = img
    _close(preprocess(img, SPEC), preprocess(canvas, SPEC), 0.025)


def test_pixel_size_does_not_change_the_input():
    img = _head((512, 440))
    smaller = cv2.resize(img, (220, 256), interpolation=cv2.INTER_AREA)
    _close(preprocess(img, SPEC), preprocess(smaller, SPEC), 0.03)


def test_linear_contrast_and_brightness_do_not_change_the_input():
    img = _head()
    _close(preprocess(img, SPEC), preprocess(img * 3.7 + 250.0, SPEC), 0.002)


def test_aspect_is_kept_by_padding_not_squashing():
    unit, framing = frame(_head((300, 150)), SPEC)
    # The head is twice as tall as wide: its columns fill about half the square, the rest is background.
    columns_with_head = (unit > 0.05).any(axis=0).mean()
    assert 0.35 < columns_with_head < 0.65
    assert framing.side == pytest.approx(framing.box_height)


def test_framing_locates_the_head_in_the_image():
    img = np.zeros((400, 400), np.float32)
    img[100:300, 150:350] = _head((200, 200))
    _, framing = preprocess_framed(img, SPEC)
    centre_x, centre_y = framing.x + framing.side / 2, framing.y + framing.side / 2
    assert abs(centre_x - 250) < 8 and abs(centre_y - 200) < 8
    assert 0.55 * 200 < framing.side < 1.15 * 200


def test_head_mask_ignores_a_frame_line_and_a_label():
    img = scale_intensity(_head((128, 128)))
    img[2, :] = 1.0  # a frame line touching nothing
    img[110:118, 4:20] = 1.0  # a burnt-in label in a corner
    mask, _ = head_region(img)
    assert not mask[2].any() and not mask[110:118, 4:20].any()
    assert mask[64, 64]


def test_blank_image_falls_back_to_the_whole_image_and_says_no_head_was_found():
    out, framing = preprocess_framed(np.zeros((64, 80), np.float32), SPEC)
    assert np.isfinite(out).all() and out[0].std() < 1e-5
    assert framing.head_found is False and framing.side == 80
    assert preprocess_framed(_head(), SPEC)[1].head_found is True


def test_noise_image_gives_a_finite_input():
    out, framing = preprocess_framed(np.random.default_rng(1).random((64, 64)).astype(np.float32), SPEC)
    assert np.isfinite(out).all() and framing.side >= 0.5 * 64


def test_version_1_min_max_squash_is_what_older_models_get():
    legacy = PreprocessSpec.legacy()
    ramp = np.tile(np.linspace(0, 4095, 300, dtype=np.float32), (200, 1))  # 12-bit-like values
    out = preprocess(ramp, legacy)
    mean, std = np.array(legacy.mean)[:, None], np.array(legacy.std)[:, None]
    assert np.allclose(out[:, :, 0], -mean / std, atol=0.05)  # min-max: left edge black,
    assert np.allclose(out[:, :, -1], (1 - mean) / std, atol=0.05)  # right edge white, squashed to fill


def test_version_1_spec_without_a_version_field_still_reads():
    stored = json.dumps({"channels": 3, "intensity": "minmax", "interpolation": "area",
                         "mean": [0.485, 0.456, 0.406], "size": 224, "std": [0.229, 0.224, 0.225]})
    assert PreprocessSpec.from_json(stored) == PreprocessSpec.legacy()


def test_spec_round_trips_through_json():
    for spec in (SPEC, PreprocessSpec.legacy(160), PreprocessSpec(head_margin=0.1, percentiles=(1.0, 99.0))):
        assert PreprocessSpec.from_json(spec.to_json()) == spec


def test_unknown_spec_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        PreprocessSpec.from_json(json.dumps({**json.loads(SPEC.to_json()), "version": 3}))


def test_preprocess_is_invariant_to_intensity_scale():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 80)).astype(np.float32)
    for spec in (PreprocessSpec(size=32), PreprocessSpec.legacy(32)):
        assert np.allclose(preprocess(img, spec), preprocess(img * 257.0 + 1000.0, spec), atol=1e-3)


def test_scale_intensity_of_flat_image_is_zero():
    assert not scale_intensity(np.full((4, 4), 7.0)).any()


def test_preprocess_rejects_colour_arrays():
    with pytest.raises(ValueError):
        preprocess(np.zeros((8, 8, 3)), PreprocessSpec())


def test_metadata_round_trips_through_props():
    meta = ModelMetadata(
        labels=("a", "b", "notumor"), preprocess=PreprocessSpec(size=160), cam_weight="fc.weight",
        cam_bias="fc.bias", temperature=1.7, metrics={"accuracy": 0.9},
    )
    assert ModelMetadata.from_props(meta.to_props()) == meta


def test_metadata_with_an_ood_spec_round_trips_and_older_models_have_none():
    meta = ModelMetadata(labels=("a", "notumor"), preprocess=SPEC, cam_weight="w", cam_bias="b",
                         ood=OodSpec(threshold=41.5, calibration={"quantile": 0.995}))
    props = meta.to_props()
    assert ModelMetadata.from_props(props) == meta
    del props["btd.ood"]
    assert ModelMetadata.from_props(props).ood is None


def test_metadata_with_a_localisation_spec_round_trips_and_older_models_have_none():
    meta = ModelMetadata(labels=("a", "notumor"), preprocess=SPEC, cam_weight="w", cam_bias="b",
                         localisation=LocalisationSpec(threshold=0.42, min_area=0.0025))
    props = meta.to_props()
    assert json.loads(props["btd.localisation"]) == {"threshold": 0.42, "min_area": 0.0025}
    assert ModelMetadata.from_props(props) == meta
    del props["btd.localisation"]
    assert ModelMetadata.from_props(props).localisation is None


@pytest.mark.parametrize("text", ['{"threshold": 1.5, "min_area": 0.01}', '{"threshold": 0.5, "min_area": -1}',
                                  '{"threshold": 0.5}', "not json"])
def test_a_bad_localisation_spec_is_refused(text):
    props = ModelMetadata(labels=("a", "b"), preprocess=PreprocessSpec(), cam_weight="w", cam_bias="b").to_props()
    props["btd.localisation"] = text
    with pytest.raises(ValueError):
        ModelMetadata.from_props(props)


@pytest.mark.parametrize("drop", ["btd.labels", "btd.preprocess", "btd.cam.weight", "btd.contract_version"])
def test_metadata_missing_key_is_named(drop):
    props = ModelMetadata(labels=("a", "b"), preprocess=PreprocessSpec(), cam_weight="w", cam_bias="b").to_props()
    del props[drop]
    with pytest.raises(ValueError):
        ModelMetadata.from_props(props)


@pytest.mark.data
@pytest.mark.skipif(not (shared_data_dir() / "figshare-cheng").is_dir(), reason="needs ../shared/data")
def test_real_slice_border_offset_scale_and_contrast_give_near_identical_tensors():
    from app.core.decode import decode_path

    for path in sorted((shared_data_dir() / "figshare-cheng" / "images" / "glioma").glob("*.jpg"))[:5]:
        gray = decode_path(path).pixels
        base = preprocess(gray, SPEC)
        _close(base, preprocess(cv2.copyMakeBorder(gray, 40, 0, 0, 80, cv2.BORDER_CONSTANT, value=0.0), SPEC), 0.025)
        _close(base, preprocess(cv2.resize(gray, (300, 300), interpolation=cv2.INTER_AREA), SPEC), 0.03)
        _close(base, preprocess(gray * 0.5 + 20.0, SPEC), 0.01)
