"""VGG16/19 (optionally with BatchNorm) for 32x32 CIFAR images, as in the SWA paper."""
import math

import torch
from torch import nn

CFGS = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(cfg: list, batch_norm: bool) -> nn.Sequential:
    layers, in_ch = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers.append(nn.Conv2d(in_ch, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_ch = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, depth: int = 16, num_classes: int = 10, batch_norm: bool = False):
        super().__init__()
        self.features = make_features(CFGS[depth], batch_norm)
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


ARCHS = {
    "VGG16": lambda num_classes: VGG(16, num_classes, batch_norm=False),
    "VGG16BN": lambda num_classes: VGG(16, num_classes, batch_norm=True),
    "VGG19": lambda num_classes: VGG(19, num_classes, batch_norm=False),
    "VGG19BN": lambda num_classes: VGG(19, num_classes, batch_norm=True),
}
