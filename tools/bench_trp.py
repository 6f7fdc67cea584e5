#!/usr/bin/env python3
"""The paper's Table-1 protocol on a small data set: SGD baseline then direct TSVD; TRP1 (channel);
TRP1+Nu; TRP2 (spatial); TRP2+Nu. Each run trains the same model from the same seed for the same
epochs, then decomposes at the same e without fine-tuning.

Prints a Markdown table and saves the numbers to OUT/bench_trp.json (and each run's artifacts under
OUT/<run>/).

    python tools/bench_trp.py --data fashion-mnist --epochs 5
    python tools/bench_trp.py --data cifar10:/path/to/cifar-10-batches-py --epochs 164 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from trp_edge.api import compress
from trp_edge.config import CompressConfig, DecomposeConfig, TRPConfig

RUNS = {  # name: (scheme, period, nuclear)
    "SGD+TSVD": ("spatial", 0, 0.0),
    "TRP2+Nu": ("spatial", 20, 3e-4),
    "TRP2": ("spatial", 20, 0.0),
    "TRP1+Nu": ("channel", 20, 3e-4),
    "TRP1": ("channel", 20, 0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--energy", type=float, default=0.02)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nuclear", type=float, default=None,
                    help="λ for the +Nu runs (default: the paper's 3e-4); scale it up for short schedules")
    ap.add_argument("--calibrate", action="store_true",
                    help="latency-aware ranks for this machine's ORT (compress's default); off: MAC-based (the paper)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    ap.add_argument("--out", default="bench-out/trp")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("trp_edge").setLevel(logging.INFO)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.runs.split(","):
        scheme, period, nuclear = RUNS[name]
        if nuclear and args.nuclear is not None:
            nuclear = args.nuclear
        cfg = CompressConfig(
            model=args.model, data=args.data, out=str(out / name), force=True, calibrate=args.calibrate,
            decompose=DecomposeConfig(scheme=scheme, energy=args.energy),
            trp=TRPConfig(epochs=args.epochs, period=period, nuclear=nuclear, lr=args.lr, batch=args.batch,
                          device=args.device))
        t0 = time.perf_counter()
        r = compress(cfg, progress=False).report
        rows = [(scheme, r)]
        if period == 0:  # the same SGD model, decomposed directly with the other scheme too
            other = "channel" if scheme == "spatial" else "spatial"
            rows.append((other, compress(CompressConfig(
                model=str(out / name / "dense.pt"), data=args.data, out=str(out / f"{name}-{other}"), force=True,
                calibrate=args.calibrate,
                decompose=DecomposeConfig(scheme=other, energy=args.energy), trp=TRPConfig(steps=0)),
                progress=False).report))
        for sch, rep in rows:
            row = {"run": name, "scheme": sch, "epochs": args.epochs, "energy": args.energy, "nuclear": nuclear,
                   "dense_acc": rep["dense"]["accuracy"], "decomposed_acc": rep["compressed"]["accuracy"],
                   "mac_speedup": rep["mac_speedup"], "step_ms": r["training"]["step_ms"],
                   "svd_ms_per_step": r["training"]["svd_ms_per_step"], "wall_s": time.perf_counter() - t0}
            results.append(row)
            print(json.dumps(row), flush=True)
    sgd = {r["scheme"]: r for r in results if r["run"] == "SGD+TSVD"}
    base_ms = next(iter(sgd.values()))["step_ms"] if sgd else None
    lines = ["| run | scheme | dense acc | decomposed acc | MAC speedup | step time vs SGD |",
             "|---|---|---|---|---|---|"]
    for r in results:
        rel = f"{r['step_ms'] / base_ms:.2f}x" if base_ms else "n/a"
        lines.append(f"| {r['run']} | {r['scheme']} | {r['dense_acc']:.2f} | {r['decomposed_acc']:.2f} | "
                     f"{r['mac_speedup']:.2f}x | {rel} ({r['step_ms']:.0f} ms) |")
    table = "\n".join(lines)
    print(table)
    meta = {"machine": platform.platform(), "cpu": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    (out / "bench_trp.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "bench_trp.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
