"""Matrix forms, the energy rank, TSVD projection and the low-rank conv pairs.

Two schemes (the SCHEMES registry) map a conv weight W of shape (n, c, kh, kw) to a matrix:
- channel (Zhang et al.): n x (c*kh*kw); rank k gives a kh x kw conv with k filters, then a 1x1 conv.
- spatial (Jaderberg et al.): (c*kh) x (n*kw); rank k gives a kh x 1 conv with k filters, then a 1 x kw
  conv. Stride, padding and dilation split per axis: the vertical half takes the H parts, the
  horizontal half the W parts.
The bias always goes to the second conv.

Maths only: which rank each layer takes is trp_edge.planning's choice (apply_plan_ carries it out); nothing here
reads a file or times anything.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import DecomposeConfig

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


def singular_values(layers: list[ConvLayer], scheme: str) -> dict[str, torch.Tensor]:
    eligible = [layer for layer in layers if layer.reason is None]
    svds = batched_svd(layer.matrix(scheme).double() for layer in eligible)
    return {layer.name: s for layer, (_, s, _) in zip(eligible, svds)}



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



class _Planned(Protocol):
    """A layer's decision as apply_plan_ reads it (trp_edge.planning.LayerPlan): a pair at `rank`, or None."""

    name: str
    scheme: str
    rank: int | None


def apply_plan_(model: nn.Module, layers: list[ConvLayer], plans: Iterable[_Planned], *, init: bool = True) -> None:
    """Replace each planned conv by its low-rank pair, in place."""
    by_name = {layer.name: layer for layer in layers}
    for p in plans:
        if p.rank is not None:
            model.set_submodule(p.name, make_pair(by_name[p.name].module, p.scheme, p.rank, init=init))

