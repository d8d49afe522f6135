"""The OOD guard measurement runs the non-brain set through the service's own engine."""

import pytest

from model_export import ood_check
from tests.model_factory import build_model


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp("m") / "ood.onnx", size=64, ood_threshold=1e9)
    return ood_check.check(path, data_dir=None)


def test_every_non_brain_image_is_predicted_and_summarised_by_source(result):
    nb = result["non_brain"]
    assert result["has_ood_output"] is True
    assert nb["images"] == sum(s["images"] for s in nb["by_source"].values()) > 100
    assert nb["flagged"] + len(nb["not_flagged"]) == nb["images"]
    assert result["brain"] == {}  # no data folder: the brain sets are skipped, not faked


def test_image_rules_flag_tiny_patches_and_headless_images_even_when_the_model_score_never_does(result):
    by_source = result["non_brain"]["by_source"]
    assert by_source["patch"]["flagged"] == by_source["patch"]["images"]  # all under 100 pixels
    assert by_source["patch"]["reasons"].get("small-image") == by_source["patch"]["images"]
    assert "model" not in result["non_brain"]["reasons"]  # threshold 1e9: the score never fires
    assert "synthetic/blank" not in result["non_brain"]["not_flagged"]  # no head in a blank image
