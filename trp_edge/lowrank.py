"""Matrix forms, the energy rank, TSVD projection and the low-rank conv pairs.

Two schemes (the SCHEMES registry) map a conv weight W of shape (n, c, kh, kw) to a matrix:
- channel (Zhang et al.): n x (c*kh*kw); rank k gives a kh x kw conv with k filters, then a 1x1 conv.
- spatial (Jaderberg et al.): (c*kh) x (n*kw); rank k gives a kh x 1 conv with k filters, then a 1 x kw
  conv. Stride, padding and dilation split per axis: the vertical half takes the H parts, the
  horizontal half the W parts.
The bias always goes to the second conv.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .allocate import Choice, allocate
from .config import SCHEME_NAMES, DecomposeConfig
from .errors import ConfigError
from .latency_table import LatencyTable, combine, layer_shape, lead_precision, load_table

log = logging.getLogger(__name__)


def energy_rank(s: torch.Tensor, energy: float) -> torch.Tensor:
    """Smallest k with sum_{j>k} s_j^2 <= energy * sum_j s_j^2, for s sorted in descending order.

    Works on a batch (..., r) and returns ranks of shape (...), each in [1, r]."""
    e2 = s.double() ** 2
    cum = torch.cumsum(e2, dim=-1)
    total = cum[..., -1:]
    # tail after k = total - cum[k-1] <= energy * total  <=>  cum[k-1] >= (1 - energy) * total
    need = (1.0 - energy) * total * (1 - 1e-12)
    k = torch.searchsorted(cum.contiguous(), need.contiguous()).squeeze(-1) + 1
    return k.clamp(1, s.shape[-1])


def kept_energy(s: torch.Tensor, k: int) -> float:
    """Fraction of sum s^2 kept by the first k singular values."""
    e2 = s.double() ** 2
    return float(e2[:k].sum() / e2.sum().clamp_min(1e-300))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


@dataclass(frozen=True)
class Scheme:
    """A matrix form of a conv weight and the conv pair it factorizes into."""

    name: str
    to_matrix: Callable[[torch.Tensor], torch.Tensor]  # (..., n, c, kh, kw) -> (..., rows, cols)
    from_matrix: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]
    halves: Callable[[nn.Conv2d, int], tuple[nn.Conv2d, nn.Conv2d]]
    # (first, second) weights of the pair from the factors A (rows x k) and B (k x cols), M = A @ B
    pair_weights: Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]]
    # its inverse: the factors (A, B) from the pair's (first, second) weights
    factors: Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]]
    ineligible: Callable[[nn.Conv2d], str | None]
    pair_macs: Callable[[nn.Conv2d, tuple[int, int], tuple[int, int], int], int]


def weight4(m: nn.Module) -> torch.Tensor:
    """A conv's weight; a Linear's as the (n, c, 1, 1) weight of the 1x1 conv it equals (a view: writes to it, and
    to its .grad the same way, go to the Linear's own)."""
    w = m.weight
    return w if w.ndim == 4 else w.view(*w.shape, 1, 1)


def _common_ineligible(conv: nn.Module) -> str | None:
    if getattr(conv, "groups", 1) != 1:
        return f"grouped conv (groups={conv.groups})"
    return None


def dense_macs(conv: nn.Module, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    n, cg, kh, kw = weight4(conv).shape
    return n * cg * kh * kw * out_hw[0] * out_hw[1]


# ---- channel-wise (Zhang et al.) -----------------------------------------------------------------

def _channel_to_matrix(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(-3)


def _channel_from_matrix(m: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return m.reshape(*m.shape[:-2], *shape)


def _channel_halves(conv: nn.Conv2d, k: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    n, c, kh, kw = conv.weight.shape
    first = nn.Conv2d(c, k, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      bias=False, padding_mode=conv.padding_mode)
    second = nn.Conv2d(k, n, 1, bias=conv.bias is not None)
    return first, second


def _channel_pair_weights(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]):
    n, c, kh, kw = shape
    k = a.shape[1]
    return b.reshape(k, c, kh, kw), a.reshape(n, k, 1, 1)


def _channel_factors(first: torch.Tensor, second: torch.Tensor, shape: tuple[int, ...]):
    k = first.shape[0]
    return second.reshape(shape[0], k), first.reshape(k, -1)


def _channel_pair_macs(conv: nn.Module, in_hw, out_hw, k: int) -> int:
    n, c, kh, kw = weight4(conv).shape
    return k * c * kh * kw * out_hw[0] * out_hw[1] + n * k * out_hw[0] * out_hw[1]


# ---- spatial-wise (Jaderberg et al.) -------------------------------------------------------------

def _spatial_to_matrix(w: torch.Tensor) -> torch.Tensor:
    *lead, n, c, kh, kw = w.shape
    # M[(ci, i), (no, j)] = W[no, ci, i, j]
    return w.movedim(-4, -2).reshape(*lead, c * kh, n * kw)


def _spatial_from_matrix(m: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n, c, kh, kw = shape
    return m.reshape(*m.shape[:-2], c, kh, n, kw).movedim(-2, -4)


def _spatial_halves(conv: nn.Conv2d, k: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    n, c, kh, kw = conv.weight.shape
    (sh, sw), (dh, dw) = _pair(conv.stride), _pair(conv.dilation)
    if isinstance(conv.padding, str):  # 'same' / 'valid' act per axis, so each half takes the string
        first_pad = second_pad = conv.padding
    else:
        ph, pw = _pair(conv.padding)
        first_pad, second_pad = (ph, 0), (0, pw)
    first = nn.Conv2d(c, k, (kh, 1), stride=(sh, 1), padding=first_pad, dilation=(dh, 1),
                      bias=False, padding_mode=conv.padding_mode)
    second = nn.Conv2d(k, n, (1, kw), stride=(1, sw), padding=second_pad, dilation=(1, dw),
                       bias=conv.bias is not None, padding_mode=conv.padding_mode)
    return first, second


def _spatial_pair_weights(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]):
    n, c, kh, kw = shape
    k = a.shape[1]
    first = a.T.reshape(k, c, kh, 1)
    second = b.reshape(k, n, kw).transpose(0, 1).reshape(n, k, 1, kw)
    return first, second


def _spatial_factors(first: torch.Tensor, second: torch.Tensor, shape: tuple[int, ...]):
    n, c, kh, kw = shape
    k = first.shape[0]
    return first.reshape(k, c * kh).T, second.reshape(n, k, kw).transpose(0, 1).reshape(k, n * kw)


def _spatial_ineligible(conv: nn.Module) -> str | None:
    if isinstance(conv, nn.Linear):
        return "linear layer (the spatial scheme needs kh or kw > 1; --linear takes the channel scheme)"
    kh, kw = conv.kernel_size
    if kh == 1 and kw == 1:
        return "1x1 kernel (the spatial scheme needs kh or kw > 1)"
    return _common_ineligible(conv)


def _spatial_pair_macs(conv: nn.Module, in_hw, out_hw, k: int) -> int:
    n, c, kh, kw = weight4(conv).shape
    # the vertical half keeps the input width (its W stride, padding and dilation are all 1 or 0)
    return k * c * kh * out_hw[0] * in_hw[1] + n * k * kw * out_hw[0] * out_hw[1]


SCHEMES: dict[str, Scheme] = {
    "channel": Scheme("channel", _channel_to_matrix, _channel_from_matrix, _channel_halves,
                      _channel_pair_weights, _channel_factors, _common_ineligible, _channel_pair_macs),
    "spatial": Scheme("spatial", _spatial_to_matrix, _spatial_from_matrix, _spatial_halves,
                      _spatial_pair_weights, _spatial_factors, _spatial_ineligible, _spatial_pair_macs),
}
assert tuple(SCHEMES) == SCHEME_NAMES, "config.SCHEME_NAMES names the registry's schemes"


def scheme_names(config: DecomposeConfig) -> tuple[str, ...]:
    """The matrix forms a config lets each layer take: every one for scheme 'auto'."""
    return tuple(SCHEMES) if config.scheme == "auto" else (config.scheme,)


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ConfigError(f"unknown scheme {name!r}: use one of {', '.join(SCHEMES)}") from None


class LowRankConv2d(nn.Module):
    """A conv replaced by two convs: `first` (k filters) then `second` (the original outputs)."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, scheme: str):
        super().__init__()
        self.first = first
        self.second = second
        self.scheme = scheme
        self.rank = first.weight.shape[0]  # the first half's outputs: conv filters or Linear features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, rank={self.rank}"


class LowRankLinear(LowRankConv2d):
    """A Linear replaced by two (`--linear`): `first` (k outputs) then `second`; the channel scheme's 1x1 pair."""


def _linear_halves(lin: nn.Linear, k: int) -> tuple[nn.Linear, nn.Linear]:
    return nn.Linear(lin.in_features, k, bias=False), nn.Linear(k, lin.out_features, bias=lin.bias is not None)


def make_pair(conv: nn.Module, scheme: str, k: int, *, init: bool = True) -> LowRankConv2d:
    """The low-rank pair of `conv` (an nn.Conv2d, or an nn.Linear under the channel scheme) at rank k. With init,
    weights come from the rank-k TSVD of its weight (sqrt(s) on each side); without, they are left for a
    state_dict to fill."""
    sch = get_scheme(scheme)
    linear = isinstance(conv, nn.Linear)
    first, second = _linear_halves(conv, k) if linear else sch.halves(conv, k)
    if init:
        w = weight4(conv).detach()
        m = sch.to_matrix(w.double())
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = s[:k].sqrt()
        a, b = u[:, :k] * r, r[:, None] * vh[:k]
        fw, sw = sch.pair_weights(a, b, tuple(w.shape))
        with torch.no_grad():
            first.weight.copy_(fw.reshape(first.weight.shape).to(w.dtype))
            second.weight.copy_(sw.reshape(second.weight.shape).to(w.dtype))
            if conv.bias is not None:
                second.bias.copy_(conv.bias.detach())
    pair = (LowRankLinear if linear else LowRankConv2d)(first, second, scheme)
    return pair.to(device=conv.weight.device, dtype=conv.weight.dtype)


# ---- the eligible layers of a model ----------------------------------------------------------------

@dataclass
class ConvLayer:
    """A conv of the model (or with --linear a Linear, as the 1x1 conv it equals: in_hw (1, 1), out_hw (1, the
    positions it is applied at)) with the shapes it sees on the example input."""

    name: str
    module: nn.Conv2d | nn.Linear
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    reason: str | None  # why it is not eligible, None when it is

    @property
    def macs_dense(self) -> int:
        return dense_macs(self.module, self.in_hw, self.out_hw)

    @property
    def weight(self) -> torch.Tensor:
        return weight4(self.module)

    def matrix(self, scheme: str) -> torch.Tensor:
        return get_scheme(scheme).to_matrix(self.weight.detach())


def conv_layers(model: nn.Module, example: torch.Tensor, config: DecomposeConfig) -> list[ConvLayer]:
    """Every nn.Conv2d of the model (with config.linear every nn.Linear too) in forward order with its
    input/output size, and whether the scheme (with 'auto': any scheme) can decompose it."""
    schemes = [get_scheme(n) for n in scheme_names(config)]
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    order: list[str] = []
    hooks = []
    names = {m: n for n, m in model.named_modules()}
    kinds = (nn.Conv2d, nn.Linear) if config.linear else nn.Conv2d
    batch = example.shape[0]
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
            def hook(m, inp, out, name=name):
                if name not in shapes:
                    order.append(name)
                x = inp[0]
                shapes[name] = ((tuple(x.shape[-2:]), tuple(out.shape[-2:])) if x.ndim == 4 and m.weight.ndim == 4
                                else ((1, 1), (1, x.numel() // x.shape[-1] // batch)))  # a Linear: positions per item
            hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    layers = []
    for i, name in enumerate(order):
        mod = modules[name]
        reasons = [sch.ineligible(mod) for sch in schemes]
        reason = None if None in reasons else reasons[0]
        if reason is None and config.skip_stem and i == 0:
            reason = "stem (--skip-stem)"
        layers.append(ConvLayer(name, mod, *shapes[name], reason))
    unused = [n for m, n in names.items() if isinstance(m, kinds) and n not in shapes]
    if unused:
        log.debug("convs not reached by the forward pass (left as they are): %s", unused)
    return layers


def batched_svd(mats: Iterable[torch.Tensor], device: torch.device | str | None = None):
    """SVD of many matrices, one batched call per distinct shape. Returns [(u, s, vh)] in order."""
    mats = list(mats)
    out: list = [None] * len(mats)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(tuple(m.shape), []).append(i)
    for idx in groups.values():
        stack = torch.stack([mats[i] for i in idx])
        src = stack.device
        if device is not None:
            stack = stack.to(device)
        u, s, vh = torch.linalg.svd(stack, full_matrices=False)
        for j, i in enumerate(idx):
            out[i] = (u[j].to(src), s[j].to(src), vh[j].to(src))
    return out


# ---- planning: which rank for which layer ----------------------------------------------------------

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


def singular_values(layers: list[ConvLayer], scheme: str) -> dict[str, torch.Tensor]:
    eligible = [layer for layer in layers if layer.reason is None]
    svds = batched_svd(layer.matrix(scheme).double() for layer in eligible)
    return {layer.name: s for layer, (_, s, _) in zip(eligible, svds)}


def latency_rank(table: LatencyTable, name: str, scheme: str, k: int, full: int,
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


def _latency_tables(config: DecomposeConfig, layers: list[ConvLayer]) -> list[LatencyTable]:
    """The calibration tables named in the config, checked against these layers' shapes and its schemes."""
    if not config.latency_table:
        return []
    paths = [config.latency_table] if isinstance(config.latency_table, str) else list(config.latency_table)
    shapes = {la.name: layer_shape(la) for la in layers if isinstance(la.module, nn.Conv2d)}
    tables = []
    for path in paths:
        table = load_table(path, layers=shapes)
        missing = [s for s in scheme_names(config) if s not in table.header.get("schemes", [])]
        if missing:
            raise ConfigError(f"{path}: measured {', '.join(table.header.get('schemes', []))} only, not "
                              f"{', '.join(missing)} (scheme {config.scheme}): calibrate with --schemes "
                              f"{','.join(scheme_names(config))}")
        tables.append(table)
    return tables


def load_latency_table(config: DecomposeConfig, layers: list[ConvLayer]) -> LatencyTable | None:
    """The table ranks are chosen with (None without one): the config's tables of the leading precision
    (latency_table.lead_precision), several combined (latency_table.combine: a pair counts as faster only where
    it is faster in every runtime). The other precisions' tables act after planning: precision_dense."""
    tables = _latency_tables(config, layers)
    if not tables:
        return None
    lead = lead_precision(tables)
    return combine([t for t in tables if t.precision == lead])


def precision_dense(config: DecomposeConfig, layers: list[ConvLayer],
                    plans: list[LayerPlan]) -> dict[str, dict[str, list[str]]]:
    """Per precision other than the leading one, per runtime of its tables: the decomposed layers whose pair, at
    its planned rank, is not faster than the dense conv in that runtime's table; that precision's builds for that
    runtime keep them dense (merge_pairs_; precision_models groups them into models). A rank that precision did
    not measure is judged by the nearest measured rank above it (pairs grow slower with rank); a layer with none
    is left decomposed (latency unknown)."""
    tables = _latency_tables(config, layers)
    if not tables:
        return {}
    lead, out = lead_precision(tables), {}
    for prec in dict.fromkeys(t.precision for t in tables if t.precision != lead):
        at = [t for t in tables if t.precision == prec]
        out[prec] = {rt: _slower(combine([t for t in at if t.header["runtime"] == rt]), plans)
                     for rt in dict.fromkeys(t.header["runtime"] for t in at)}
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


def _slower(table: LatencyTable, plans: list[LayerPlan]) -> list[str]:
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


def merge_pairs_(model: nn.Module, dense: nn.Module, names: Iterable[str]) -> None:
    """Replace each named low-rank pair of `model` by one conv (`dense`'s conv of that name, its weight set to
    the pair's product and its bias to the pair's): the same function, in place."""
    for name in names:
        pair = model.get_submodule(name)
        conv = copy.deepcopy(dense.get_submodule(name))
        sch, shape = get_scheme(pair.scheme), tuple(conv.weight.shape)
        a, b = sch.factors(pair.first.weight.detach().double(), pair.second.weight.detach().double(), shape)
        with torch.no_grad():
            conv.weight.copy_(sch.from_matrix(a @ b, shape).to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.copy_(pair.second.bias.detach())
        model.set_submodule(name, conv)


def calibrate_plans_(plans: list[LayerPlan], layers: list[ConvLayer], svals: dict[str, torch.Tensor],
                     table, guard: bool = True) -> None:
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


def plan_model(views: dict[str, SchemeView], config: DecomposeConfig, energy: float, table=None,
               guard: bool = True) -> list[LayerPlan]:
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


def _cost(p: LayerPlan, table) -> tuple[int, float]:
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
             table) -> tuple[list[tuple[str | None, int | None, Choice]], int] | None:
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


def allocate_plans(views: dict[str, SchemeView], config: DecomposeConfig, plans: list[LayerPlan], table,
                   energy: float, budget: float) -> list[LayerPlan]:
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
                     table) -> tuple[float, list[LayerPlan]]:
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


def apply_plan_(model: nn.Module, layers: list[ConvLayer], plans: list[LayerPlan], *, init: bool = True) -> None:
    """Replace each planned conv by its low-rank pair, in place."""
    by_name = {layer.name: layer for layer in layers}
    for p in plans:
        if p.rank is not None:
            model.set_submodule(p.name, make_pair(by_name[p.name].module, p.scheme, p.rank, init=init))


def decompose_(model: nn.Module, config: DecomposeConfig, example: torch.Tensor,
               other_macs: int | None = None) -> tuple[list[LayerPlan], float]:
    """Replace every eligible conv of `model` by its low-rank pair, in place.

    The rank of each layer comes from config.energy (or config.ranks); with config.target_speedup the
    energy is found by bisection (on the plans as the latency table rounds and guards them), which needs
    `other_macs` (the MACs outside the convs). With scheme 'auto' each layer takes its fastest scheme, or stays dense.
    Returns the per-layer plans and the energy used."""
    views = scheme_views(model, example, config)
    layers = next(iter(views.values())).layers
    energy = config.energy
    table = load_latency_table(config, layers)
    if config.target_speedup is not None:
        if other_macs is None:
            raise ConfigError("decompose_ with target_speedup needs other_macs (the non-conv MACs)")
        energy, plans = plan_for_speedup(views, config, other_macs, table)
    else:
        plans = plan_model(views, config, energy, table)
    apply_plan_(model, layers, plans)
    return plans, energy
