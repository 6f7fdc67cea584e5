"""Runtime ops mapped back to the model's layers.

The torch model is run once with hooks on every nn.Conv2d, which gives each conv call in execution order
with its kernel, channels and output size. A runtime's conv kernels (ONNX Runtime's profiled nodes, TVM's
fused VM functions) carry their weight and output shapes; each is matched to the first unmatched torch
conv with the same kernel and output size whose channels fit (ORT pads channels to its NCHWc block).
A decomposed conv's two convs roll up to the layer they replaced; layout reorders that follow a conv are
charged to it; everything else (adds, pooling, the classifier) is reported as `other`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .contracts import CompressReport

CONV_OPS = {"conv", "Conv", "FusedConv", "QLinearConv", "NhwcFusedConv"}
BLOCK = 16  # channel padding tolerated between torch and a blocked runtime layout


@dataclass
class ConvCall:
    name: str
    layer: str
    kh: int
    kw: int
    in_c: int
    out_c: int
    oh: int
    ow: int


def layer_of(name: str) -> str:
    for suffix in (".first", ".second"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def conv_calls(model_pt: Path, shape: tuple[int, ...]) -> list[ConvCall]:
    import torch

    from .config import DecomposeConfig
    from .lowrank import conv_layers
    from .models import load_model

    model = load_model(str(model_pt)).model.eval()
    return [ConvCall(la.name, layer_of(la.name), *la.module.kernel_size, la.module.in_channels,
                     la.module.out_channels, *la.out_hw)
            for la in conv_layers(model, torch.zeros(*shape), DecomposeConfig())]


def _fits(c: ConvCall, weight: list[int], output: list[int]) -> bool:
    if len(weight) != 4 or len(output) != 4:
        return False
    n, cin, kh, kw = weight
    return ((kh, kw) == (c.kh, c.kw) and (output[2], output[3]) == (c.oh, c.ow)
            and c.out_c <= n < c.out_c + BLOCK and c.in_c <= cin < c.in_c + BLOCK)


def attribute(ops: list[dict[str, Any]], calls: list[ConvCall]) -> tuple[dict[str, float], float, int]:
    """ms per layer, ms of other ops, and the number of conv kernels that matched no torch conv."""
    used = [False] * len(calls)
    per: dict[str, float] = {}
    other, unmatched, last = 0.0, 0, None
    for op in ops:
        if op["op"] in CONV_OPS and op.get("weight") and op.get("output"):
            i = next((i for i, c in enumerate(calls) if not used[i] and _fits(c, op["weight"], op["output"])), None)
            if i is None:
                unmatched += 1
                other += op["ms"]
                last = None
                continue
            used[i] = True
            last = calls[i].layer
            per[last] = per.get(last, 0.0) + op["ms"]
        elif last is not None and op["op"].startswith("Reorder"):
            per[last] += op["ms"]
        else:
            other += op["ms"]
    return per, other, unmatched


def per_layer(model: Path, src: CompressReport, dense_ops: list[dict[str, Any]],
              comp_ops: list[dict[str, Any]]) -> dict[str, Any]:
    from .models import model_file

    shape = tuple(src.input_shape)
    dense_ms, dense_other, dense_un = attribute(dense_ops, conv_calls(model_file(model, "dense"), shape))
    comp_ms, comp_other, comp_un = attribute(comp_ops, conv_calls(model_file(model, "compressed"), shape))
    rows = []
    for la in src.layers:
        macs_c = la["macs_lowrank"] if la["rank"] is not None else la["macs_dense"]
        d, c = dense_ms.get(la["name"]), comp_ms.get(la["name"])
        row = {"name": la["name"], "scheme": la.get("scheme"), "rank": la["rank"], "full_rank": la.get("full_rank"),
               "macs_dense": la["macs_dense"], "macs_compressed": macs_c, "mac_speedup": la["macs_dense"] / macs_c,
               "dense_ms": d, "compressed_ms": c, "latency_speedup": d / c if d and c else None,
               "slower": bool(la["rank"] is not None and d and c and c > d),
               # what a latency table predicted (compress --latency-table) and the rank the energy rule gave
               "energy_rank": la.get("energy_rank"), "planned_rank": la.get("planned_rank"),
               "predicted_ms": la.get("predicted_ms"), "reason": la.get("reason")}
        rows.append(row)
    total = {"dense_ms": sum(o["ms"] for o in dense_ops), "compressed_ms": sum(o["ms"] for o in comp_ops)}
    return {"layers": rows, "layers_other_ms": {"dense": dense_other, "compressed": comp_other},
            "layers_unmatched_kernels": {"dense": dense_un, "compressed": comp_un},
            "layers_profiled_total_ms": total}
