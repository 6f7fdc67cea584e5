"""Model sources beyond the built-in names: state_dicts of any torchvision architecture and of CIFAR ResNets in the
layouts CIFAR code bases save (inferred, no --arch), torch.export programs, user modules through the Python API,
and pickled modules of any class; their outputs reload without the user's code."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import trp_edge
from trp_edge.cli import main
from trp_edge.config import CompressConfig, TRPConfig
from trp_edge.data import synthetic
from trp_edge.errors import ConfigError, InputError
from trp_edge.models import build, builtin_spec, infer_spec, load_model
from trp_edge.models.cifar import CifarResNet
from trp_edge.workflows.compress import load_stage


class UserNet(nn.Module):
    """A CNN trp-edge has no builder for: plain, grouped and 1x1 convs, batch norms, a residual add."""

    def __init__(self, in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU())
        self.proj = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        y = self.body(self.stem(x))
        y = y + self.proj(y)
        return self.head(y.mean((2, 3)))


def _export(model: nn.Module, path, size: int = 28):
    x = torch.randn(2, 1, size, size)
    program = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


def _same(a: nn.Module, b: nn.Module, shape=(3, 1, 28, 28)) -> bool:
    x = torch.randn(*shape)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


@pytest.mark.parametrize("layout", [
    {"shortcut": "B", "head": "linear"},  # akamaster's pytorch_resnet_cifar10, option B
    {"shortcut": "B", "shortcut_name": "downsample", "bottleneck": True},  # the TRP authors' code base
])
def test_an_option_b_cifar_resnet56_checkpoint_loads_without_arch(layout, tmp_path):
    model = CifarResNet(9, 100, 3, **layout).eval()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DataParallel
    torch.save({"state_dict": sd, "epoch": 164, "best_prec1": 71.2}, tmp_path / "ckpt.pth.tar")
    loaded = load_model(str(tmp_path / "ckpt.pth.tar"))
    assert loaded.spec["name"] == "resnet56" and loaded.spec["num_classes"] == 100
    assert all(loaded.spec[k] == v for k, v in layout.items())
    assert _same(loaded.model, model, (2, 3, 32, 32))


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "regnet_x_400mf", "vgg11_bn",
                                  "wide_resnet50_2", "densenet121"])
def test_a_torchvision_state_dict_names_its_architecture(name):
    sd = build(builtin_spec(name, 1, 7)).state_dict()
    spec = infer_spec(sd)
    assert (spec["name"], spec["in_channels"], spec["num_classes"]) == (name, 1, 7)


def test_prefixed_keys_are_unwrapped(tmp_path):
    sd = build(builtin_spec("mobilenet_v3_small", 3, 5)).state_dict()
    torch.save({"model": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "m.pt")
    assert load_model(str(tmp_path / "m.pt")).spec["name"] == "mobilenet_v3_small"


def test_a_state_dict_that_matches_nothing_names_the_nearest():
    sd = build(builtin_spec("mobilenet_v2")).state_dict()
    sd.pop("features.1.conv.0.0.weight")
    with pytest.raises(InputError) as e:
        infer_spec(sd)
    msg = str(e.value)
    assert "\n" not in msg and "nearest: mobilenet_v2" in msg and "1 missing (first features.1.conv.0.0.weight)" in msg
    assert "--trust-pickle" in msg and ".pt2" in msg


# about 17 s of CPU: TRP steps, ONNX exports and torch.export of a 28x28 net
@pytest.mark.slow
def test_the_python_api_compresses_any_module(tmp_path):
    torch.manual_seed(0)
    mine = UserNet()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    out = tmp_path / "out"
    res = trp_edge.compress(mine, data="synthetic:1x28x28", scheme="channel", steps=4, batch=32, energy=0.3,
                            out=str(out), latency=False, calibrate=False)  # MAC-based: the same ranks on any CPU
    small = res.model
    assert isinstance(res, trp_edge.CompressResult) and res.out == out and isinstance(small, UserNet)
    assert all(torch.equal(before[k], v) for k, v in mine.state_dict().items())
    assert {"dense.pt2", "compressed.pt2", "model.onnx", "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["arch"]["family"] == "export" and report["training"]["steps"] == 4
    grouped = next(la for la in report["layers"] if la["name"] == "body.3")
    assert grouped["rank"] is None and grouped["reason"].startswith("grouped")
    again = load_model(str(out))  # the program, its pairs regrouped: no UserNet class needed
    assert again.lowrank["layers"] and set(again.lowrank["layers"]) <= {"stem.0", "body.0", "proj"}
    assert type(again.model.get_submodule(next(iter(again.lowrank["layers"])))).__name__ == "LowRankConv2d"
    assert _same(again.model, small)
    with pytest.raises(ConfigError, match="unknown options"):
        trp_edge.compress(mine, data="synthetic:1x28x28", epochz=1)


def test_a_program_is_lifted_to_trainable_convs(tmp_path):
    torch.manual_seed(0)
    net = UserNet()
    _export(net, tmp_path / "net.pt2")
    loaded = load_model(str(tmp_path / "net.pt2"))
    convs = {n for n, m in loaded.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == {"stem.0", "body.0", "body.3", "proj"}  # named after their weights
    assert loaded.spec["input_size"] == 28 and loaded.spec["num_classes"] == 10
    assert _same(loaded.model, net)
    loaded.model.train()  # batch norms are modules again: training updates their statistics
    bn = loaded.model.get_submodule("stem.1")
    mean = bn.running_mean.clone()
    loaded.model(torch.randn(8, 1, 28, 28))
    assert not torch.equal(mean, bn.running_mean)


@pytest.mark.slow
def test_a_program_goes_through_compress_build_and_deploy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _export(UserNet(), tmp_path / "net.pt2")
    run = CliRunner().invoke
    r = run(main, ["compress", "net.pt2", "--data", "fashion-mnist", "--steps", "3", "--batch", "32", "-e", "0.3",
                   "-o", "out", "--no-latency", "--no-calibrate", "-q"])  # MAC-based ranks, whatever this CPU
    assert r.exit_code == 0, r.output
    assert "dense.pt2, compressed.pt2" in r.output
    r = run(main, ["build", "out", "--target", "host", "--runtime", "ort", "--calib-images", "8",
                   "--eval-images", "16"])
    assert r.exit_code == 0, r.output
    r = run(main, ["deploy", "--target", "host", "--local", "--runtime", "ort", "--precision", "fp32", "-m", "out"])
    assert r.exit_code == 0, r.output
    assert "host/ort fp32 (1 thread): dense" in r.output
    rep = json.loads(next((tmp_path / "reports" / "host").glob("out-ort-*.json")).read_text())
    decomposed = [la for la in rep["layers"] if la["rank"] is not None]
    assert decomposed and all(la["dense_ms"] and la["compressed_ms"] for la in decomposed)  # kernels mapped back


def test_a_pickled_module_of_any_class_is_used_as_itself(tmp_path):
    torch.manual_seed(0)
    net = UserNet()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(str(tmp_path / "whole.pt"))
    loaded = load_model(str(tmp_path / "whole.pt"), trust_pickle=True, input_size=28)
    assert isinstance(loaded.model, UserNet) and loaded.spec["family"] == "export"
    assert _same(loaded.model, net)


def test_synthetic_and_unsized_inputs_follow_the_model(tmp_path):
    for name, size in (("resnet20", 32), ("mobilenet_v3_small", 224)):
        run = load_stage(CompressConfig(model=name, data="synthetic", trp=TRPConfig(steps=0), latency=None,
                                        out=str(tmp_path / name)))
        assert run.example.shape[-1] == size and run.data.image_size == size


def test_a_pickle_whose_class_cannot_be_imported_says_why(tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("gone_mod")
    exec("from torch import nn\nclass Gone(nn.Module):\n    def forward(self, x):\n        return x", mod.__dict__)
    monkeypatch.setitem(sys.modules, "gone_mod", mod)
    torch.save(mod.Gone(), tmp_path / "g.pt")
    monkeypatch.delitem(sys.modules, "gone_mod")
    with pytest.raises(InputError, match="must be importable here"):
        load_model(str(tmp_path / "g.pt"), trust_pickle=True)


# about 24 s of CPU: a compress whose accuracy runs at batch 1
@pytest.mark.slow
def test_a_program_with_a_fixed_batch_is_refused_for_training(tmp_path):
    program = torch.export.export(UserNet().eval(), (torch.randn(1, 1, 28, 28),))  # batch fixed at 1
    torch.export.save(program, str(tmp_path / "fixed.pt2"))
    cfg = CompressConfig(model=str(tmp_path / "fixed.pt2"), data="synthetic:1x28x28", out=str(tmp_path / "o"),
                         trp=TRPConfig(steps=2, batch=8), latency=None)
    with pytest.raises(InputError, match="fixed batch of 1"):
        trp_edge.compress(cfg)
    cfg = CompressConfig(model=str(tmp_path / "fixed.pt2"), data="synthetic:1x28x28", out=str(tmp_path / "o2"),
                         trp=TRPConfig(steps=0), latency=None, calibrate=False)
    res = trp_edge.compress(cfg)  # decomposing without training still works, accuracy at batch 1
    assert res.report.mac_speedup >= 1.0
    test = synthetic("1x28x28", seed=0).test  # the test split, normalized here, one image at a time
    x = (test.x.float() / 255.0 - 0.5) / 0.25
    with torch.no_grad():
        correct = sum(int(res.model.eval()(x[i:i + 1]).argmax(1)) == int(test.y[i]) for i in range(len(test.y)))
    assert len(test.y) == 256 and res.report.compressed["accuracy"] == pytest.approx(100.0 * correct / 256)
    program = torch.export.export(UserNet().eval(), (torch.randn(3, 1, 28, 28),))
    torch.export.save(program, str(tmp_path / "fixed3.pt2"))
    with pytest.raises(InputError, match="fixed batch of 3; .* export it with batch 1"):
        load_model(str(tmp_path / "fixed3.pt2"))
