"""Rank planning against the LatencyModel interface: any object with dense / latency / ranks / precision /
runtime, not only a calibration table."""

import copy

import pytest
import torch
from torch import nn

from trp_edge.config import DecomposeConfig
from trp_edge.errors import ConfigError
from trp_edge.flops import count_macs
from trp_edge.latency_table import LatencyTable
from trp_edge.planning import decompose_
from trp_edge.planning_latency import LatencyModel, lead_model, precision_dense, precision_models, worst_case


class FakeLatency:
    """A latency model that is no table: every dense conv takes 1 ms, a pair 0.05 ms per rank at even ranks only
    (odd ranks unknown); the layers in `slow` have only pairs slower than their dense conv."""

    def __init__(self, precision: str = "fp32", runtime: str = "fake", slow: tuple[str, ...] = (), scale=1.0):
        self.precision, self.runtime, self.slow, self.scale = precision, runtime, slow, scale

    def dense(self, layer: str) -> float | None:
        return 1.0

    def ranks(self, layer: str, scheme: str) -> dict[int, float]:
        return {r: (2.0 if layer in self.slow else 0.05 * r * self.scale) for r in range(2, 33, 2)}

    def latency(self, layer: str, scheme: str, rank: int) -> float | None:
        return self.ranks(layer, scheme).get(rank)


def test_a_table_and_a_fake_both_satisfy_the_interface():
    assert isinstance(FakeLatency(), LatencyModel)
    assert isinstance(LatencyTable({"runtime": "ort"}, []), LatencyModel)
    assert not isinstance(object(), LatencyModel)


def test_ranks_round_to_the_fake_models_fastest_known_rank_and_slow_layers_stay_dense(tiny):
    x = torch.randn(1, 3, 16, 16)
    fake = FakeLatency(slow=("conv3",))
    energy_only, _ = decompose_(copy.deepcopy(tiny), DecomposeConfig(scheme="channel", energy=0.3), x)
    plans, _ = decompose_(tiny, DecomposeConfig(scheme="channel", energy=0.3), x, tables=[fake])
    by = {p.name: p for p in plans}
    assert by["conv3"].rank is None and by["conv3"].reason.startswith("calibrated")  # the guard
    assert isinstance(tiny.conv3, nn.Conv2d) and by["conv3"].dense_ms == 1.0
    moved = [p for p in plans if p.rank is not None]
    assert moved
    for p in moved:
        before = next(q for q in energy_only if q.name == p.name).rank
        # pairs get slower with rank here, so the fastest known rank >= the energy rank is the next even one
        assert p.planned_rank == before and p.rank == before + before % 2
        assert p.predicted_ms == fake.latency(p.name, "channel", p.rank)
        assert tiny.get_submodule(p.name).rank == p.rank


def test_a_mac_target_with_the_latency_allocation_runs_on_the_fake(tiny):
    x = torch.randn(1, 3, 16, 16)
    model = copy.deepcopy(tiny)
    cfg = DecomposeConfig(scheme="channel", target_speedup=1.5, allocate="latency")
    plans, _ = decompose_(model, cfg, x, tables=[FakeLatency()])
    assert count_macs(tiny, x).total / count_macs(model, x).total >= 1.5
    assert all(p.rank % 2 == 0 for p in plans if p.rank is not None)  # only known ranks


def test_another_precision_keeps_its_slower_pairs_dense_per_runtime(tiny):
    x = torch.randn(1, 3, 16, 16)
    fp32 = [FakeLatency(runtime="a"), FakeLatency(runtime="b")]
    int8 = [FakeLatency("int8", "a", slow=("conv2",)), FakeLatency("int8", "b")]
    plans, _ = decompose_(tiny, DecomposeConfig(scheme="channel", energy=0.3), x, tables=[*int8, *fp32])
    assert {p.name for p in plans if p.rank is not None} >= {"conv2"}  # int8 does not veto fp32's pairs
    kept = precision_dense([*int8, *fp32], plans)
    assert kept == {"int8": {"a": ["conv2"], "b": []}}
    assert precision_models(kept) == {"int8/a": ["conv2"], "int8/b": []}
    assert lead_model(int8).precision == "int8" and lead_model([]) is None


def test_several_runtimes_read_as_their_worst_case():
    fast, slow = FakeLatency(runtime="a"), FakeLatency(runtime="b", scale=3.0)
    both = worst_case([fast, slow])
    assert both.runtime == "a+b" and both.dense("c") == 1.0
    assert both.latency("c", "channel", 4) == pytest.approx(0.6)  # the slower runtime's ratio
    assert both.latency("c", "channel", 3) is None and 3 not in both.ranks("c", "channel")
    assert worst_case([fast]) is fast


def test_tables_named_in_the_config_must_be_passed_loaded(tiny):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="latency_table.load_tables"):
        decompose_(tiny, DecomposeConfig(latency_table="somewhere.csv"), x)
