"""Models shared by the benchmark scripts."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (3 stages of 3 blocks, widths w, 2w, 4w)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width]):
            for j in range(3):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean((2, 3)))


def cifar_like(batches: int, batch_size: int, device, seed: int = 0):
    """CIFAR-shaped random batches (3x32x32 inputs, 10 classes), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (batch_size,), generator=g).to(device))
        for _ in range(batches)
    ]


def resnet20(device, seed: int = 0) -> nn.Module:
    """ResNet-20 in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ResNet20().to(device)
    with torch.no_grad():  # a few train-mode passes so the running statistics are not the identity
        model.train()
        for x, _ in cifar_like(3, 128, device, seed + 1):
            model(x)
    return model.eval()
