"""torchvision's classification models: the ResNets (family `torchvision_resnet`, a spec of block counts) and by
name every builder in torchvision's own registry (family `torchvision`).

A state_dict is matched against the registry by its keys and shapes: each builder's signature comes from
building it with its parameters on the meta device (no memory, no init), once per process."""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any

import torch
from torch import nn

TV_RESNETS = {
    "resnet18": ([2, 2, 2, 2], False),
    "resnet34": ([3, 4, 6, 3], False),
    "resnet50": ([3, 4, 6, 3], True),
    "resnet101": ([3, 4, 23, 3], True),
    "resnet152": ([3, 8, 36, 3], True),
}
RESNET_FAMILY, FAMILY = "torchvision_resnet", "torchvision"
# builders whose auxiliary classifiers make the training forward return a tuple: built without them
_NO_AUX = {"googlenet", "inception_v3"}
Signature = dict[str, tuple[int, ...]]


@functools.cache
def builders() -> tuple[str, ...]:
    """Every classification model builder in torchvision's registry (ResNets included)."""
    import torchvision
    from torchvision.models import list_models

    return tuple(list_models(module=torchvision.models))


def with_stem_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """The model with its first conv (the stem) taking `in_channels` (a new conv of the same shape otherwise)."""
    if in_channels != 3:
        name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        model.set_submodule(name, nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride,
                                            stem.padding, stem.dilation, stem.groups, stem.bias is not None,
                                            stem.padding_mode))
    return model


def spec(name: str, in_channels: int, num_classes: int | None) -> dict[str, Any]:
    if name in TV_RESNETS:
        blocks, bottleneck = TV_RESNETS[name]
        return {"name": name, "family": RESNET_FAMILY, "blocks": blocks, "bottleneck": bottleneck,
                "in_channels": in_channels, "num_classes": num_classes or 1000}
    return builder_spec(name, in_channels, num_classes)


def builder_spec(name: str, in_channels: int, num_classes: int | None) -> dict[str, Any]:
    return {"name": name, "family": FAMILY, "builder": name, "in_channels": in_channels,
            "num_classes": num_classes or 1000}


def build_resnet(s: dict[str, Any]) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    block = Bottleneck if s["bottleneck"] else BasicBlock
    return with_stem_channels(ResNet(block, s["blocks"], num_classes=s["num_classes"]), s["in_channels"])


def build(s: dict[str, Any]) -> nn.Module:
    from torchvision.models import get_model

    kw: dict[str, Any] = {"aux_logits": False, "init_weights": True} if s["builder"] in _NO_AUX else {}
    return with_stem_channels(get_model(s["builder"], weights=None, num_classes=s["num_classes"], **kw),
                              s["in_channels"])


@contextlib.contextmanager
def _params_on_meta():
    """Parameters and buffers created inside go to the meta device (so init is free), while the builder's own
    arithmetic (RegNet computes its widths with tensors) stays on the CPU."""
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def param(self, name, p):
        reg_p(self, name, None if p is None else nn.Parameter(p.to("meta"), p.requires_grad))

    def buffer(self, name, b, persistent=True):
        reg_b(self, name, None if b is None else b.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = param, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b


def signature_of(build_fn, s: dict[str, Any]) -> Signature:
    with _params_on_meta():
        model = build_fn(s)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.cache
def _registry_signatures() -> dict[str, Signature]:
    return {n: signature_of(build, builder_spec(n, 3, None)) for n in builders()}


def _shape_of(sd: dict[str, torch.Tensor]) -> Signature:
    return {k: tuple(v.shape) for k, v in sd.items()}


def io_channels(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(in_channels, num_classes) of a state_dict: from its first conv weight and its last weight (a Linear or
    a 1x1 conv classifier)."""
    weights = [v for k, v in sd.items() if k.endswith("weight") and v.ndim >= 2]
    ic = next((int(v.shape[1]) for v in weights if v.ndim == 4), 3)
    return ic, int(weights[-1].shape[0]) if weights else 1000


def infer_resnet(sd: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """A torchvision ResNet of the standard widths (4 stages behind a 7x7 stem), named when its block counts are
    one of torchvision's; wider or grouped variants are left to the registry match."""
    stem = sd.get("conv1.weight")
    if stem is None or stem.ndim != 4 or stem.shape[-1] != 7 or "fc.weight" not in sd:
        return None
    blocks = [len({m.group(1) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in (1, 2, 3, 4)]
    if not all(blocks):
        return None
    bottleneck = "layer1.0.conv3.weight" in sd
    name = next((n for n, (b, bn) in TV_RESNETS.items() if b == blocks and bn == bottleneck),
                f"resnet-{'-'.join(map(str, blocks))}")
    s = {"name": name, "family": RESNET_FAMILY, "blocks": blocks, "bottleneck": bottleneck,
         "in_channels": int(stem.shape[1]), "num_classes": int(sd["fc.weight"].shape[0])}
    return s if signature_of(build_resnet, s) == _shape_of(sd) else None


def infer_builder(sd: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The registry builder whose state_dict has exactly these keys and shapes (channels and classes free)."""
    keys = set(sd)
    ic, nc = io_channels(sd)
    for name, sig in _registry_signatures().items():
        if set(sig) == keys:
            s = builder_spec(name, ic, nc)
            if signature_of(build, s) == _shape_of(sd):
                return s
    return None


def nearest(sd: dict[str, torch.Tensor], n: int = 3) -> str:
    """The registry builders whose state_dict keys overlap most with these (best first), and for the nearest
    what differs: one line, empty when nothing shares a key."""
    keys = set(sd)
    sigs = _registry_signatures()
    scores = sorted(((len(keys & set(sig)) / len(keys | set(sig)), name) for name, sig in sigs.items()), reverse=True)
    scores = [(s, name) for s, name in scores[:n] if s > 0]
    if not scores:
        return ""
    best = sigs[scores[0][1]]
    missing, extra = sorted(set(best) - keys), sorted(keys - set(best))
    diff = [f"{len(v)} {what} (first {v[0]})" for v, what in ((missing, "missing"), (extra, "unexpected")) if v]
    if not diff:
        diff = [f"shapes differ at {next(k for k in best if tuple(sd[k].shape) != best[k])}"]
    names = ", ".join(f"{name} ({100 * s:.1f}% of keys shared)" for s, name in scores)
    return f"nearest: {names}; against {scores[0][1]}: {', '.join(diff)}"
