import numpy as np
import pytest

from app.contract import ModelMetadata, PreprocessSpec, preprocess, scale_intensity


def test_preprocess_shapes_and_normalises_any_range():
    spec = PreprocessSpec()
    ramp = np.tile(np.linspace(0, 4095, 300, dtype=np.float32), (200, 1))  # 12-bit-like values
    out = preprocess(ramp, spec)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    # the left edge is black (0 after min-max) and the right edge white (1).
    assert np.allclose(out[:, :, 0], -np.array(spec.mean)[:, None] / np.array(spec.std)[:, None], atol=0.05)
    assert np.allclose(out[:, :, -1], (1 - np.array(spec.mean))[:, None] / np.array(spec.std)[:, None], atol=0.05)


def test_preprocess_is_invariant_to_intensity_scale():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 80)).astype(np.float32)
    spec = PreprocessSpec(size=32)
    assert np.allclose(preprocess(img, spec), preprocess(img * 257.0 + 1000.0, spec), atol=1e-4)


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


@pytest.mark.parametrize("drop", ["btd.labels", "btd.preprocess", "btd.cam.weight", "btd.contract_version"])
def test_metadata_missing_key_is_named(drop):
    props = ModelMetadata(labels=("a", "b"), preprocess=PreprocessSpec(), cam_weight="w", cam_bias="b").to_props()
    del props[drop]
    with pytest.raises(ValueError):
        ModelMetadata.from_props(props)
