"""Wide Residual Networks for CIFAR (Zagoruyko & Komodakis, 2016), pre-activation units.

Module names and unit counts follow the TWA reference code so that its checkpoints load here
with ``strict=True``: the whole network is the Sequential ``f``, and the children of every
named Sequential are called ``"<position>_<kind>"`` (``f.1_block.block.0.block.0_convolution``).
Each stage holds one projection unit plus ``(depth - 4) // 6`` identity units, i.e. one unit
more than the paper's WRN-d-k: "WideResNet28x10" has the layout (46.2M parameters) of a
WRN-34-10, and "WideResNet16x8" that of a WRN-22-8.
"""
from collections import OrderedDict

import torch
from torch import nn


def _named(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    """A Sequential of ``(kind, module)`` pairs, each child named ``"<position>_<kind>"``."""
    return nn.Sequential(OrderedDict((f"{i}_{kind}", m) for i, (kind, m) in enumerate(layers)))


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class IdentityUnit(nn.Module):
    """BN-ReLU-conv-BN-ReLU-dropout-conv residual branch added to the unchanged input."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.block = _named(
            ("normalization", nn.BatchNorm2d(channels)),
            ("activation", nn.ReLU(inplace=True)),
            ("convolution", conv3x3(channels, channels)),
            ("normalization", nn.BatchNorm2d(channels)),
            ("activation", nn.ReLU(inplace=True)),
            ("dropout", nn.Dropout(dropout)),
            ("convolution", conv3x3(channels, channels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ProjectionUnit(nn.Module):
    """First unit of a stage: one pre-activation feeds both the residual branch and a
    strided 1x1 projection shortcut, as in the original WRN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.norm_act = _named(("normalization", nn.BatchNorm2d(in_ch)),
                               ("activation", nn.ReLU(inplace=True)))
        self.block = _named(
            ("convolution", conv3x3(in_ch, out_ch, stride)),
            ("normalization", nn.BatchNorm2d(out_ch)),
            ("activation", nn.ReLU(inplace=True)),
            ("dropout", nn.Dropout(dropout)),
            ("convolution", conv3x3(out_ch, out_ch)),
        )
        self.downsample = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.norm_act(x)
        return self.block(act) + self.downsample(act)


class Stage(nn.Module):
    """A projection unit followed by ``identity_units`` identity units, kept under ``block``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, identity_units: int,
                 dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(ProjectionUnit(in_ch, out_ch, stride, dropout),
                                   *(IdentityUnit(out_ch, dropout) for _ in range(identity_units)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.f = _named(
            ("convolution", conv3x3(3, widths[0])),
            ("block", Stage(widths[0], widths[1], 1, n, dropout)),
            ("block", Stage(widths[1], widths[2], 2, n, dropout)),
            ("block", Stage(widths[2], widths[3], 2, n, dropout)),
            ("normalization", nn.BatchNorm2d(widths[3])),
            ("activation", nn.ReLU(inplace=True)),
            ("pooling", nn.AdaptiveAvgPool2d(1)),
            ("flattening", nn.Flatten()),
            ("classification", nn.Linear(widths[3], num_classes)),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


ARCHS = {
    "WideResNet28x10": lambda num_classes: WideResNet(28, 10, num_classes),
    "WideResNet16x8": lambda num_classes: WideResNet(16, 8, num_classes),
}
