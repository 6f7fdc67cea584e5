#!/usr/bin/env python3
"""How far a latency table lets rank choice go: the best efficiency any choice of measured ranks could reach.

For each table (a `trp-edge calibrate` .csv), every layer may stay dense or take any measured pair of any
scheme the table has; a knapsack over MACs finds the choice with the lowest predicted whole-net latency
(the table's prediction: net_ms − Σ dense convs + Σ chosen) among those with SPEEDUP to SPEEDUP·1.03 x fewer
MACs. Accuracy is ignored, so this is an upper bound on what ranks can buy on that deployment: when it is
below a goal, no planner reaches the goal there, and the pairs themselves (the runtime's kernels) are the limit.

    python tools/bench_bound.py bench-out/intel-cal/host/ort/resnet18*.csv --speedup 3 --out bench-out/bound
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BINS = 3000  # MAC resolution of the knapsack: the budget in this many steps


def bound(table, layers_by_scheme: dict, total: int, other: int, speedup: float) -> dict:
    """The lowest-latency choice with speedup..speedup·1.03 x fewer MACs (dict: latency, MACs, choices)."""
    from trp_edge.lowrank import get_scheme

    opts: dict[str, list[tuple[str, int, int, float]]] = {}
    for scheme, layers in layers_by_scheme.items():
        for la in layers:
            dense = table.dense(la.name)
            if dense is None:
                continue
            o = opts.setdefault(la.name, [("dense", 0, la.macs_dense, dense)])
            if la.reason is None:
                sch = get_scheme(scheme)
                o += [(scheme, r, sch.pair_macs(la.module, la.in_hw, la.out_hw, r), ms)
                      for r, ms in table.ranks(la.name, scheme).items()]
    fixed = sum(la.macs_dense for la in next(iter(layers_by_scheme.values())) if la.name not in opts)
    budget = (total + other) / speedup - other - fixed
    q = budget / BINS
    # dp[bin] = (latency of the chosen convs, back pointer): the fastest choice so far at that MAC bin
    dp: dict[int, tuple[float, tuple | None]] = {0: (0.0, None)}
    for name, o in opts.items():
        nxt: dict[int, tuple[float, tuple | None]] = {}
        for b, (lat, back) in dp.items():
            for a in o:
                nb = b + round(a[2] / q)
                if nb <= BINS and (nb not in nxt or lat + a[3] < nxt[nb][0]):
                    nxt[nb] = (lat + a[3], (name, a, back))
        dp = nxt
    floor = BINS / 1.03
    lat, back = min((v for b, v in dp.items() if b >= floor), key=lambda v: v[0])
    chosen = {}
    while back is not None:
        name, a, back = back
        chosen[name] = a
    net, dense_sum = table.header["net_ms"], sum(o[0][3] for o in opts.values())
    ms = net - dense_sum + lat
    macs = sum(a[2] for a in chosen.values()) + fixed
    mac_speedup = (total + other) / (macs + other)
    return {"net_ms": net, "predicted_ms": ms, "latency_speedup": net / ms, "mac_speedup": mac_speedup,
            "efficiency": net / ms / mac_speedup,
            "layers": {n: {"scheme": a[0], "rank": a[1], "mac_fraction": a[2] / opts[n][0][2],
                           "latency_fraction": a[3] / opts[n][0][3]} for n, a in chosen.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="+", help="latency tables (.csv)")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--schemes", default=None, help="schemes to choose from [default: the table's]")
    ap.add_argument("--model", default=None,
                    help="the model the tables were measured on: a name or file [default: the table's model name]")
    ap.add_argument("--out", default="bench-out/bound")
    args = ap.parse_args()

    import torch

    from trp_edge.config import DecomposeConfig
    from trp_edge.flops import count_macs
    from trp_edge.latency_table import load_table
    from trp_edge.lowrank import conv_layers
    from trp_edge.models import load_model

    rows = []
    for path in args.tables:
        table = load_table(path)
        h = table.header
        model = load_model(args.model or h["model"]).model.eval()
        example = torch.zeros(*h["input_shape"])
        schemes = args.schemes.split(",") if args.schemes else h["schemes"]
        by = {s: conv_layers(model, example, DecomposeConfig(scheme=s)) for s in schemes}
        total = count_macs(model, example).total
        convs = sum(la.macs_dense for la in next(iter(by.values())))
        for scheme_set in ([[s] for s in schemes] + ([schemes] if len(schemes) > 1 else [])):
            b = bound(table, {s: by[s] for s in scheme_set}, convs, total - convs, args.speedup)
            row = {"table": path, "deployment": table.deployment, "schemes": "+".join(scheme_set), **b}
            rows.append(row)
            print(f"{path} ({'+'.join(scheme_set)}): {b['net_ms']:.2f} -> {b['predicted_ms']:.2f} ms, "
                  f"{b['latency_speedup']:.2f}x for {b['mac_speedup']:.2f}x fewer MACs: efficiency at most "
                  f"{b['efficiency']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bound.json").write_text(json.dumps(
        {"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
