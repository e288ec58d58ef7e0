"""Wide Residual Networks for CIFAR (Zagoruyko & Komodakis, 2016), pre-activation blocks."""
import torch
from torch import nn


class WideBasic(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        # as in the original WRN, a projection shortcut shares the block's pre-activation
        identity = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(act)
        out = self.conv2(self.relu(self.bn2(self.dropout(self.conv1(act)))))
        return out + identity


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        stages, in_ch = [], widths[0]
        for out_ch, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                stages.append(WideBasic(in_ch, out_ch, stride if i == 0 else 1, dropout))
                in_ch = out_ch
        self.blocks = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


ARCHS = {
    "WideResNet28x10": lambda num_classes: WideResNet(28, 10, num_classes),
    "WideResNet16x8": lambda num_classes: WideResNet(16, 8, num_classes),
}
