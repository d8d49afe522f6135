"""The ``btd`` dispatcher: help, lazy imports, clear errors."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from model_export import cli


def test_importing_the_cli_loads_neither_torch_nor_fastapi() -> None:
    code = "import sys, model_export.cli; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_lists_the_pipeline_subcommands(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "export", "quantize"):
        assert command in out


def test_train_help_documents_freeze_options_and_the_cpu_cache(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "{head,layer4,layer3,none}" in out and "--feature-cache" in out and "torchrun" in out


def test_missing_data_folder_is_a_clear_error_not_a_traceback(tmp_path, caplog) -> None:
    code = cli.main(["train", "--data", str(tmp_path / "nowhere"), "--no-pretrained"])
    assert code == 2
    assert "does not exist" in caplog.text


def test_subcommand_is_required(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_quantize_calibrates_on_training_images_within_the_limit_per_class(tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    from model_export import quantize
    from tests.export.synthetic_mri import write_image_folder, write_split_file

    paths = write_image_folder(tmp_path / "imgs", per_class=8, size=32)
    split_file = write_split_file(tmp_path / "imgs", paths, tmp_path / "splits.csv")
    seen = {}

    def fake_quantize(source, out, calibration):
        seen["calibration"] = list(calibration)
        return out

    monkeypatch.setattr(quantize, "quantize_model", fake_quantize)
    code = cli.main(["quantize", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "imgs"), "--split-file",
                     str(split_file), "--limit-per-class", "2"])
    assert code == 0
    calibration = seen["calibration"]
    assert {s.split for s in calibration} == {"train"}
    assert sorted(Counter(s.label for s in calibration).values()) == [2, 2, 2, 2]
