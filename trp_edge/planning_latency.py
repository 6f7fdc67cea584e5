"""What a latency model says about ranks: the LatencyModel interface rank planning is written against, several
models read as one (the leading precision's, worst case over its runtimes), rounding a rank to a measured one,
and which pairs another precision keeps dense.

trp_edge.latency_table.LatencyTable (a measured calibration table) is the model trp-edge loads; the loading is
the workflow's (compress's tables_stage, with latency_table.load_tables). Nothing here reads a file or imports torch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .planning import LayerPlan


@runtime_checkable
class LatencyModel(Protocol):
    """Per-layer latency of one deployment (a runtime at a precision), in ms, by layer name."""

    @property
    def precision(self) -> str:
        """fp32 or int8: the builds the latencies are of."""

    @property
    def runtime(self) -> str:
        """The runtime the latencies are of (ort, tflite, tvm...)."""

    def dense(self, layer: str) -> float | None:
        """The dense conv's latency; None when unknown."""

    def latency(self, layer: str, scheme: str, rank: int) -> float | None:
        """The latency of the layer's pair in `scheme` at `rank`; None when unknown."""

    def ranks(self, layer: str, scheme: str) -> dict[int, float]:
        """rank -> latency of every known pair of the layer in `scheme`."""


class WorstCase:
    """Several latency models of one precision (its runtimes) as one: a pair's latency is the first model's dense
    conv times the worst ratio pair/dense over the models, so a pair counts as faster than dense only when it is
    faster in every runtime, and ranks are rounded to the best worst case. Only the ranks known to every model
    are kept. (The calibration tables' former latency_table.combine, on the interface.)"""

    def __init__(self, models: Sequence[LatencyModel]):
        self.models = list(models)
        self._ranks: dict[tuple[str, str], dict[int, float]] = {}

    @property
    def precision(self) -> str:
        return self.models[0].precision

    @property
    def runtime(self) -> str:
        return "+".join(dict.fromkeys(m.runtime for m in self.models))

    def dense(self, layer: str) -> float | None:
        return self.models[0].dense(layer)

    def latency(self, layer: str, scheme: str, rank: int) -> float | None:
        ratios = []
        for m in self.models:
            ms, dense = m.latency(layer, scheme, rank), m.dense(layer)
            if ms is None or not dense:
                return None
            ratios.append(ms / dense)
        return self.models[0].dense(layer) * max(ratios)

    def ranks(self, layer: str, scheme: str) -> dict[int, float]:
        key = (layer, scheme)
        if key not in self._ranks:
            known = {r: self.latency(layer, scheme, r) for r in self.models[0].ranks(layer, scheme)}
            self._ranks[key] = {r: ms for r, ms in known.items() if ms is not None}
        return dict(self._ranks[key])


def worst_case(models: Sequence[LatencyModel]) -> LatencyModel:
    """One model for several of one precision (WorstCase); a single one as it is."""
    return models[0] if len(models) == 1 else WorstCase(models)


def lead_precision(models: Iterable[LatencyModel]) -> str:
    """The precision whose models choose the ranks when a model is compressed for several: fp32 when it is among
    them. The models of another precision only decide which pairs that precision's builds keep dense, so a
    precision where pairs never pay off (INT8 on a CPU whose dense INT8 convs are fast) does not veto the
    pairs that pay off in fp32."""
    precisions = [m.precision for m in models]
    return "fp32" if "fp32" in precisions else precisions[0]


def lead_model(models: Sequence[LatencyModel]) -> LatencyModel | None:
    """The model ranks are chosen with (None without one): those of the leading precision (lead_precision), several
    read as one (worst_case: a pair counts as faster only where it is faster in every runtime). The other
    precisions' models act after planning: precision_dense."""
    if not models:
        return None
    lead = lead_precision(models)
    return worst_case([m for m in models if m.precision == lead])


def latency_rank(table: LatencyModel, name: str, scheme: str, k: int, full: int,
                 guard: bool = True) -> tuple[int | None, float | None]:
    """The measured rank >= k with the lowest latency and that latency, when that pair is faster than the dense
    conv. Otherwise (None, dense ms) with `guard` (keep the layer dense), and without it (k, None): rounding up
    would buy nothing, so TRP goes on truncating at the energy rank, which may yet fall to a fast pair. Also
    (k, None) when nothing at or above k was measured."""
    dense = table.dense(name)
    cands = sorted((ms, r) for r, ms in table.ranks(name, scheme).items() if k <= r <= full)
    if not cands or dense is None:
        return k, None
    ms, r = cands[0]
    if ms < dense:
        return r, ms
    return (None, dense) if guard else (k, None)


def precision_dense(models: Sequence[LatencyModel], plans: list[LayerPlan]) -> dict[str, dict[str, list[str]]]:
    """Per precision other than the leading one, per runtime of its models: the decomposed layers whose pair, at
    its planned rank, is not faster than the dense conv in that runtime's model; that precision's builds for that
    runtime keep them dense (lowrank.merge_pairs_; precision_models groups them into models). A rank that
    precision did not measure is judged by the nearest measured rank above it (pairs grow slower with rank); a
    layer with none is left decomposed (latency unknown)."""
    if not models:
        return {}
    lead, out = lead_precision(models), {}
    for prec in dict.fromkeys(m.precision for m in models if m.precision != lead):
        at = [m for m in models if m.precision == prec]
        out[prec] = {rt: _slower(worst_case([m for m in at if m.runtime == rt]), plans)
                     for rt in dict.fromkeys(m.runtime for m in at)}
    return out


def precision_models(kept: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """The models a precision's builds are made from, as {key: layers kept dense}: keyed by the precision when its
    runtimes agree (one model for all of them), else by "precision/runtime", one model per runtime, so a pair
    faster in ORT's INT8 is not vetoed by TFLite's."""
    out = {}
    for prec, per in kept.items():
        if len({tuple(layers) for layers in per.values()}) == 1:
            out[prec] = next(iter(per.values()))
        else:
            out.update({f"{prec}/{rt}": layers for rt, layers in per.items()})
    return out


def _slower(table: LatencyModel, plans: list[LayerPlan]) -> list[str]:
    """The decomposed layers whose pair at its planned rank is not faster than the dense conv in `table`."""
    slower = []
    for p in plans:
        dense = table.dense(p.name)
        if p.rank is None or dense is None:
            continue
        above = sorted((r, ms) for r, ms in table.ranks(p.name, p.scheme).items() if r >= p.rank)
        if above and above[0][1] >= dense:
            slower.append(p.name)
    return slower
