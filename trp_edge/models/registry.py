"""The model families trp-edge knows: each names the models it builds, builds one from its JSON spec, says
whether a state_dict is one of its own (from keys and shapes) and gives the input size its models expect.

Families, in the order a state_dict is matched: CIFAR ResNets, torchvision's ResNets, the rest of
torchvision's registry. The `export` family (torch.export programs and user modules) is rebuilt from its
.pt2 file, not from a spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from . import cifar, exported, zoo

Spec = dict[str, Any]


@dataclass(frozen=True)
class Family:
    name: str
    names: Callable[[], tuple[str, ...]]
    spec: Callable[[str, int, int | None], Spec]
    build: Callable[[Spec], nn.Module]
    infer: Callable[[dict[str, torch.Tensor]], Spec | None]
    input_size: int


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(cifar.FAMILY, lambda: tuple(cifar.CIFAR_DEPTHS), cifar.spec, cifar.build, cifar.infer, 32),
    Family(zoo.RESNET_FAMILY, lambda: tuple(zoo.TV_RESNETS), zoo.spec, zoo.build_resnet, zoo.infer_resnet, 224),
    Family(zoo.FAMILY, zoo.builders, zoo.spec, zoo.build, zoo.infer_builder, 224),
)}
BUILTIN_NAMES = tuple(cifar.CIFAR_DEPTHS) + tuple(zoo.TV_RESNETS)
ROUTES = ("--arch NAME (a torchvision model name), --trust-pickle for a pickled nn.Module, a torch.export .pt2 "
          "program, or the Python API (trp_edge.compress(model, ...))")


def family_of(name: str) -> Family | None:
    return next((f for f in FAMILIES.values() if name in f.names()), None)


def is_known(name: str) -> bool:
    return family_of(name) is not None


def builtin_spec(name: str, in_channels: int = 3, num_classes: int | None = None) -> Spec:
    fam = family_of(name)
    if fam is None:
        raise InputError(f"unknown architecture {name!r}: use one of {', '.join(BUILTIN_NAMES)}, a torchvision "
                         "classification model name (torchvision.models.list_models()) or a .pt file")
    return fam.spec(name, in_channels, num_classes)


def build(spec: Spec) -> nn.Module:
    """The dense model of an architecture spec, randomly initialised."""
    fam = FAMILIES.get(spec.get("family"))
    if fam is None:
        hint = " (a torch.export program: load its .pt2 file)" if spec.get("family") == exported.FAMILY else ""
        raise InputError(f"unknown architecture family {spec.get('family')!r} in the model spec{hint}")
    return fam.build(spec)


def default_input_size(spec: Spec) -> int:
    if spec.get("input_size"):
        return int(spec["input_size"])
    fam = FAMILIES.get(spec.get("family"))
    return fam.input_size if fam else 224


def infer_spec(sd: dict[str, torch.Tensor]) -> Spec:
    """The architecture a state_dict was saved from, from its keys and shapes; one line naming the nearest
    candidates and the other routes in when nothing matches."""
    for fam in FAMILIES.values():
        spec = fam.infer(sd)
        if spec is not None:
            return spec
    near = zoo.nearest(sd)
    raise InputError(f"the state_dict ({len(sd)} tensors) matches no known architecture"
                     f"{'; ' + near if near else ''}; pass {ROUTES}")
