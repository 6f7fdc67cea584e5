"""MACs per layer, counted by torch.utils.flop_counter (convolutions and matrix products)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MacCount:
    total: int
    per_module: dict[str, int]  # qualified module name -> MACs, inclusive of children ("" is the model)


def count_macs(model: nn.Module, example: torch.Tensor) -> MacCount:
    """MACs of one forward pass on `example` (batch as given), one MAC = two FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(example)
    finally:
        model.train(was_training)
    per = {}
    for key, ops in fc.get_flop_counts().items():
        if key == "Global":
            continue
        name = key.partition(".")[2]  # drop the root class name
        per[name] = int(sum(ops.values())) // 2
    return MacCount(int(fc.get_total_flops()) // 2, per)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
