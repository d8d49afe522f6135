from pathlib import Path

import cv2
import numpy as np
import pytest

from model_export.data import shared_data_dir
from model_export.localisation import (
    Box,
    centre_prior,
    energy_inside,
    evaluate,
    figshare_test_rows,
    pointing_hit,
    summarise,
    to_markdown,
)
from tests.model_factory import build_model


def test_box_from_yolo_line_gives_corners_and_area():
    box = Box.from_yolo("0 0.5 0.25 0.2 0.1\n")
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((0.4, 0.2, 0.6, 0.3))
    assert box.area == pytest.approx(0.02)


def test_pointing_hit_when_peak_inside_box_only():
    box = Box(0.5, 0.5, 1.0, 1.0)  # bottom-right quarter
    heat = np.zeros((8, 8))
    heat[6, 7] = 1.0
    assert pointing_hit(heat, box)
    heat[1, 1] = 2.0
    assert not pointing_hit(heat, box)


def test_energy_inside_is_share_of_mass_in_box():
    box = Box(0.0, 0.0, 0.5, 1.0)  # left half
    assert energy_inside(np.ones((10, 10)), box) == pytest.approx(0.5)
    heat = np.zeros((10, 10))
    heat[:, :5] = 3.0
    assert energy_inside(heat, box) == pytest.approx(1.0)
    assert energy_inside(np.zeros((10, 10)), box) == 0.0
    assert energy_inside(-heat, box) == 0.0  # negative evidence is not energy


def test_centre_prior_peaks_in_the_middle_and_hits_central_boxes():
    prior = centre_prior(64)
    assert np.unravel_index(np.argmax(prior), prior.shape) in {(31, 31), (31, 32), (32, 31), (32, 32)}
    central, corner = Box(0.4, 0.4, 0.6, 0.6), Box(0.0, 0.0, 0.2, 0.2)
    result = summarise([prior, prior], [central, corner])
    assert result["pointing_game"] == pytest.approx(0.5)
    assert energy_inside(prior, central) > energy_inside(prior, corner)


def test_summarise_rejects_unpaired_inputs():
    with pytest.raises(ValueError):
        summarise([np.ones((2, 2))], [])


def _fake_figshare(root: Path, rows: int = 6) -> None:
    """A figshare-cheng-like folder: index.csv, images and YOLO boxes; half the rows in test."""
    rng = np.random.default_rng(0)
    fig = root / "figshare-cheng"
    lines = ["image,label,box,group,in_4class_splits"]
    for i in range(rows):
        label = ("glioma", "meningioma", "pituitary")[i % 3]
        (fig / "images" / label).mkdir(parents=True, exist_ok=True)
        (fig / "boxes" / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(fig / "images" / label / f"{i}.jpg"), rng.integers(0, 255, (48, 48), dtype=np.uint8))
        (fig / "boxes" / label / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 0.3 0.4\n")
        split = "test" if i % 2 else "train"
        lines.append(f"images/{label}/{i}.jpg,{label},boxes/{label}/{i}.txt,{100 + i},{split}")
    (fig / "index.csv").write_text("\n".join(lines) + "\n")


def test_evaluate_runs_service_cam_on_figshare_test_rows(tmp_path):
    _fake_figshare(tmp_path)
    rows = figshare_test_rows(tmp_path)
    assert [s.path.name for s, _ in rows] == ["1.jpg", "3.jpg", "5.jpg"]  # test rows only
    model = build_model(tmp_path / "model.onnx")
    result = evaluate(model, rows, batch_size=2)
    assert result["images"] == 3
    assert result["box_area_share"] == pytest.approx(0.12)
    # the centre box contains the image centre: the centre prior always points inside it.
    assert result["centre_prior"]["pointing_game"] == 1.0
    for key in ("cam_predicted_class", "cam_true_class"):
        assert 0.0 <= result[key]["pointing_game"] <= 1.0
        assert 0.0 <= result[key]["energy_in_box"] <= 1.0
    assert "| centre-of-image prior" in to_markdown(result)


DATA = shared_data_dir()


@pytest.mark.data
@pytest.mark.skipif(not (DATA / "figshare-cheng" / "index.csv").is_file(), reason="../shared/data is absent")
def test_figshare_test_rows_of_real_data_are_the_293_test_groups():
    rows = figshare_test_rows(DATA)
    assert len(rows) == 293
    assert {s.label for s, _ in rows} == {"glioma", "meningioma", "pituitary"}
    assert all(0 < b.area < 1 for _, b in rows)


def test_cam_on_image_covers_the_model_crop_only():
    from app.core.contract import Framing
    from model_export.localisation import cam_on_image

    features = np.ones((3, 4, 4), np.float32)  # a flat CAM over the whole model input
    weights = np.ones((2, 3), np.float32)
    # a version-2 framing: the model saw the square x 0-100, y 50-150 of a 400x200 image
    heat = cam_on_image(features, weights, 0, Framing(0.0, 50.0, 100.0), (400, 200), max_side=200)
    assert heat.shape == (100, 200)  # the image's aspect, long side 200
    assert heat[25:75, :50].min() > 0.99 and heat[:, 51:].max() == 0 and heat[:24].max() == 0
    whole = cam_on_image(features, weights, 0, Framing(0.0, 0.0, 400.0, height=200.0), (400, 200), max_side=200)
    assert whole.min() > 0.99  # version 1: the whole image
