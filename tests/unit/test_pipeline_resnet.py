"""ResNet-50 module: torchvision names, v1 stride placement, outputs, freezing."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from model_export.resnet import FREEZE_CHOICES, ResNet50, apply_freeze, set_train_mode

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model() -> ResNet50:
    torch.manual_seed(0)
    return ResNet50(4, stride_in_1x1=True).eval()


def test_state_dict_uses_torchvision_names_and_sizes_when_built_with_1000_classes() -> None:
    state = ResNet50(1000).state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                "layer3.5.conv2.weight", "layer4.2.bn3.running_mean", "fc.weight", "fc.bias"):
        assert key in state
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 25_557_032


@pytest.mark.parametrize("stride_in_1x1, expected", [(True, ((2, 2), (1, 1))), (False, ((1, 1), (2, 2)))])
def test_downsampling_stride_sits_in_first_conv_only_for_v1(stride_in_1x1: bool, expected) -> None:
    block = ResNet50(2, stride_in_1x1=stride_in_1x1).layer2[0]
    assert (block.conv1.stride, block.conv2.stride) == expected


def test_forward_returns_logits_and_layer4_features(model: ResNet50) -> None:
    with torch.inference_mode():
        logits, features = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    assert features.shape == (2, 2048, 2, 2)


def test_forward_from_layer3_matches_full_forward(model: ResNet50) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        full = model(x)[0]
        split = model.forward_from_layer3(model.stem_to_layer3(x))[0]
    torch.testing.assert_close(full, split)


@pytest.mark.parametrize("freeze, trainable_prefixes", [
    ("head", {"fc"}),
    ("layer4", {"layer4", "fc"}),
    ("layer3", {"layer3", "layer4", "fc"}),
    ("none", {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
])
def test_freeze_leaves_only_the_named_stages_trainable(freeze: str, trainable_prefixes: set[str]) -> None:
    net = ResNet50(3)
    apply_freeze(net, freeze)
    trainable = {name.split(".")[0] for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == trainable_prefixes


def test_set_train_mode_keeps_frozen_batchnorm_in_eval() -> None:
    net = ResNet50(3)
    apply_freeze(net, "layer4")
    set_train_mode(net, "layer4")
    assert not net.layer3[0].bn1.training and not net.bn1.training
    assert net.layer4[0].bn1.training and net.dropout.training


def test_freeze_rejects_unknown_option() -> None:
    assert "everything" not in FREEZE_CHOICES
    with pytest.raises(ValueError, match="freeze must be one of"):
        apply_freeze(ResNet50(2), "everything")
