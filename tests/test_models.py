"""Shape, gradient and size checks for every registered CIFAR architecture."""
import pytest
import torch

from models import ARCHS, build_model

# arch -> (exclusive lower bound, exclusive upper bound) on the parameter count
PARAM_RANGES = {
    "resnet20": (269_000, 275_000),
    "VGG16BN": (14_500_000, 15_500_000),
    "PreResNet164": (1_650_000, 1_750_000),
    "WideResNet28x10": (46_000_000, 46_500_000),  # reference layout: 5 units per stage
}

# arch -> (state_dict length, first 3 keys, last 3 keys, one key from the middle); these names
# match the TWA reference code's checkpoints, so a rename breaks loading them with strict=True
STATE_KEYS = {
    "resnet20": (116, ["conv1.weight", "bn1.weight", "bn1.bias"],
                 ["blocks.8.bn2.num_batches_tracked", "fc.weight", "fc.bias"],
                 "blocks.3.conv1.weight"),
    "VGG16BN": (97, ["features.0.weight", "features.0.bias", "features.1.weight"],
                ["classifier.4.bias", "classifier.6.weight", "classifier.6.bias"],
                "features.41.running_var"),
    "PreResNet164": (983, ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias"],
                     ["bn.num_batches_tracked", "fc.weight", "fc.bias"],
                     "layer2.0.downsample.0.weight"),
    "WideResNet28x10": (191, ["f.0_convolution.weight",
                              "f.1_block.block.0.norm_act.0_normalization.weight",
                              "f.1_block.block.0.norm_act.0_normalization.bias"],
                        ["f.4_normalization.num_batches_tracked", "f.8_classification.weight",
                         "f.8_classification.bias"],
                        "f.2_block.block.4.block.6_convolution.weight"),
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


@pytest.mark.parametrize("arch", sorted(STATE_KEYS))
def test_state_dict_keys_pinned(arch):
    count, first, last, middle = STATE_KEYS[arch]
    with torch.device("meta"):  # names and order only: no memory, no initialisation cost
        keys = list(build_model(arch, num_classes=10).state_dict())
    assert (len(keys), keys[:3], keys[-3:]) == (count, first, last)
    assert middle in keys


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown --arch 'nope'") as err:
        build_model("nope", 10)
    for name in ARCHS:
        assert name in str(err.value)
