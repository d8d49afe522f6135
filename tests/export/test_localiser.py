"""The tumour-map decoder (``btd fit-localiser``) and its export as the ``tumour_map`` output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from app.core.contract import (
    FEATURES_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    META_LOCALISATION,
    TUMOUR_MAP_NAME,
    Framing,
    PreprocessSpec,
)
from model_export import export as exporter
from model_export import localiser as loc
from model_export.localisation import Box
from model_export.resnet import ResNet50
from tests.export.synthetic_mri import LABELS

SIZE = 64
torch.set_num_threads(2)


def test_projection_whitens_the_pixel_vectors() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(0, 1, (8, 8)) * np.linspace(3, 0.1, 8)
    maps = torch.from_numpy((rng.normal(0, 1, (20, 6, 6, 8)) @ mixing.T + 5).astype(np.float32)).permute(0, 3, 1, 2)
    projection = loc.Projection.fit(maps, k=4)
    with torch.no_grad():
        z = projection(maps).permute(0, 2, 3, 1).reshape(-1, 4).double()
    np.testing.assert_allclose(z.mean(0).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(torch.cov(z.T).numpy(), np.eye(4), atol=1e-2)


def test_mask_is_cut_to_the_input_square_the_model_sees() -> None:
    mask = np.zeros((100, 200), np.float32)
    mask[40:60, 150:170] = 1  # a tumour on the right half of a wide image
    framing = Framing(x=100.0, y=0.0, side=100.0)  # the model saw the right-hand square
    square = loc.to_input_square(mask, framing, 50)
    ys, xs = np.nonzero(square > 0.5)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 29, 25, 34)
    box = loc.box_in_input(Box(0.75, 0.4, 0.85, 0.6), framing, 200, 100)
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((0.5, 0.4, 0.7, 0.6))


def _grid_target(grid: int = 8) -> torch.Tensor:
    target = torch.zeros(1, grid, grid)
    target[0, 2:5, 3:6] = 1
    return target


def test_mask_loss_prefers_the_map_on_the_tumour() -> None:
    target, no_box = _grid_target(), torch.full((1, 4), float("nan"))
    right = (target * 8 - 4)[:, None]
    wrong = (-target * 8 + 4)[:, None]
    assert loc.localisation_loss(right, target, no_box) < loc.localisation_loss(wrong, target, no_box) - 1


def test_box_loss_wants_the_map_inside_the_box_and_reaching_its_sides() -> None:
    inside = _grid_target()  # for box rows the target holds the box's cells
    box = torch.tensor([[3 / 8, 2 / 8, 6 / 8, 5 / 8]])
    filling = (inside * 8 - 4)[:, None]
    corner_only = torch.full((1, 1, 8, 8), -4.0)
    corner_only[0, 0, 2, 3] = 4  # a single peak inside: misses the other rows and columns of the box
    outside = torch.full((1, 1, 8, 8), -4.0)
    outside[0, 0, 7, 0] = 4
    filled = loc.localisation_loss(filling, inside, box)
    assert filled < loc.localisation_loss(corner_only, inside, box) < loc.localisation_loss(outside, inside, box)


def _synthetic_features(n: int, seed: int) -> loc.Extracted:
    """Projected maps whose first layer2 channel lights up where the (random) tumour square is."""
    rng = np.random.default_rng(seed)
    p2 = rng.normal(0, 1, (n, 4, 16, 16)).astype(np.float16)
    target = np.zeros((n, 16, 16), np.float16)
    for i in range(n):
        if i % 3:
            y, x = rng.integers(0, 11, 2)
            target[i, y : y + 5, x : x + 5] = 1
    p2[:, 0] += 3 * target
    p3 = rng.normal(0, 1, (n, 4, 8, 8)).astype(np.float16)
    p4 = rng.normal(0, 1, (n, 4, 4, 4)).astype(np.float16)
    masks = np.stack([(loc.upsample(t) > 0.5) for t in target.astype(np.float32)]).astype(np.uint8)
    return loc.Extracted(p2, p3, p4, target, np.full((n, 4), np.nan, np.float32), masks, np.zeros((n, 4, 4)))


def test_decoder_learns_where_the_tumour_is_and_keeps_tumour_free_slices_empty() -> None:
    data = _synthetic_features(96, seed=0)
    decoder = loc.train_decoder(data, np.arange(64), (4, 4, 4), width=16, epochs=25, lr=1e-2, batch_size=16, seed=0)
    held_out = np.arange(64, 96)
    figures = loc.mask_figures(loc.predict_maps(decoder, data, held_out), data.eval_masks[held_out], 0.5, 0.002)
    assert figures["dice"] > 0.8
    assert figures["tumour_free_with_region"] < 0.2
    untrained = loc.TumourDecoder((4, 4, 4), 16)
    assert loc.mask_figures(loc.predict_maps(untrained, data, held_out), data.eval_masks[held_out], 0.5,
                            0.002)["dice"] < 0.5


def test_pointing_and_box_figures_score_a_map_against_its_box() -> None:
    grid = np.zeros((28, 28), np.float32)
    grid[10:14, 4:9] = 1
    box = np.array([4 / 28, 10 / 28, 9 / 28, 14 / 28])
    assert loc.pointing(grid, box)
    assert not loc.pointing(grid, np.array([0.5, 0.5, 0.9, 0.9]))
    found = loc.region_box(loc.upsample(grid) >= 0.5, 0.002)
    assert loc.box_iou(found, box) > 0.8
    assert loc.region_box(np.zeros((224, 224), bool), 0.002) is None


@pytest.fixture(scope="module")
def model_and_localiser() -> tuple[ResNet50, dict]:
    torch.manual_seed(0)
    model = ResNet50(len(LABELS), stride_in_1x1=True).eval()
    x = torch.randn(6, 3, SIZE, SIZE)
    with torch.inference_mode():
        maps = loc.trunk_maps(model, x)
    projections = [loc.Projection.fit(m, k) for m, k in zip(maps, (8, 8, 8))]
    localiser = loc.Localiser(projections, loc.TumourDecoder((8, 8, 8), 8)).eval()
    return model, {**localiser.state(), "threshold": 0.4, "min_area": 0.003}


def test_export_adds_the_tumour_map_from_the_same_pass(model_and_localiser, tmp_path) -> None:
    model, state = model_and_localiser
    path = exporter.export(model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "loc.onnx", localiser=state)
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == [LOGITS_NAME, FEATURES_NAME, TUMOUR_MAP_NAME]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[META_LOCALISATION]) == {"threshold": 0.4, "min_area": 0.003}
    from app.core.model import ModelFile

    assert ModelFile.load(path).localises  # the service reads it as a model with a tumour region
    x = exporter.parity_inputs(SIZE, 2, seed=3)
    logits, tumour_map = ort.InferenceSession(str(path)).run([LOGITS_NAME, TUMOUR_MAP_NAME], {INPUT_NAME: x})
    assert tumour_map.shape == (2, 1, SIZE // 8, SIZE // 8)
    with torch.inference_mode():
        expected_logits, _ = model(torch.from_numpy(x))
        expected_map = loc.Localiser.from_state(state)(*loc.trunk_maps(model, torch.from_numpy(x)))
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(tumour_map, expected_map.numpy(), atol=1e-4)


def test_export_without_a_localiser_has_no_tumour_map(model_and_localiser, tmp_path) -> None:
    model, _ = model_and_localiser
    proto = onnx.load(str(exporter.export(model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "plain.onnx")))
    assert TUMOUR_MAP_NAME not in [o.name for o in proto.graph.output]
    assert META_LOCALISATION not in {p.key for p in proto.metadata_props}


@pytest.mark.slow
def test_quantization_keeps_the_tumour_map_decoder_in_float(model_and_localiser, tmp_path) -> None:
    from model_export.data import scan_image_folder
    from model_export.quantize import head_node_names, quantize_model
    from tests.export.synthetic_mri import write_image_folder

    model, state = model_and_localiser
    path = exporter.export(model, LABELS, PreprocessSpec(size=SIZE), tmp_path / "loc.onnx", localiser=state)
    head = head_node_names(onnx.load(str(path)).graph)
    assert sum("conv" in name.lower() for name in head) == 7  # 3 projections + 4 decoder convolutions
    write_image_folder(tmp_path / "imgs", per_class=2, size=SIZE)
    out = quantize_model(path, tmp_path / "int8.onnx", scan_image_folder(tmp_path / "imgs"))
    x = exporter.parity_inputs(SIZE, 2, seed=4)
    fp32, int8 = (ort.InferenceSession(str(p)).run([TUMOUR_MAP_NAME], {INPUT_NAME: x})[0] for p in (path, out))
    assert int8.shape == fp32.shape and np.isfinite(int8).all()
