"""CIFAR architectures used in the Trainable Weight Averaging experiments.

``ARCHS`` maps each name to a ``num_classes -> nn.Module`` constructor;
``build_model`` looks one up.
"""
from typing import Callable

from torch import nn

from . import preresnet, resnet, vgg, wide_resnet

ARCHS: dict[str, Callable[[int], nn.Module]] = {
    **vgg.ARCHS,
    **preresnet.ARCHS,
    **wide_resnet.ARCHS,
    **resnet.ARCHS,
}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Instantiate the architecture registered under ``arch`` with ``num_classes`` outputs."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](num_classes)
