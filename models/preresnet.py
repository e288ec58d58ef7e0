"""Pre-activation ResNets for CIFAR (He et al., 2016, "Identity Mappings in Deep Residual Nets")."""
import math

import torch
from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


# Shortcuts, identity or projection (first block of a stage), take the block's raw input, as in
# the SWA/TWA reference code, so that its checkpoints load and compute the same here. The
# projection is a one-element Sequential named ``downsample`` for the same reason: state_dict keys
# (``layerK.0.downsample.0.weight``) match the reference's.
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.bn2(self.conv1(act))))
        return out + identity


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.bn2(self.conv1(act))))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + identity


class PreResNet(nn.Module):
    def __init__(self, depth: int = 110, num_classes: int = 10, bottleneck: bool = False):
        super().__init__()
        per_block = 9 if bottleneck else 6
        if (depth - 2) % per_block:
            raise ValueError(f"PreResNet depth must be {per_block}n+2, got {depth}")
        block, n = (Bottleneck if bottleneck else BasicBlock), (depth - 2) // per_block
        self.in_ch = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n_fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n_fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self.in_ch, out_ch, 1, stride=stride, bias=False))
        layers = [block(self.in_ch, planes, stride, downsample)]
        self.in_ch = out_ch
        layers += [block(out_ch, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


ARCHS = {
    "PreResNet20": lambda num_classes: PreResNet(20, num_classes),
    "PreResNet110": lambda num_classes: PreResNet(110, num_classes, bottleneck=True),
    "PreResNet164": lambda num_classes: PreResNet(164, num_classes, bottleneck=True),
}
