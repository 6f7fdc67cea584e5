import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trp_edge.cli import main

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _calibration(tmp_path_factory):
    """compress measures the latency tables it is missing: in a folder of the session, never the checkout's
    calibration/ (the committed tables stay as they are)."""
    os.environ["TRP_EDGE_CALIBRATION"] = str(tmp_path_factory.mktemp("calibration"))


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
                                    "--out", str(out), "-q", "--no-latency", "--no-calibrate"])
    assert res.exit_code == 0, res.output
    return out


EXE = str(Path(sys.executable).with_name("trp-edge"))


def stop(p: subprocess.Popen) -> None:
    """The server and tracker run in TVM worker processes: stop the whole process group."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], ready: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - closed with the process
    keep = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}  # a worktree's code, not the install's
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **keep,
                              **(env or {})})
    for _ in range(300):
        if ready in log.read_text():
            return p
        if p.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    stop(p)
    raise RuntimeError(f"not ready: {log.read_text()}")


def start_tracker(log: Path) -> tuple[str, subprocess.Popen]:
    """A TVM RPC tracker on 127.0.0.1, once it accepts connections: (HOST:PORT, its process)."""
    port = free_port()
    p = start([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end",
               str(port + 1)], "", log)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return f"127.0.0.1:{port}", p


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A trp-edge serve reached directly at 127.0.0.1:port."""
    port = free_port()
    p = start([EXE, "serve", "--port", str(port)], "listening on", tmp_path_factory.mktemp("serve") / "log")
    yield port
    stop(p)
