"""torchvision classification models by name: built from torchvision's own registry, decomposed exactly at full
rank and to 2x fewer MACs, exported to ONNX and checked in onnxruntime, rebuilt from compressed.pt's spec.

Two small builders (grouped convs with channel shuffle; versioned state_dict loading) at 32x32 inputs, through
compressed.pt and back; every family of the registry goes through the decomposition in tests/test_zoo_sweep.py."""

import copy

import pytest
import torch
from torch import nn

from trp_edge.config import DecomposeConfig
from trp_edge.export import export_onnx
from trp_edge.flops import count_macs
from trp_edge.lowrank import conv_layers, get_scheme, make_pair
from trp_edge.models import build, builtin_spec, compressed_payload, load_model, torchvision_builders
from trp_edge.planning import decompose_

SMALL = ["mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5"]
RELOADED = ["shufflenet_v2_x0_5", "mnasnet0_5"]  # grouped convs; versioned state_dict loading (the rest: the sweep)


def test_the_names_come_from_torchvision_registry():
    names = torchvision_builders()
    assert set(SMALL) <= set(names) and "resnet18" in names and len(names) >= 60


# 32x32 torchvision nets decomposed, exported and checked in onnxruntime (5-7 s of CPU each)
@pytest.mark.slow
@pytest.mark.parametrize("name", RELOADED)
def test_a_torchvision_model_decomposes_exports_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    spec = builtin_spec(name, in_channels=1, num_classes=10)
    model = build(spec).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
    cfg = DecomposeConfig(scheme="channel")
    layers = [la for la in conv_layers(model, x, cfg) if la.reason is None]
    assert layers
    full = copy.deepcopy(model)
    for la in layers:  # every eligible conv at full rank: the same function
        k = min(get_scheme("channel").to_matrix(la.module.weight).shape)
        full.set_submodule(la.name, make_pair(la.module, "channel", k))
    with torch.no_grad():
        assert (full(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    dense = count_macs(model, x).total
    other = dense - sum(la.macs_dense for la in conv_layers(model, x, cfg))
    plans, _ = decompose_(model, DecomposeConfig(scheme="channel", target_speedup=2.0), x, other_macs=other)
    assert dense / count_macs(model, x).total >= 2.0
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()) <= \
        any(p.reason and p.reason.startswith("grouped") for p in plans)  # grouped convs stay dense, with why
    assert export_onnx(model, x, tmp_path / "model.onnx") <= 1e-3  # checked in onnxruntime against torch
    ranks = {p.name: p.rank for p in plans if p.rank is not None}
    torch.save(compressed_payload(model, spec, "channel", ranks), tmp_path / "compressed.pt")
    again = load_model(str(tmp_path / "compressed.pt")).model.eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_by_name_through_load_model():
    m = load_model("mobilenet_v3_small", in_channels=1, num_classes=4)
    assert m.spec == {"name": "mobilenet_v3_small", "family": "torchvision", "builder": "mobilenet_v3_small",
                      "in_channels": 1, "num_classes": 4}
    assert m.model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


def test_a_state_dict_with_arch(tmp_path):
    torch.save(build(builtin_spec("squeezenet1_1", num_classes=7)).state_dict(), tmp_path / "sq.pt")
    m = load_model(str(tmp_path / "sq.pt"), arch="squeezenet1_1")
    assert m.spec["num_classes"] == 7 and m.spec["in_channels"] == 3  # from the weights' shapes


# SqueezeNet through compress and an ORT build with its checks
@pytest.mark.slow
def test_a_torchvision_model_goes_through_compress_and_build(tmp_path):
    """The output folder records the architecture, so its dense.pt (a plain state_dict) builds and validates
    with no --arch, as for the ResNets whose architecture is inferred."""
    from click.testing import CliRunner

    from trp_edge.cli import main

    out = tmp_path / "sq"
    res = CliRunner().invoke(main, ["compress", "squeezenet1_1", "--steps", "0", "--input-size", "32",
                                    "--num-classes", "10", "--target-speedup", "2", "--no-latency", "-q",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert load_model(str(out / "dense.pt")).spec["family"] == "torchvision"
    res = CliRunner().invoke(main, ["build", str(out), "--target", "host", "--runtime", "ort", "--no-int8", "-q"])
    assert res.exit_code == 0, res.output
    assert res.output.count("passed (native") == 2, res.output
