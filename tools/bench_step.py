#!/usr/bin/env python3
"""Step time of plain SGD, TRP and TRP+Nu side by side in one run, and where the SVDs run.

The issue's target: a TRP+Nu step costs at most 1.15x a plain SGD step on the GPU. The nuclear-norm term is
timed with batched SVDs (on the training device and on the CPU) and with Newton-Schulz (matrix products). Each variant
runs the same model, batch and data for --steps steps after --warmup; variants are interleaved in
--rounds rounds so drift hits them all. Prints a table and saves OUT/bench_step.json.

    python tools/bench_step.py --model resnet20 --shape 3x32x32 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from trp_edge.config import DecomposeConfig, TRPConfig
from trp_edge.data import synthetic
from trp_edge.models import build, builtin_spec
from trp_edge.trp import TRPTrainer


def variants(svd_devices):
    """(name, period, nuclear, svd device, nuclear solver)"""
    yield "SGD", 0, 0.0, "same", "svd"
    for dev in svd_devices:
        yield f"TRP (svd {dev})", 20, 0.0, dev, "svd"
        yield f"TRP+Nu (svd {dev})", 20, 3e-4, dev, "svd"
    yield "TRP+Nu (newton-schulz)", 20, 3e-4, "same", "newton-schulz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--shape", default="3x32x32")
    ap.add_argument("--scheme", default="spatial")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--svd-devices", default="same,cpu")
    ap.add_argument("--out", default="bench-out/step")
    args = ap.parse_args()

    c = int(args.shape.split("x")[0])
    data = synthetic(args.shape, n_train=args.batch * 8, n_test=args.batch, classes=10)
    runs = list(variants(args.svd_devices.split(",")))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    svd: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for _ in range(args.rounds):
        for name, period, nuclear, svd_dev, solver in runs:
            torch.manual_seed(0)
            model = build(builtin_spec(args.model, in_channels=c, num_classes=10))
            cfg = TRPConfig(steps=args.warmup + args.steps, period=period, nuclear=nuclear, batch=args.batch,
                            device=args.device, svd_device=svd_dev, schedule="constant", nuclear_solver=solver)
            tr = TRPTrainer(model, data, cfg, DecomposeConfig(scheme=args.scheme, energy=0.02), progress=False)
            marks = {}

            def mark(t, marks=marks):
                if t.step == args.warmup:
                    t._sync()
                    marks["t0"], marks["svd0"] = time.perf_counter(), t._svd_seconds

            tr.on_step = mark
            tr.train()
            tr._sync()
            times[name].append(1000 * (time.perf_counter() - marks["t0"]) / (args.steps))
            svd[name].append(1000 * (tr._svd_seconds - marks["svd0"]) / args.steps)
    base = statistics.median(times["SGD"])
    rows = []
    for name, *_ in runs:
        ms = statistics.median(times[name])
        rows.append({"variant": name, "step_ms": ms, "svd_ms": statistics.median(svd[name]), "vs_sgd": ms / base,
                     "all_ms": times[name]})
    dev = tr.device
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "args": vars(args)}
    print(f"{args.model} {args.shape} batch {args.batch}, {args.scheme}, on {meta['device']} "
          f"({meta['threads']} threads), torch {torch.__version__}")
    print("| variant | step ms (median of rounds) | of which SVD ms | vs SGD |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['svd_ms']:.1f} | {r['vs_sgd']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
