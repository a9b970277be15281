"""The paper's two MNIST models, with its exact layer sizes."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MnistFC(nn.Module):
    """The paper's "simple FC": 784-512-512-10 with ReLU and dropout 0.2 after each hidden layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, num_classes)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(torch.relu(self.fc1(self.flatten(x))))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.fc3(x)


class MnistConv(nn.Module):
    """The paper's "simple conv": conv 1->20 5x5, pool 2, conv 20->50 5x5, pool 2, FC 800->500, FC 500->10.

    ReLU after both convolutions and the first FC layer (as the original code). For 28x28 inputs
    the flattened feature size is 50 * 4 * 4 = 800.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
