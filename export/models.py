"""The ResNets svertka trains and exports.

Two families, both with BatchNorm after every convolution as in the papers:

* ``resnet20/32/44/56/110`` — the CIFAR-style networks of He et al. 2016
  ("Deep Residual Learning", section 4.2) for small images: a 3x3 stem with
  16 filters, three stages of ``n`` basic blocks with 16/32/64 filters
  (depth = 6n + 2), global average pooling and one linear layer. Where a stage
  changes shape the shortcut is a 1x1 convolution followed by BatchNorm (the
  paper's option B), so that *every* convolution is followed by BatchNorm.
* ``resnet18/34/50/101/152`` — torchvision's ImageNet-style constructors,
  with the classifier sized to the dataset.

Nothing here downloads weights: fine-tuning reads a local state dict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = tuple(CIFAR_DEPTHS) + IMAGENET_ARCHS


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32-class images (He et al. 2016, section 4.2)."""

    def __init__(self, blocks_per_stage: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: each block starts as the
        # identity, which lets the short default schedule converge in few epochs.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def is_small_image_arch(arch: str) -> bool:
    """CIFAR-style archs expect small inputs (32x32); the others ImageNet-size ones."""
    return arch in CIFAR_DEPTHS


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``arch`` with a ``num_classes``-way classifier."""
    if arch in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[arch], num_classes)
    if arch in IMAGENET_ARCHS:
        import torchvision

        constructor: Callable[..., nn.Module] = getattr(torchvision.models, arch)
        return constructor(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def classifier_keys(arch: str) -> tuple[str, str]:
    """State-dict keys of the final linear layer (replaced when fine-tuning to new classes)."""
    return ("fc.weight", "fc.bias")


def count_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
