import itertools
import random

import pytest
import torch
from torch import nn

from trp_edge.allocate import Choice, allocate, knapsack
from trp_edge.config import DecomposeConfig
from trp_edge.errors import ConfigError
from trp_edge.flops import count_macs
from trp_edge.latency_table import LatencyTable, predict
from trp_edge.planning import plan_for_speedup, planned_macs, scheme_views


def _instance(rng: random.Random, layers: int = 4, options: int = 4) -> list[list[Choice]]:
    return [[Choice(rng.randrange(0, 100), rng.uniform(0.1, 5.0), rng.uniform(0.0, 1.0)) for _ in range(options)]
            for _ in range(layers)]


def _fits(options, chosen, budget, dropped=float("inf")) -> bool:
    picked = [options[i][j] for i, j in enumerate(chosen)]
    return sum(c.macs for c in picked) <= budget and sum(c.dropped for c in picked) <= dropped + 1e-12


def _ms(options, chosen) -> float:
    return sum(options[i][j].ms for i, j in enumerate(chosen))


@pytest.mark.parametrize("seed", range(12))
def test_the_knapsack_finds_the_fastest_choice_within_the_mac_budget(seed):
    rng = random.Random(seed)
    options = _instance(rng)
    budget = rng.uniform(60, 300)
    every = list(itertools.product(*(range(len(o)) for o in options)))
    fitting = [c for c in every if _fits(options, c, budget)]
    chosen = knapsack(options, budget, 0.0)
    if not fitting:
        assert chosen is None
        return
    assert _fits(options, chosen, budget)
    # MACs are rounded up to 1/4000 of the budget: at most that much of it per layer can be lost to rounding
    near = [c for c in every if _fits(options, c, budget * (1 - len(options) / 4000))]
    assert _ms(options, chosen) <= min(_ms(options, c) for c in near) + 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_the_knapsack_keeps_at_least_the_floor(seed):
    rng = random.Random(50 + seed)
    options = _instance(rng)
    budget = rng.uniform(100, 300)
    floor = budget / 1.5
    every = list(itertools.product(*(range(len(o)) for o in options)))
    inside = [c for c in every if floor <= sum(options[i][j].macs for i, j in enumerate(c)) <= budget]
    chosen = knapsack(options, budget, 0.0, floor)
    if chosen is None:
        assert not [c for c in inside if _fits(options, c, budget * (1 - len(options) / 4000))]
        return
    # rounding MACs up may admit a choice up to one bin per layer below the floor, never above the budget
    assert floor - len(options) * budget / 4000 <= sum(options[i][j].macs for i, j in enumerate(chosen)) <= budget
    near = [c for c in inside if _fits(options, c, budget * (1 - len(options) / 4000))]
    if near:
        assert _ms(options, chosen) <= min(_ms(options, c) for c in near) + 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_allocation_keeps_both_budgets_and_beats_the_choice_that_set_them(seed):
    rng = random.Random(100 + seed)
    options = _instance(rng, layers=5)
    ref = tuple(rng.randrange(4) for _ in options)  # a plan, as one e would make it
    budget = sum(options[i][j].macs for i, j in enumerate(ref)) * 1.001 + 1
    dropped = sum(options[i][j].dropped for i, j in enumerate(ref))
    chosen = allocate(options, budget, dropped)
    assert chosen is not None and _fits(options, chosen, budget, dropped)
    assert _ms(options, chosen) <= _ms(options, ref) + 1e-9


def test_allocation_is_none_when_no_choice_fits():
    options = [[Choice(10, 1.0, 0.5), Choice(20, 0.5, 0.0)]]
    assert allocate(options, 5, 1.0) is None  # nothing within the MACs
    assert allocate(options, 15, 0.1) is None  # within the MACs only by dropping more than allowed
    assert allocate(options, 25, 0.1) == [1]


def _twins() -> nn.Sequential:
    """Two convs of the same shape after a stem: whatever the spectra, one e gives them about the same rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1)).eval()


def _table(views) -> LatencyTable:
    """Layer 2's pairs get faster with every rank dropped; layer 4's barely beat dense at any rank (all its
    time is fixed cost), so the energy one e drops there buys nothing."""
    rows = []
    for la in views["spatial"].layers:
        if la.reason is not None:
            continue
        full = views["spatial"].svals[la.name].shape[-1]
        rows.append({"layer": la.name, "scheme": "dense", "rank": 0, "median_ms": 1.0})
        for r in range(1, full + 1):
            ms = 0.95 + 0.001 * r if la.name == "4" else 0.05 + 0.9 * r / full
            rows.append({"layer": la.name, "scheme": "spatial", "rank": r, "median_ms": ms})
    return LatencyTable({"target": "host", "runtime": "ort", "threads": 1, "net_ms": 5.0}, rows)


def _plans(target: float) -> dict[str, dict]:
    """The twins planned at `target` by one e (uniform) and by the latency allocation."""
    net, x = _twins(), torch.randn(1, 3, 16, 16)
    total = count_macs(net, x).total
    views = scheme_views(net, x, DecomposeConfig(scheme="spatial"))
    other = total - sum(la.macs_dense for la in views["spatial"].layers)
    table = _table(views)
    found = {}
    for how in ("uniform", "latency"):
        _, plans = plan_for_speedup(views, DecomposeConfig(scheme="spatial", target_speedup=target, allocate=how),
                                    other, table)
        dense, low = planned_macs(plans)
        found[how] = {"speedup": predict(table, [(p.name, p.scheme, p.rank) for p in plans])["latency_speedup"],
                      "macs": (dense + other) / (low + other), "ranks": {p.name: p.rank for p in plans},
                      "dropped": sum(1 - p.kept_energy for p in plans if p.rank is not None)}
    return found


@pytest.mark.parametrize("target", [1.5, 2.0, 3.0, 4.0])
def test_latency_allocation_is_never_slower_never_drops_more_and_meets_the_target(target):
    found = _plans(target)
    uni, lat = found["uniform"], found["latency"]
    assert lat["macs"] >= target and uni["macs"] >= target
    assert lat["dropped"] <= uni["dropped"] + 1e-9
    assert lat["speedup"] >= uni["speedup"]


def test_latency_allocation_moves_energy_to_where_it_buys_time():
    found = _plans(1.5)
    uni, lat = found["uniform"], found["latency"]
    assert lat["speedup"] > uni["speedup"]
    # energy comes back where dropping it bought nothing (layer 4) and goes where it buys time (layer 2)
    assert lat["ranks"]["4"] is None or lat["ranks"]["4"] > uni["ranks"]["4"]
    assert lat["ranks"]["2"] < uni["ranks"]["2"]


def test_an_unknown_allocation_is_refused():
    with pytest.raises(ConfigError, match="unknown allocation 'fast'"):
        DecomposeConfig(allocate="fast")


def test_a_prediction_that_is_not_a_positive_time_is_none():
    """Layers timed alone that cost more than the whole net (seen with TVM's untuned convs) give no prediction."""
    rows = [{"layer": "a", "scheme": "dense", "rank": 0, "median_ms": 3.0},
            {"layer": "a", "scheme": "spatial", "rank": 2, "median_ms": 0.5}]
    table = LatencyTable({"target": "host", "runtime": "tvm", "threads": 1, "net_ms": 2.0}, rows)
    assert predict(table, [("a", "spatial", 2)]) is None
    table.header["net_ms"] = 4.0
    assert predict(table, [("a", "spatial", 2)])["compressed_ms"] == pytest.approx(1.5)
