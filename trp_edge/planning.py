"""Rank planning: which rank (and with scheme 'auto' which matrix form) each conv takes, and decompose_, the verb
that plans and then replaces the convs (lowrank.apply_plan_).

Ranks come from the energy rule (lowrank.energy_rank), explicit ranks, or a MAC target (the energy found by
bisection); with latency models (planning_latency.LatencyModel: loaded calibration tables) they are rounded to
the fastest measured rank, a layer whose pairs are not faster than its dense conv stays dense, and with a MAC
target and allocate 'latency' the ranks are allocated across layers (trp_edge.allocate). The models come in
loaded: nothing here reads a file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .allocate import Choice, allocate
from .errors import ConfigError
from .flops import count_macs
from .lowrank import (
    ConvLayer,
    apply_plan_,
    conv_layers,
    energy_rank,
    get_scheme,
    kept_energy,
    scheme_names,
    singular_values,
)
from .planning_latency import LatencyModel, latency_rank, lead_model

if TYPE_CHECKING:
    from .config import DecomposeConfig

log = logging.getLogger(__name__)


@dataclass
class LayerPlan:
    """The decision for one conv: a low-rank pair at `rank`, or dense with the `reason`."""

    name: str
    scheme: str
    rank: int | None
    full_rank: int
    macs_dense: int
    macs_lowrank: int | None
    reason: str | None = None
    energy_rank: int | None = None
    kept_energy: float | None = None
    planned_rank: int | None = None  # the rank before latency calibration moved it
    predicted_ms: float | None = None  # the calibration table's latency of the chosen pair (or dense conv)
    dense_ms: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan_layers(layers: list[ConvLayer], svals: dict[str, torch.Tensor], config: DecomposeConfig,
                energy: float | None = None) -> list[LayerPlan]:
    """Ranks for every conv from its singular values (energy rule or explicit ranks), leaving dense
    each layer that is not eligible or whose pair would not save MACs."""
    sch = get_scheme(config.scheme)
    e = config.energy if energy is None else energy
    explicit = dict(config.ranks or {})
    unknown = set(explicit) - {layer.name for layer in layers}
    if unknown:
        raise ConfigError(f"explicit ranks name layers the model does not have: {sorted(unknown)}")
    plans = []
    for layer in layers:
        dense = layer.macs_dense
        if layer.reason is not None:
            plans.append(LayerPlan(layer.name, config.scheme, None, 0, dense, None, layer.reason))
            continue
        s = svals[layer.name]
        full = s.shape[-1]
        k_e = int(energy_rank(s, e))
        k = min(explicit.get(layer.name, k_e), full)
        macs = sch.pair_macs(layer.module, layer.in_hw, layer.out_hw, k)
        plan = LayerPlan(layer.name, config.scheme, k, full, dense, macs, None, k_e, kept_energy(s, k))
        if macs >= dense:
            plan.rank, plan.planned_rank = None, k
            plan.reason = f"low-rank pair at rank {k}/{full} costs {macs} MACs >= dense {dense}"
        plans.append(plan)
    return plans


def planned_macs(plans: list[LayerPlan]) -> tuple[int, int]:
    """(dense, planned) MACs summed over the planned convs."""
    dense = sum(p.macs_dense for p in plans)
    low = sum(p.macs_lowrank if p.rank is not None else p.macs_dense for p in plans)
    return dense, low


def energy_for_speedup(planner: Callable[[float], list[LayerPlan]], other_macs: int, target: float,
                       scheme: str, iters: int = 60, guarded: bool = False) -> float:
    """Smallest energy e whose plan (`planner(e)`) gives `target` times fewer MACs for the whole model
    (bisection; the speedup is non-decreasing in e). `other_macs` are the model's MACs outside the convs.
    `guarded`: the planner keeps layers dense where their pairs are slower (a latency table), so a target out
    of reach takes the most the guard allows, with a warning, instead of failing."""

    def speedup(e: float) -> float:
        dense, low = planned_macs(planner(e))
        return (dense + other_macs) / (low + other_macs)

    lo, hi = 1e-9, 1.0 - 1e-9
    best = speedup(hi)
    if best < target and guarded:
        log.warning("a %gx MAC speedup is out of reach where pairs are faster than dense: %.2fx at most (the "
                    "latency table's guard keeps the others dense)", target, best)
        return hi
    if best < target:
        raise ConfigError(f"a {target:g}x MAC speedup is out of reach with the {scheme} scheme: at most "
                          f"{best:.2f}x (rank 1 everywhere; layers left dense and non-conv layers limit it)")
    if speedup(lo) >= target:
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if speedup(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_plans_(plans: list[LayerPlan], layers: list[ConvLayer], svals: dict[str, torch.Tensor],
                     table: LatencyModel, guard: bool = True) -> None:
    """Latency-aware ranks from a calibration table (trp_edge.calibrate): each decomposed layer's rank moves
    to the measured rank with the lowest latency among those >= its planned rank (so it never keeps less
    energy than the energy rule asked for), and a layer whose fastest such pair is not faster than its
    dense conv stays dense (the guard). Ranks above the planned one add only zero singular directions to
    a TRP-projected weight, so the decomposed model computes the same function. Without `guard` (during TRP
    training, where every layer is truncated) such a layer keeps its energy rank instead."""
    by = {layer.name: layer for layer in layers}
    for p in plans:
        p.dense_ms = table.dense(p.name)
        if p.rank is None or p.dense_ms is None:
            p.predicted_ms = p.dense_ms if p.rank is None else None
            continue
        layer, sch = by[p.name], get_scheme(p.scheme)
        p.planned_rank = p.rank
        k, ms = latency_rank(table, p.name, p.scheme, p.rank, p.full_rank, guard)
        if ms is None:
            continue  # nothing measured at or above the planned rank: keep it, latency unknown
        if k is None:
            p.rank, p.predicted_ms = None, p.dense_ms
            p.reason = (f"calibrated: no measured pair at rank >= {p.planned_rank} is faster than the dense conv "
                        f"({p.dense_ms:.3f} ms)")
            continue
        p.rank, p.predicted_ms = k, ms
        p.macs_lowrank = sch.pair_macs(layer.module, layer.in_hw, layer.out_hw, k)
        p.kept_energy = kept_energy(svals[p.name], k)


@dataclass
class SchemeView:
    """The model's convs seen through one matrix form: which it can decompose and their singular values."""

    layers: list[ConvLayer]
    svals: dict[str, torch.Tensor]


def scheme_views(model: nn.Module, example: torch.Tensor, config: DecomposeConfig) -> dict[str, SchemeView]:
    views = {}
    for name in scheme_names(config):
        layers = conv_layers(model, example, replace(config, scheme=name, layer_schemes=None))
        views[name] = SchemeView(layers, singular_values(layers, name))
    return views


def plan_model(views: dict[str, SchemeView], config: DecomposeConfig, energy: float,
               table: LatencyModel | None = None, guard: bool = True) -> list[LayerPlan]:
    """Every conv's plan at energy e: in the config's scheme, or with scheme 'auto' the fastest of the schemes'
    pairs and the dense conv per layer (by the table's measured latency, else by MACs; a layer named in
    config.layer_schemes keeps that scheme). With a table, ranks are rounded (and with `guard`, a layer whose
    pair is not faster than its dense conv stays dense: calibrate_plans_)."""
    fixed = config.layer_schemes or {}
    per: dict[str, list[LayerPlan]] = {}
    for name, v in views.items():
        ranks = {n: k for n, k in (config.ranks or {}).items() if fixed.get(n, name) == name}
        plans = plan_layers(v.layers, v.svals, replace(config, scheme=name, ranks=ranks or None, layer_schemes=None),
                            energy)
        if table is not None:
            calibrate_plans_(plans, v.layers, v.svals, table, guard)
        per[name] = plans
    if len(per) == 1:
        return next(iter(per.values()))
    names = list(per)
    merged = []
    for i, first in enumerate(per[names[0]]):
        if first.name in fixed:
            merged.append(per[fixed[first.name]][i])
            continue
        opts = [per[n][i] for n in names if views[n].layers[i].reason is None] or [first]
        merged.append(min(opts, key=lambda p: _cost(p, table)))
    return merged


def _cost(p: LayerPlan, table: LatencyModel | None) -> tuple[int, float]:
    """How scheme 'auto' ranks a layer's options: a measured latency (a pair faster than dense, or dense)
    first; then, during training, a pair not yet faster than dense by the fastest measured pair at or above
    its rank (the form nearest to paying off as TRP lowers the rank); then fewer MACs."""
    if p.predicted_ms is not None:
        return 0, p.predicted_ms
    if table is not None and p.rank is not None:
        near = [ms for r, ms in table.ranks(p.name, p.scheme).items() if r >= p.rank]
        if near:
            return 1, min(near)
    return 2, p.macs_lowrank if p.rank is not None else p.macs_dense


def _choices(p: LayerPlan, views: dict[str, SchemeView], config: DecomposeConfig,
             table: LatencyModel) -> tuple[list[tuple[str | None, int | None, Choice]], int] | None:
    """A layer's options for the latency allocation, (scheme, rank, Choice): dense, and every measured pair
    faster than dense in each scheme it may take; and the index of the plan's own. None for a layer the
    allocation leaves as planned (explicit rank, not eligible, not in the table)."""
    if p.name in (config.ranks or {}) or p.dense_ms is None:
        return None
    fixed = (config.layer_schemes or {}).get(p.name)
    out: list[tuple[str | None, int | None, Choice]] = [(None, None, Choice(p.macs_dense, p.dense_ms, 0.0))]
    for name, v in views.items():
        la = next(la for la in v.layers if la.name == p.name)
        if la.reason is not None or fixed not in (None, name):
            continue
        sch, s = get_scheme(name), v.svals[p.name]
        for r, ms in sorted(table.ranks(p.name, name).items()):
            macs = sch.pair_macs(la.module, la.in_hw, la.out_hw, r)
            if r <= s.shape[-1] and ms < p.dense_ms and macs < p.macs_dense:
                out.append((name, r, Choice(macs, ms, 1.0 - kept_energy(s, r))))
    at = (None, None) if p.rank is None else (p.scheme, p.rank)
    now = next((j for j, (sch, r, _) in enumerate(out) if (sch, r) == at), None)
    return None if len(out) == 1 or now is None else (out, now)


def allocate_plans(views: dict[str, SchemeView], config: DecomposeConfig, plans: list[LayerPlan],
                   table: LatencyModel, energy: float, budget: float) -> list[LayerPlan]:
    """The plans with ranks allocated across layers for latency (trp_edge.allocate): at most `budget` conv MACs
    and no more singular-value energy dropped in all than `plans` drop, the lowest summed table latency; a
    layer whose pairs do not pay for the energy they drop stays dense. `plans` as given when that is not
    faster by the table."""
    opts = {i: c for i, p in enumerate(plans) if (c := _choices(p, views, config, table)) is not None}
    if not opts:
        return plans
    budget -= sum(p.macs_dense if p.rank is None else p.macs_lowrank for i, p in enumerate(plans) if i not in opts)
    current = {i: o[now][2] for i, (o, now) in opts.items()}
    chosen = allocate([[c for *_, c in o] for o, _ in opts.values()], budget,
                      sum(c.dropped for c in current.values()))
    picked = {i: opts[i][0][j] for i, j in zip(opts, chosen or []) if j != opts[i][1]}  # the layers that move
    if sum(current[i].ms - c.ms for i, (*_, c) in picked.items()) <= 0:
        return plans
    out = list(plans)
    for i, (scheme, rank, c) in picked.items():
        p = plans[i]
        if rank is None:
            out[i] = replace(p, rank=None, macs_lowrank=None, kept_energy=None, predicted_ms=p.dense_ms,
                             planned_rank=p.rank, reason="latency allocation: its pairs buy less time than the "
                             "energy they drop buys in other layers")
            continue
        s = views[scheme].svals[p.name]
        out[i] = replace(p, scheme=scheme, rank=rank, full_rank=s.shape[-1], macs_lowrank=c.macs, reason=None,
                         energy_rank=int(energy_rank(s, energy)), kept_energy=1.0 - c.dropped,
                         planned_rank=p.rank if p.rank is not None else p.planned_rank, predicted_ms=c.ms)
    return out


def plan_for_speedup(views: dict[str, SchemeView], config: DecomposeConfig, other_macs: int,
                     table: LatencyModel | None) -> tuple[float, list[LayerPlan]]:
    """The energy and the (guarded) plan for config.target_speedup: e by bisection, the plan at e, then with a
    table and config.allocate 'latency' the ranks allocated across layers at that MAC target (allocate_plans)."""
    energy = energy_for_speedup(lambda e: plan_model(views, config, e, table), other_macs, config.target_speedup,
                                config.scheme, guarded=table is not None)
    plans = plan_model(views, config, energy, table)
    if table is not None and config.allocate == "latency":
        dense, _ = planned_macs(plans)
        plans = allocate_plans(views, config, plans, table, energy,
                               (dense + other_macs) / config.target_speedup - other_macs)
    return energy, plans


def rank_model(config: DecomposeConfig, tables: Sequence[LatencyModel]) -> LatencyModel | None:
    """The latency model ranks are chosen with, from the loaded `tables` (planning_latency.lead_model); None
    without. A config that names tables (config.latency_table) with none passed is refused: they are loaded once,
    by the workflow (compress's tables_stage, with trp_edge.latency_table.load_tables), and handed down."""
    if config.latency_table and not tables:
        raise ConfigError(f"the config names latency tables ({config.latency_table}) but none were passed: load "
                          "them with trp_edge.latency_table.load_tables and pass tables=")
    return lead_model(list(tables))


def decompose_(model: nn.Module, config: DecomposeConfig, example: torch.Tensor, *,
               tables: Sequence[LatencyModel] = (), other_macs: int | None = None) -> tuple[list[LayerPlan], float]:
    """Replace every eligible conv of `model` by its low-rank pair, in place.

    The rank of each layer comes from config.energy (or config.ranks); with config.target_speedup the
    energy is found by bisection (on the plans as the latency model rounds and guards them) given `other_macs`
    (the MACs outside the convs: counted on the model when not given). `tables`: the latency models, loaded
    (rank_model). With scheme 'auto' each layer takes its fastest scheme, or stays dense.
    Returns the per-layer plans and the energy used."""
    views = scheme_views(model, example, config)
    layers = next(iter(views.values())).layers
    energy = config.energy
    table = rank_model(config, tables)
    if config.target_speedup is not None:
        if other_macs is None:
            other_macs = count_macs(model, example).total - sum(la.macs_dense for la in layers)
        energy, plans = plan_for_speedup(views, config, other_macs, table)
    else:
        plans = plan_model(views, config, energy, table)
    apply_plan_(model, layers, plans)
    return plans, energy
