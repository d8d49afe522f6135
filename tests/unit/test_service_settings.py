"""BTD_* settings: parsed from the environment, validated fail-fast; `python -m app` explains problems."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import DEFAULT_MODEL_PATH, InvalidSettings, Settings, env_name, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_settings_read_btd_environment(monkeypatch):
    monkeypatch.setenv("BTD_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("BTD_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("BTD_TRT_FP16", "true")
    monkeypatch.setenv("BTD_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("BTD_MULTIFRAME", "first")
    settings = Settings()
    assert settings.max_batch_size == 4 and settings.trt_fp16 is True and settings.log_level == "debug"
    assert settings.multiframe == "first"
    assert settings.provider_list() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_settings_defaults_point_at_the_shipped_model():
    settings = Settings()
    assert settings.model_path == DEFAULT_MODEL_PATH and settings.model_path.name == "btd-resnet50.onnx"
    assert settings.provider_list() is None and settings.tumour_threshold is None


@pytest.mark.parametrize("name,value", [("BTD_MAX_BATCH_SIZE", "0"), ("BTD_PORT", "99999"),
                                        ("BTD_PROVIDERS", "cuda"), ("BTD_TUMOUR_THRESHOLD", "1.5"),
                                        ("BTD_REQUEST_TIMEOUT_S", "0"), ("BTD_LOG_LEVEL", "chatty"),
                                        ("BTD_MULTIFRAME", "all"), ("BTD_BATCH_BUCKETS", "1,x"),
                                        ("BTD_BATCH_BUCKETS", "0,4"), ("BTD_HOST_WORKERS", "-1"),
                                        ("BTD_HOST_WORKERS", "many"), ("BTD_MODEL_VARIANT", "bf16"),
                                        ("BTD_MAX_QUEUE_WAIT_MS", "0")])
def test_settings_reject_bad_values(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def _run_app(env_extra: dict) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "app"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def test_main_explains_a_missing_model(tmp_path):
    proc = _run_app({"BTD_MODEL_PATH": str(tmp_path / "absent.onnx")})
    assert proc.returncode == 2
    assert "no model file" in proc.stderr and "BTD_MODEL_PATH" in proc.stderr and "model_factory" in proc.stderr


def test_invalid_settings_are_named_by_their_variables(monkeypatch):
    monkeypatch.setenv("BTD_MAX_BATCH_SIZE", "eight")
    monkeypatch.setenv("BTD_PROVIDERS", "cuda")
    with pytest.raises(InvalidSettings) as caught:
        load_settings()
    providers, batch = str(caught.value).splitlines()  # in the order the settings are declared
    assert batch.startswith("BTD_MAX_BATCH_SIZE='eight': ") and "valid integer" in batch
    assert providers == "BTD_PROVIDERS='cuda': not an execution provider name: cuda (e.g. " \
        "TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider)"


def test_every_setting_is_named_by_its_variable():
    assert env_name("max_batch_size") == "BTD_MAX_BATCH_SIZE"
    for field in Settings.model_fields:
        assert env_name(field) == f"BTD_{field.upper()}"


def test_main_rejects_invalid_settings_naming_the_variable():
    proc = _run_app({"BTD_MAX_WAIT_MS": "-1"})
    assert proc.returncode == 2
    assert "BTD_MAX_WAIT_MS='-1': Input should be greater than or equal to 0" in proc.stderr
    assert "max_wait_ms" not in proc.stderr and "Traceback" not in proc.stderr


def test_settings_become_the_cores_options_in_one_place(monkeypatch):
    monkeypatch.setenv("BTD_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("BTD_HOST_WORKERS", "3")
    monkeypatch.setenv("BTD_MODEL_VARIANT", "int8")
    monkeypatch.setenv("BTD_CUDA_GRAPH", "true")
    monkeypatch.setenv("BTD_MAX_QUEUE_WAIT_MS", "250")
    settings = Settings()
    engine, service = settings.engine_options(), settings.service_options()
    assert engine.runtime.buckets == (1, 2, 4, 8, 12) and engine.runtime.cuda_graph and engine.variant == "int8"
    assert service.host_workers == 3 and service.max_queue_wait_s == 0.25
    # A host task's own limit (10 s by default), never longer than the whole request may take.
    assert service.host_task_timeout_s == min(settings.host_task_timeout_s, settings.request_timeout_s) == 10.0
    assert service.host_memory_limit_bytes == settings.host_memory_limit_bytes
    assert service.decode_budget_bytes == settings.decode_budget_bytes and service.max_pixels == settings.max_pixels
    monkeypatch.setenv("BTD_BATCH_BUCKETS", "32, 4,1")  # above the largest batch: dropped; the largest added
    assert Settings().engine_options().runtime.buckets == (1, 4, 12)
    monkeypatch.setenv("BTD_HOST_WORKERS", "auto")
    assert Settings().service_options().host_workers is None


def test_max_wait_is_auto_unless_set(monkeypatch):
    assert Settings().max_wait_ms == "auto" and Settings().service_options().max_wait_s is None
    monkeypatch.setenv("BTD_MAX_WAIT_MS", "5")
    assert Settings().service_options().max_wait_s == 0.005
    monkeypatch.setenv("BTD_MAX_WAIT_MS", "0")
    assert Settings().service_options().max_wait_s == 0.0
