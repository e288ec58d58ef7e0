"""Shape, gradient and size checks for every registered CIFAR architecture."""
import pytest
import torch

from models import ARCHS, build_model

# arch -> (exclusive lower bound, exclusive upper bound) on the parameter count
PARAM_RANGES = {
    "resnet20": (269_000, 275_000),
    "VGG16BN": (14_500_000, 15_500_000),
    "PreResNet164": (1_650_000, 1_750_000),
    "WideResNet28x10": (36_000_000, 37_000_000),
}


def test_registry_names():
    assert len(ARCHS) == 13
    assert {"VGG16", "VGG16BN", "VGG19", "VGG19BN", "PreResNet20", "PreResNet110",
            "PreResNet164", "WideResNet28x10", "WideResNet16x8",
            "resnet20", "resnet32", "resnet56", "resnet110"} == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_backward(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("arch", sorted(PARAM_RANGES))
def test_param_count(arch):
    low, high = PARAM_RANGES[arch]
    n = sum(p.numel() for p in build_model(arch, num_classes=10).parameters())
    assert low < n < high


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown --arch 'nope'") as err:
        build_model("nope", 10)
    for name in ARCHS:
        assert name in str(err.value)
