from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trp_edge.cli import main


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


@pytest.fixture(scope="session")
def compressed(tmp_path_factory) -> Path:
    """A TRP-compressed CIFAR ResNet-20 on 1x16x16 synthetic images (the layers of the real thing, tiny)."""
    out = tmp_path_factory.mktemp("model") / "resnet20"
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16", "--steps", "8",
                                    "--period", "4", "--batch", "32", "--scheme", "spatial", "--target-speedup", "2",
                                    "--out", str(out), "-q", "--no-latency"])
    assert res.exit_code == 0, res.output
    return out
