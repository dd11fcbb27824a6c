"""The ResNets: shapes, depth, and BatchNorm after every convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export import models


def _convs_followed_by_bn(model: nn.Module) -> tuple[int, int]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return len(convs), len(bns)


@pytest.mark.parametrize(
    ("arch", "convs", "params"),
    # He et al. 2016, table 6: 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters (option A shortcuts;
    # our 1x1 conv + BN projections add a little).
    [("resnet20", 21, 0.27e6), ("resnet32", 33, 0.46e6), ("resnet44", 45, 0.66e6), ("resnet56", 57, 0.85e6)],
)
def test_cifar_resnets_follow_the_paper(arch, convs, params):
    model = models.build_model(arch, 10)
    n_conv, n_bn = _convs_followed_by_bn(model)
    assert n_conv == n_bn == convs  # 6n+1 3x3 convs + 2 projection shortcuts... one BN each
    total = sum(p.numel() for p in model.parameters())
    assert params <= total <= params * 1.05
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_resnet110_depth():
    model = models.build_model("resnet110", 7)
    n_conv, n_bn = _convs_followed_by_bn(model)
    assert n_conv == n_bn == 6 * 18 + 1 + 2


@pytest.mark.parametrize("arch", models.IMAGENET_ARCHS)
def test_torchvision_resnets_have_batchnorm_everywhere_and_sized_classifier(arch):
    model = models.build_model(arch, 5)
    n_conv, n_bn = _convs_followed_by_bn(model)
    assert n_conv == n_bn
    assert model.fc.out_features == 5


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="resnet20"):
        models.build_model("resnet21", 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_missing_weights_file_names_that_archs_own_torchvision_file(arch, tmp_path, capsys):
    from tests.export.conftest import main_in_process

    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    code, _, err = main_in_process(
        capsys, "export", "--weights", tmp_path / "missing.pth", "--arch", arch, "--labels", labels,
        "--repository", tmp_path / "repo", "--name", "m",
    )  # fmt: skip
    own = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}
    assert code == 2 and "no such weights file" in err
    assert f"https://download.pytorch.org/models/{own[arch]}" in err
    assert not any(other in err for name, other in own.items() if name != arch)


def test_a_small_image_arch_has_no_torchvision_file_to_point_at():
    from export import train

    hint = train.weights_hint("resnet20")
    assert "torchvision publishes no resnet20 weights" in hint and "https://" not in hint
