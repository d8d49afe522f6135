"""ResNet-50 with torchvision's module names, a classification head, and trunk freezing.

Module names match torchvision (``conv1``, ``bn1``, ``layer1``..``layer4`` of ``Bottleneck``
blocks with ``conv1/bn1/conv2/bn2/conv3/bn3/downsample``, ``fc``), so state dicts and
tooling written for torchvision read this model. ``stride_in_1x1=True`` is the original
ResNet v1 layout (stride 2 in the first 1x1 conv of a down-sampling block), which the
Keras ImageNet weights need; torchvision's v1.5 puts it in the 3x3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FEATURE_CHANNELS = 2048
STAGES = ("layer1", "layer2", "layer3", "layer4")
# What each freeze option leaves trainable (everything before it is frozen, BN in eval mode).
FREEZE_CHOICES = ("none", "layer3", "layer4", "head")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        stride_in_1x1: bool = False,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 trunk + head (dropout, linear). ``forward`` returns ``(logits, features)``,
    ``features`` being layer4's output map, which the service uses for the CAM."""

    def __init__(
        self,
        num_classes: int,
        *,
        dropout: float = 0.2,
        stride_in_1x1: bool = True,
        bn_eps: float = 1e-5,
        layers: Sequence[int] = (3, 4, 6, 3),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            stage, in_channels = _make_stage(in_channels, width, blocks, stride, stride_in_1x1, bn_eps)
            setattr(self, STAGES[index], stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(FEATURE_CHANNELS, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: blocks start as identity
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def stem_to_layer3(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(features), 1)))

    def forward_from_layer3(self, layer3_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.layer4(layer3_out)
        return self.head(features), features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_from_layer3(self.stem_to_layer3(x))


def _make_stage(
    in_channels: int, width: int, blocks: int, stride: int, stride_in_1x1: bool, bn_eps: float
) -> tuple[nn.Sequential, int]:
    out_channels = width * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels, eps=bn_eps),
        )
    layers = [Bottleneck(in_channels, width, stride, downsample, stride_in_1x1=stride_in_1x1, bn_eps=bn_eps)]
    layers += [
        Bottleneck(out_channels, width, stride_in_1x1=stride_in_1x1, bn_eps=bn_eps) for _ in range(1, blocks)
    ]
    return nn.Sequential(*layers), out_channels


def frozen_modules(model: ResNet50, freeze: str) -> list[nn.Module]:
    """The modules that ``freeze`` keeps fixed: "head" trains only fc, "layer4" trains layer4+fc,
    "layer3" trains layer3+layer4+fc, "none" trains everything."""
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze must be one of {FREEZE_CHOICES}, got {freeze!r}")
    trunk = [model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4]
    keep_trainable = {"none": 0, "layer3": 2, "layer4": 1, "head": 0}[freeze]
    if freeze == "none":
        return []
    return trunk[: len(trunk) - keep_trainable]


def apply_freeze(model: ResNet50, freeze: str) -> None:
    """Stop gradients through the frozen modules. Their BatchNorm statistics are kept fixed by
    :func:`set_train_mode`, which training calls instead of ``model.train()``."""
    for p in model.parameters():
        p.requires_grad_(True)
    for module in frozen_modules(model, freeze):
        for p in module.parameters():
            p.requires_grad_(False)


def set_train_mode(model: ResNet50, freeze: str) -> None:
    """``model.train()``, except that frozen modules stay in eval mode (fixed BN statistics)."""
    model.train()
    for module in frozen_modules(model, freeze):
        module.eval()


def load_backbone(model: ResNet50, state: dict[str, torch.Tensor]) -> None:
    """Load a pretrained trunk, leaving the (new, differently sized) head as initialised."""
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"pretrained weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
