import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """Three convs (a stem, a strided 3x3, an asymmetric 3x5) and a classifier, for 16x16 inputs."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(16, 16, (3, 5), padding=(1, 2))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny():
    return TinyNet()
