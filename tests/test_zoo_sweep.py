"""The zoo sweep (tools/zoo_sweep.py) in the suite: from each family of torchvision's registry (each module of
torchvision.models: resnet, densenet, efficientnet, regnet, convnext, ...) its smallest convolutional builder
up to 30M parameters,
built with random init, decomposed exactly at full rank and to about 2x fewer MACs, exported to ONNX and
checked in onnxruntime. The whole registry is in docs/zoo.md's table, from a run of the same script (about 20
minutes here: the ONNX exports dominate)."""

import importlib.util
from pathlib import Path

import pytest

from trp_edge.models import torchvision_builders

# every family's smallest builder at full size, decomposed and exported twice: minutes per model on one core
pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parent.parent / "tools" / "zoo_sweep.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("zoo_sweep", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SWEEP = _sweep()
MAX_PARAMS = 30.0  # alexnet, vgg11, vit_b_16 and maxvit_t are the smallest of their families: in docs/zoo.md's table
TRANSFORMERS = ("swin_t",)  # attention through F.linear and matmuls: no layer to factorize; in docs/zoo.md's table
NAMES = [n for n in SWEEP.smallest_per_family() if SWEEP.millions_of_params(n) <= MAX_PARAMS and n not in TRANSFORMERS]


def test_one_builder_from_every_family_of_the_registry():
    from torchvision.models import get_model_builder

    families = {get_model_builder(n).__module__ for n in torchvision_builders()}
    assert len(SWEEP.smallest_per_family()) == len(families) >= 15 and len(NAMES) >= 12
    assert {"mobilenet_v2", "resnet18", "squeezenet1_1", "convnext_tiny", "inception_v3"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_torchvision_family(name, tmp_path):
    row = SWEEP.check(name, tmp_path)
    assert row["result"] == "pass", row
    assert row["full_rank_rel_err"] <= 1e-4 and row["onnx_rel_diff"] <= 1e-4 and row["mac_speedup"] >= 1.95
