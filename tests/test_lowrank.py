import copy
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trp_edge.config import DecomposeConfig
from trp_edge.errors import ConfigError
from trp_edge.flops import count_macs
from trp_edge.lowrank import (
    SCHEMES,
    LowRankConv2d,
    conv_layers,
    energy_rank,
    kept_energy,
    make_pair,
    singular_values,
)
from trp_edge.planning import decompose_, plan_layers

CASES = [
    # kernel, stride, padding, dilation
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    ((3, 5), (2, 1), (1, 2), 1),
    ((5, 3), (1, 2), (0, 3), (2, 1)),
    (3, 1, "same", 2),
    (3, 1, "valid", 1),
    (1, 1, 0, 1),
    ((1, 3), (1, 2), (0, 1), 1),
]


# the spatial scheme does not take 1x1 kernels (tested below)
ELIGIBLE = [(s, *c) for s in ("channel", "spatial") for c in CASES if not (s == "spatial" and c[0] == 1)]


@pytest.mark.parametrize("scheme,kernel,stride,padding,dilation", ELIGIBLE)
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_pair_matches_dense_conv(scheme, kernel, stride, padding, dilation, bias):
    conv = nn.Conv2d(5, 7, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    full = min(SCHEMES[scheme].to_matrix(conv.weight.detach()).shape)
    pair = make_pair(conv, scheme, full)
    x = torch.randn(2, 5, 13, 11)
    with torch.no_grad():
        ref, got = conv(x), pair(x)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
    assert (pair.second.bias is not None) == bias and pair.first.bias is None


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_truncation_error_falls_as_rank_grows(scheme):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    full = min(SCHEMES[scheme].to_matrix(conv.weight.detach()).shape)
    with torch.no_grad():
        ref = conv(x)
        errs = [(make_pair(conv, scheme, k)(x) - ref).norm().item() for k in range(1, full + 1)]
    assert all(a >= b - 1e-5 for a, b in itertools.pairwise(errs))
    assert errs[0] > 10 * max(errs[-1], 1e-6)


def test_spatial_matrix_form_round_trips_and_has_the_papers_shape():
    w = torch.randn(7, 5, 3, 4)
    m = SCHEMES["spatial"].to_matrix(w)
    assert m.shape == (5 * 3, 7 * 4)
    assert m[2 * 3 + 1, 6 * 4 + 3] == w[6, 2, 1, 3]  # M[(c, i), (n, j)] = W[n, c, i, j]
    assert torch.equal(SCHEMES["spatial"].from_matrix(m, tuple(w.shape)), w)
    c = SCHEMES["channel"].to_matrix(w)
    assert c.shape == (7, 5 * 3 * 4)
    assert torch.equal(SCHEMES["channel"].from_matrix(c, tuple(w.shape)), w)


def test_energy_rank_is_the_smallest_rank_within_the_energy_budget():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1])
    total = (s**2).sum()
    for e in [1e-4, 0.01, 0.02, 0.05, 0.2, 0.5, 0.99]:
        k = int(energy_rank(s, e))
        assert (s[k:] ** 2).sum() <= e * total + 1e-9
        if k > 1:
            assert (s[k - 1:] ** 2).sum() > e * total  # one less would drop too much
    batch = torch.stack([s, s.flip(0).sort(descending=True).values * 2])
    assert energy_rank(batch, 0.05).tolist() == [int(energy_rank(s, 0.05))] * 2
    assert kept_energy(s, 5) == pytest.approx(1.0)


def test_1x1_and_grouped_convs_are_left_dense_with_a_reason():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 4, 8, 8)
    plans, _ = decompose_(model, DecomposeConfig(scheme="spatial", energy=0.5), x)
    reasons = {p.name: p.reason for p in plans}
    assert "1x1" in reasons["0"] and "groups=2" in reasons["1"]
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], nn.Conv2d)


def test_skip_stem_keeps_the_first_conv(tiny):
    x = torch.randn(1, 3, 16, 16)
    plans, _ = decompose_(tiny, DecomposeConfig(energy=0.3, skip_stem=True), x)
    assert plans[0].name == "conv1" and plans[0].reason.startswith("stem")
    assert isinstance(tiny.conv1, nn.Conv2d)


def test_a_pair_that_would_cost_more_macs_stays_dense():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 8, 8)
    # full rank 24 for the spatial form of an 8->8 3x3: the pair costs 2x the dense conv
    plans, _ = decompose_(model, DecomposeConfig(scheme="spatial", energy=1e-9), x)
    assert plans[0].rank is None and "MACs" in plans[0].reason
    assert isinstance(model[0], nn.Conv2d)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_planned_macs_agree_with_the_flop_counter(scheme, tiny):
    x = torch.randn(1, 3, 16, 16)
    plans, _ = decompose_(tiny, DecomposeConfig(scheme=scheme, energy=0.2), x)
    counted = count_macs(tiny, x).per_module
    decomposed = [p for p in plans if p.rank is not None]
    assert decomposed
    for p in decomposed:
        assert isinstance(tiny.get_submodule(p.name), LowRankConv2d)
        assert counted[p.name] == p.macs_lowrank


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_tsvd_projection_and_decomposition_agree(scheme, tiny):
    """The dense model with TSVD-projected weights computes what the decomposed model computes."""
    from trp_edge.config import TRPConfig
    from trp_edge.data import synthetic
    from trp_edge.trp import TRPTrainer

    data = synthetic("3x16x16", n_train=64, n_test=32, classes=4)
    dcfg = DecomposeConfig(scheme=scheme, energy=0.4)
    trainer = TRPTrainer(tiny, data, TRPConfig(steps=1, batch=16, device="cpu"), dcfg, progress=False)
    ranks = trainer.project_()
    x = torch.randn(2, 3, 16, 16)
    tiny.eval()
    with torch.no_grad():
        projected = tiny(x)
    layers = conv_layers(tiny, x, dcfg)
    again = plan_layers(layers, singular_values(layers, scheme), dcfg)
    assert all(p.energy_rank <= ranks[p.name] for p in again)  # projecting again never raises a rank
    plans, _ = decompose_(tiny, DecomposeConfig(scheme=scheme, energy=0.4, ranks=ranks), x)
    with torch.no_grad():
        decomposed = tiny(x)
    assert any(p.rank is not None for p in plans)
    assert torch.allclose(projected, decomposed, atol=1e-5), (projected - decomposed).abs().max()


def test_explicit_ranks_override_energy_and_unknown_layers_are_refused(tiny):
    x = torch.randn(1, 3, 16, 16)
    layers = conv_layers(tiny, x, DecomposeConfig())
    sv = singular_values(layers, "channel")
    plans = plan_layers(layers, sv, DecomposeConfig(ranks={"conv3": 3}, energy=0.01))
    assert {p.name: p.rank for p in plans}["conv3"] == 3
    with pytest.raises(ConfigError, match="nope"):
        plan_layers(layers, sv, DecomposeConfig(ranks={"nope": 3}))


def test_target_speedup_is_reached_by_bisection(tiny):
    x = torch.randn(1, 3, 16, 16)
    dense = count_macs(tiny, x).total
    layers = conv_layers(tiny, x, DecomposeConfig())
    other = dense - sum(la.macs_dense for la in layers)

    def speedup_at(e: float) -> float:
        m = copy.deepcopy(tiny)
        decompose_(m, DecomposeConfig(energy=e), x)
        return dense / count_macs(m, x).total

    plans, energy = decompose_(copy.deepcopy(tiny), DecomposeConfig(target_speedup=2.0), x, other_macs=other)
    # the energy found is the smallest that reaches the target: it reproduces the plan, a hair less does not
    assert speedup_at(energy) >= 2.0 > speedup_at(energy * (1 - 1e-6))
    assert [p.rank for p in plans] == [p.rank for p in decompose_(copy.deepcopy(tiny), DecomposeConfig(energy=energy),
                                                                  x)[0]]


def test_target_speedup_needs_no_other_macs():
    """decompose_ counts the MACs outside the convs itself when the caller does not (as compress's load_stage)."""
    torch.manual_seed(0)  # a Linear about as costly as the convs: the MAC target depends on counting it
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(),
                        nn.Linear(16 * 8 * 8, 64))
    x = torch.randn(1, 3, 8, 8)
    layers = conv_layers(net, x, DecomposeConfig())
    other = count_macs(net, x).total - sum(la.macs_dense for la in layers)
    assert other == 16 * 8 * 8 * 64
    cfg = DecomposeConfig(target_speedup=1.4)
    given, e_given = decompose_(copy.deepcopy(net), cfg, x, other_macs=other)
    model = copy.deepcopy(net)
    counted, e_counted = decompose_(model, cfg, x)
    assert e_counted == e_given and [p.to_dict() for p in counted] == [p.to_dict() for p in given]
    assert count_macs(net, x).total / count_macs(model, x).total >= 1.4
    # leaving the Linear out would reach the target with less energy dropped
    assert decompose_(copy.deepcopy(net), cfg, x, other_macs=0)[1] < e_counted


def test_lowrank_is_maths_only():
    """lowrank reads no files and plans nothing: importing it loads neither the latency tables nor the allocation
    (nor the config, whose validation pulls latency_table in); planning loads no table module either."""
    code = ("import sys, trp_edge.{0}; print(' '.join(m for m in sys.modules if m.startswith('trp_edge')))")
    for module, banned in (("lowrank", {"trp_edge.latency_table", "trp_edge.allocate", "trp_edge.planning",
                                        "trp_edge.config"}),
                           ("planning", {"trp_edge.latency_table"})):
        out = subprocess.run([sys.executable, "-c", code.format(module)], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        loaded = set(out.stdout.split())
        assert f"trp_edge.{module}" in loaded and not loaded & banned, (module, sorted(loaded & banned))


def test_the_registry_names_the_configs_schemes():
    from trp_edge.config import SCHEME_NAMES

    assert tuple(SCHEMES) == SCHEME_NAMES


def test_unreachable_target_speedup_is_a_clear_error(tiny):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="out of reach"):
        decompose_(tiny, DecomposeConfig(target_speedup=500.0), x, other_macs=0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_energy_outside_0_1_is_refused(bad):
    with pytest.raises(ConfigError, match="energy"):
        DecomposeConfig(energy=bad)


class _VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_linear_layers_factorize_with_the_flag(tmp_path):
    from trp_edge.models import exported, load_model, module_spec

    torch.manual_seed(0)
    model, x = _VGGish().eval(), torch.randn(2, 3, 8, 8)
    assert [la.name for la in conv_layers(model, x, DecomposeConfig())] == ["features.0"]  # off by default
    layers = conv_layers(model, x, DecomposeConfig(linear=True))
    assert [(la.name, la.out_hw) for la in layers] == [("features.0", (8, 8)), ("classifier.0", (1, 1)),
                                                        ("classifier.2", (1, 1))]
    assert "linear layer" in conv_layers(model, x, DecomposeConfig(scheme="spatial", linear=True))[1].reason
    full = copy.deepcopy(model)
    full.set_submodule("classifier.0", make_pair(model.classifier[0], "channel", 128))
    assert torch.allclose(full(x), model(x), atol=1e-5)  # full rank: the same function
    dense, h = model.classifier[0], model.features(x).flatten(1)  # the Linear and its input
    with torch.no_grad():
        ref = dense(h)
        errs = {k: ((make_pair(dense, "channel", k)(h) - ref).norm() / ref.norm()).item()
                for k in (1, 2, 4, 8, 16, 32, 64, 128)}
    # ||(W - W_k) h||^2 = sum_{j>k} s_j^2 (v_j . h)^2: the relative error falls with every rank added, to none
    assert all(a > b for a, b in itertools.pairwise(errs.values())), errs
    assert errs[1] > 0.1 and errs[128] < 1e-5, errs
    plans, _ = decompose_(model, DecomposeConfig(ranks={"classifier.0": 8}, linear=True), x)
    lin = model.get_submodule("classifier.0")
    assert type(lin).__name__ == "LowRankLinear" and lin.first.weight.shape == (8, 256)
    assert next(p for p in plans if p.name == "classifier.0").macs_lowrank == 8 * 256 + 128 * 8
    with torch.no_grad():  # the decomposed model's Linear is that rank-8 truncation
        assert ((lin(h) - ref).norm() / ref.norm()).item() == pytest.approx(errs[8], rel=1e-4)
    ranks = {p.name: p.rank for p in plans if p.rank is not None}
    exported.save(model, x[:1], tmp_path / "c.pt2", {"arch": module_spec(model, "v", x), "layers": {
        n: {"scheme": "channel", "rank": k} for n, k in ranks.items()}})
    again = load_model(str(tmp_path / "c.pt2"))
    assert type(again.model.get_submodule("classifier.0")).__name__ == "LowRankLinear"  # the program, regrouped
    assert torch.allclose(again.model.eval()(x), model(x), atol=1e-5)


def test_trp_projects_linear_layers_too():
    from trp_edge.config import TRPConfig
    from trp_edge.data import synthetic
    from trp_edge.trp import TRPTrainer

    torch.manual_seed(0)
    model = _VGGish()
    data = synthetic("3x8x8", n_train=64, n_test=32)
    trainer = TRPTrainer(model, data, TRPConfig(steps=2, period=1, batch=32, nuclear=1e-3),
                         DecomposeConfig(energy=0.3, linear=True), progress=False)
    assert "classifier.0" in {la.name for la in trainer.layers}
    trainer.train()
    s = torch.linalg.svdvals(model.classifier[0].weight.detach())
    assert (s > 1e-4 * s[0]).sum() < 128  # projected onto a truncated SVD
