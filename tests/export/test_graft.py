"""``btd fit-localiser MODEL.onnx``: the decoder trained on ONNX Runtime's maps and grafted into the file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from app.core.contract import (
    INPUT_NAME,
    META_LOCALISATION,
    META_VERSION,
    TUMOUR_MAP_NAME,
    LocalisationSpec,
    PreprocessSpec,
)
from app.core.model import ModelFile
from model_export import export as exporter
from model_export import graft as gr
from model_export import localiser as loc
from model_export.options import FitLocaliserConfig
from model_export.resnet import ResNet50
from tests.export.synthetic_mri import LABELS, synthetic_slice

SIZE = 64
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[ResNet50, Path]:
    """A random ResNet50 exported as the shipped file is: float16-stored weights, an ood_score output."""
    torch.manual_seed(0)
    model = ResNet50(len(LABELS), stride_in_1x1=True).eval()
    path = exporter.export(model, LABELS, PreprocessSpec(size=SIZE), tmp_path_factory.mktemp("m") / "m.onnx",
                           fp16_weights=True, version="1.0.0", metrics={"accuracy": 0.5})
    return model, path


def _localiser(trunk: gr.OnnxTrunk, seed: int = 0) -> loc.Localiser:
    torch.manual_seed(seed)
    maps = trunk.maps(torch.from_numpy(exporter.parity_inputs(SIZE, 6, seed=seed)))[:3]
    projections = [loc.Projection.fit(m, 8) for m in maps]
    return exporter.round_to_fp16(loc.Localiser(projections, loc.TumourDecoder((8, 8, 8), 8)).eval())


def test_onnx_trunk_reads_the_layer2_3_4_maps_of_the_graph(exported) -> None:
    model, path = exported
    trunk = gr.OnnxTrunk(path)
    assert trunk.fp16 and trunk.names[2] == "features"
    x = torch.from_numpy(exporter.parity_inputs(SIZE, 2, seed=1))
    maps = trunk.maps(x)
    with torch.inference_mode():
        expected = loc.trunk_maps(exporter.round_to_fp16(exporter.fold_batchnorm(model)), x)
    assert [tuple(m.shape) for m in maps[:3]] == [(2, 512, 8, 8), (2, 1024, 4, 4), (2, 2048, 2, 2)]
    for got, want in zip(maps[:3], expected):
        scale = float(want.abs().max())
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-3 * scale)


def test_graft_adds_the_tumour_map_and_changes_nothing_else(exported) -> None:
    _, path = exported
    original = onnx.load(str(path))
    localiser = _localiser(gr.OnnxTrunk(path))
    grafted = gr.graft(original, localiser, LocalisationSpec(threshold=0.45, min_area=0.003), version="1.0.1")
    x = exporter.parity_inputs(SIZE, 3, seed=5)
    # every original output bit for bit; tumour_map = the torch decoder on ORT's own stage maps
    assert gr.check_graft(original, grafted, localiser, x)["tumour_map_max_abs_diff"] < 1e-4
    assert [o.name for o in grafted.graph.output] == [*(o.name for o in original.graph.output), TUMOUR_MAP_NAME]
    before = {p.key: p.value for p in original.metadata_props}
    after = {p.key: p.value for p in grafted.metadata_props}
    assert json.loads(after[META_LOCALISATION]) == {"threshold": 0.45, "min_area": 0.003}
    assert after[META_VERSION] == "1.0.1"
    assert before[META_VERSION] == "1.0.0" and META_LOCALISATION not in before
    assert {k: v for k, v in after.items() if k not in (META_LOCALISATION, META_VERSION)} == {
        k: v for k, v in before.items() if k != META_VERSION}  # labels, preprocess, ood, metrics... kept
    added = [i for i in grafted.graph.initializer if i.name.startswith(gr.PREFIX)]
    assert added and all(i.data_type == onnx.TensorProto.FLOAT16 for i in added)  # stored as the file stores


def test_a_grafted_model_can_be_grafted_again_and_is_read_by_the_service(exported, tmp_path) -> None:
    _, path = exported
    trunk = gr.OnnxTrunk(path)
    first = gr.graft(onnx.load(str(path)), _localiser(trunk, 0), LocalisationSpec())
    second_localiser = _localiser(trunk, 1)
    second = gr.graft(first, second_localiser, LocalisationSpec(threshold=0.3, min_area=0.0))
    assert len(second.graph.node) == len(first.graph.node)
    gr.check_graft(first, second, second_localiser, exporter.parity_inputs(SIZE, 2, seed=2))  # raises if off
    onnx.save(second, str(tmp_path / "g.onnx"))
    model = ModelFile.load(tmp_path / "g.onnx")
    assert model.localises and model.metadata.localisation == LocalisationSpec(threshold=0.3, min_area=0.0)


def test_graft_refuses_a_graph_without_a_resnet_trunk() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(  # image -> features by a pooling: no stage maps to find
        [helper.make_node("MaxPool", [INPUT_NAME], ["features"], kernel_shape=[32, 32], strides=[32, 32])],
        "toy", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)])
    with pytest.raises(gr.GraftError, match="512"):
        gr.stage_outputs(helper.make_model(graph), SIZE)


def _data_dir(root: Path) -> Path:
    """A miniature of lgg-tcga-flair (masks) and figshare-cheng (boxes): gliomas with the blob of
    ``synthetic_slice`` at (y 0.45, x 0.35), tumour-free slices with empty masks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    blob = (((yy - 0.45) ** 2 + (xx - 0.35) ** 2) < 0.1**2).astype(np.uint8) * 255
    splits = ("train", "train", "val", "test")
    flair, fig = root / "lgg-tcga-flair", root / "figshare-cheng"
    for sub in ("images", "masks"):
        (flair / sub).mkdir(parents=True)
    for sub in ("images", "boxes"):
        (fig / sub).mkdir(parents=True)
    lgg, boxes = ["path,label,split,mask"], ["image,label,box,group,in_4class_splits"]
    for i in range(16):
        label = "glioma" if i % 2 == 0 else "notumor"
        cv2.imwrite(str(flair / "images" / f"{i}.png"), synthetic_slice(label, rng, 96))
        cv2.imwrite(str(flair / "masks" / f"{i}.png"), blob if label == "glioma" else 0 * blob)
        lgg.append(f"images/{i}.png,{label},{splits[(i // 2) % 4]},masks/{i}.png")
    for i in range(8):
        cv2.imwrite(str(fig / "images" / f"{i}.png"), synthetic_slice("glioma", rng, 96))
        (fig / "boxes" / f"{i}.txt").write_text("0 0.35 0.45 0.22 0.22\n")
        boxes.append(f"images/{i}.png,glioma,boxes/{i}.txt,{i},{splits[i % 4]}")
    (flair / "index.csv").write_text("\n".join(lgg) + "\n")
    (fig / "index.csv").write_text("\n".join(boxes) + "\n")
    return root


def test_fit_localiser_on_an_onnx_file_trains_grafts_and_reuses_the_decoder(exported, tmp_path) -> None:
    _, path = exported
    data = _data_dir(tmp_path / "data")
    common = {"data_dir": data, "dim2": 8, "dim3": 8, "dim4": 8, "pca_images": 8, "width": 8, "epochs": 2,
              "batch_size": 8, "decoder_batch": 8, "threads": 2}
    config = FitLocaliserConfig(checkpoint=path, out=tmp_path / "grafted.onnx", version="1.0.1",
                                cache=tmp_path / "cache", report=tmp_path / "report.json",
                                save_decoder=tmp_path / "decoder.pt", **common)
    report = loc.main(config)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert {"lgg-flair", "figshare"} <= set(report["test"])
    assert report["test"]["figshare"]["images"] == 2 and report["graft"]["model_version"] == "1.0.1"
    grafted = ModelFile.load(tmp_path / "grafted.onnx")
    assert grafted.localises and grafted.metadata.localisation.threshold == report["threshold"]
    assert onnx.load(str(path)).graph.output[-1].name != TUMOUR_MAP_NAME  # the source was left alone

    # the saved decoder, reused on another file (here the grafted one: its trunk is the same), is
    # measured, not retrained: the same figures, and the same map in the new graft
    again = loc.main(FitLocaliserConfig(checkpoint=tmp_path / "grafted.onnx", out=tmp_path / "again.onnx",
                                        decoder=tmp_path / "decoder.pt", **common))
    assert again["test"] == report["test"] and again["threshold"] == report["threshold"]
    x = exporter.parity_inputs(SIZE, 2, seed=7)
    maps = [ort.InferenceSession(str(p)).run([TUMOUR_MAP_NAME], {INPUT_NAME: x})[0]
            for p in (tmp_path / "grafted.onnx", tmp_path / "again.onnx")]
    np.testing.assert_array_equal(*maps)


def test_checkpoint_only_options_are_refused_for_a_checkpoint(tmp_path) -> None:
    with pytest.raises(ValueError, match="onnx"):
        loc.main(FitLocaliserConfig(checkpoint=tmp_path / "best.pt", version="1.0.1"))
