#!/usr/bin/env python3
"""How far a latency table lets rank choice go: the best efficiency any choice of measured ranks could reach.

For each table (a `trp-edge calibrate` .csv), every layer may stay dense or take any measured pair of any
scheme the table has; a knapsack over MACs finds the choice with the lowest predicted whole-net latency
(the table's prediction: net_ms − Σ dense convs + Σ chosen) among those with SPEEDUP to SPEEDUP·1.03 x fewer
MACs. Accuracy is ignored, so this is an upper bound on what ranks can buy on that deployment: when it is
below a goal, no planner reaches the goal there, and the pairs themselves (the runtime's kernels) are the limit.

With --planner-loss, accuracy is not ignored: the choice may drop no more singular-value energy (summed over
layers, each layer's dropped fraction of its own energy) than trp-edge's planner drops at that MAC target
with the table (one energy e for all layers, ranks rounded to the fastest measured pair, the guard). What
that row gains over the planner's row is what a latency-aware allocation of ranks across layers (instead of
one e) could buy at the same MACs and the same energy kept; the planner's own latency allocation (compress's
default, trp_edge.allocate) is printed beside it.

    python tools/bench_bound.py bench-out/intel-cal/host/ort/resnet18*.csv --speedup 3 --out bench-out/bound
    python tools/bench_bound.py bench-out/amd-cal/host/ort/resnet18.csv --schemes spatial --planner-loss
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def options(table, layers_by_scheme: dict, svals: dict | None = None) -> dict[str, list[tuple]]:
    """Per layer the table timed: (scheme, rank, MACs, ms, dropped energy) for dense (scheme "dense", rank 0)
    and every measured pair; the dropped energy (1 - kept fraction) needs the layer's singular values
    (svals: {scheme: {layer: s}}), else 0."""
    from trp_edge.lowrank import get_scheme, kept_energy

    opts: dict[str, list[tuple]] = {}
    for scheme, layers in layers_by_scheme.items():
        for la in layers:
            dense = table.dense(la.name)
            if dense is None:
                continue
            o = opts.setdefault(la.name, [("dense", 0, la.macs_dense, dense, 0.0)])
            if la.reason is None:
                sch, s = get_scheme(scheme), (svals or {}).get(scheme, {}).get(la.name)
                o += [(scheme, r, sch.pair_macs(la.module, la.in_hw, la.out_hw, r), ms,
                       0.0 if s is None else 1.0 - kept_energy(s, r))
                      for r, ms in table.ranks(la.name, scheme).items()]
    return opts


def _window(total: int, other: int, fixed: int, speedup: float) -> tuple[float, float]:
    """The MACs the timed convs may keep: (floor, budget) for speedup·1.03..speedup x fewer MACs in all."""
    budget = (total + other) / speedup - other - fixed
    return budget / 1.03, budget


def _choices(opts: dict[str, list[tuple]]) -> list[list]:
    from trp_edge.allocate import Choice

    return [[Choice(a[2], a[3], a[4]) for a in o] for o in opts.values()]


def bound(table, opts: dict[str, list[tuple]], fixed: int, total: int, other: int, speedup: float) -> dict:
    """The lowest-latency choice with speedup..speedup·1.03 x fewer MACs (trp_edge.allocate.knapsack), as
    `summary`. `fixed`: the MACs of the convs the table did not time."""
    from trp_edge.allocate import knapsack

    floor, budget = _window(total, other, fixed, speedup)
    return summary(table, opts, knapsack(_choices(opts), budget, 0.0, floor), fixed, total, other)


def summary(table, opts: dict[str, list[tuple]], chosen: list[int], fixed: int, total: int, other: int) -> dict:
    """Predicted latency (latency_table.predict), MACs and dropped energy of one choice per layer of `opts`."""
    from trp_edge.latency_table import predict

    picked = {n: o[j] for (n, o), j in zip(opts.items(), chosen)}
    pr = predict(table, [(n, a[0], a[1] or None) for n, a in picked.items()])
    net, ms = pr["dense_ms"], pr["compressed_ms"]
    macs = sum(a[2] for a in picked.values()) + fixed
    mac_speedup = (total + other) / (macs + other)
    return {"net_ms": net, "predicted_ms": ms, "latency_speedup": net / ms, "mac_speedup": mac_speedup,
            "efficiency": net / ms / mac_speedup, "dropped_energy": sum(a[4] for a in picked.values()),
            "layers": {n: {"scheme": a[0], "rank": a[1], "mac_fraction": a[2] / opts[n][0][2],
                           "latency_fraction": a[3] / opts[n][0][3]} for n, a in picked.items()}}


def planner(table, model, example, schemes: list[str], other: int, speedup: float,
            allocate: str = "uniform") -> tuple[dict, dict]:
    """trp-edge's own plan at that MAC target with the table (compress --target-speedup --allocate A):
    {layer: (scheme, rank)}, rank 0 for dense; and the singular values it planned with ({scheme: {layer: s}})."""
    from trp_edge.config import DecomposeConfig
    from trp_edge.planning import plan_for_speedup, scheme_views

    cfg = DecomposeConfig(scheme=schemes[0] if len(schemes) == 1 else "auto", target_speedup=speedup,
                          allocate=allocate)
    views = scheme_views(model, example, cfg)
    _, plans = plan_for_speedup(views, cfg, other, table)
    plan = {p.name: ("dense", 0) if p.rank is None else (p.scheme, p.rank) for p in plans}
    return plan, {s: v.svals for s, v in views.items()}


def at_loss(table, opts: dict, fixed: int, total: int, other: int, speedup: float, dropped: float) -> dict:
    """The fastest choice found within the MAC window that drops at most `dropped` energy
    (trp_edge.allocate.allocate), as `summary`."""
    from trp_edge.allocate import allocate

    floor, budget = _window(total, other, fixed, speedup)
    chosen = allocate(_choices(opts), budget, dropped, floor)
    if chosen is None:
        raise SystemExit(f"no choice at that MAC target drops at most {dropped:.3f} energy")
    return summary(table, opts, chosen, fixed, total, other)


def table_rows(path: str, table, model, example, layers: dict, convs: int, other: int, args) -> list[dict]:
    """The bound for one table and scheme set; with --planner-loss also the planner's row and the bound at the
    planner's dropped energy."""
    name = "+".join(layers)
    plan, svals = planner(table, model, example, list(layers), other, args.speedup) if args.planner_loss else ({}, {})
    opts = options(table, layers, svals)
    fixed = sum(la.macs_dense for la in next(iter(layers.values())) if la.name not in opts)
    found = {"accuracy ignored": bound(table, opts, fixed, convs, other, args.speedup)}
    if plan:
        def index(plan: dict) -> list[int]:
            return [next(j for j, a in enumerate(o) if a[:2] == plan[n]) for n, o in opts.items()]

        found["planner (one e)"] = ours = summary(table, opts, index(plan), fixed, convs, other)
        spread, _ = planner(table, model, example, list(layers), other, args.speedup, "latency")
        found["planner (latency allocation)"] = summary(table, opts, index(spread), fixed, convs, other)
        found["at the planner's dropped energy"] = at_loss(table, opts, fixed, convs, other, args.speedup,
                                                           ours["dropped_energy"])
    rows = []
    for kind, b in found.items():
        rows.append({"table": path, "deployment": table.deployment, "schemes": name, "choice": kind, **b})
        print(f"{path} ({name}), {kind}: {b['net_ms']:.2f} -> {b['predicted_ms']:.2f} ms, "
              f"{b['latency_speedup']:.2f}x for {b['mac_speedup']:.2f}x fewer MACs: efficiency {b['efficiency']:.3f}"
              + (f", dropped energy {b['dropped_energy']:.3f}" if args.planner_loss else ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="+", help="latency tables (.csv)")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--schemes", default=None, help="schemes to choose from [default: the table's]")
    ap.add_argument("--model", default=None,
                    help="the model the tables were measured on: a name or file [default: the table's model name]")
    ap.add_argument("--planner-loss", action="store_true",
                    help="also trp-edge's planner at that target and the fastest choice dropping no more energy")
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
        torch.manual_seed(0)  # the same random weights on every run (a built-in name is randomly initialised)
        model = load_model(args.model or h["model"]).model.eval()
        example = torch.zeros(*h["input_shape"])
        schemes = args.schemes.split(",") if args.schemes else h["schemes"]
        by = {s: conv_layers(model, example, DecomposeConfig(scheme=s)) for s in schemes}
        total = count_macs(model, example).total
        convs = sum(la.macs_dense for la in next(iter(by.values())))
        other = total - convs
        for scheme_set in ([[s] for s in schemes] + ([schemes] if len(schemes) > 1 else [])):
            layers = {s: by[s] for s in scheme_set}
            rows += table_rows(path, table, model, example, layers, convs, other, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bound.json").write_text(json.dumps(
        {"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
