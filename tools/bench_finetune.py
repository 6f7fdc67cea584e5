"""Fine-tuning from a trained checkpoint: which path reaches a MAC target closest to the dense model's top-1.

Each row is one `trp-edge compress DENSE --data fashion-mnist --target-speedup T ...` run from the same trained
dense checkpoint, within one budget of training epochs:

    tsvd            --steps 0                          direct truncation, no training
    tsvd+ft         --steps 0 --finetune B             the truncated model trained (ranks fixed)
    trp             --epochs B --nuclear L             TRP+Nu, then the decomposition at its ranks
    trp+ft          --epochs B-1 --nuclear L --finetune 1
    ...+kd          the same with --distill (the dense checkpoint as teacher)

Prints one line per run and appends it to OUT/finetune.jsonl (top-1 of dense and compressed, MAC speedup, wall
seconds, the command).

    .venv/bin/python tools/bench_finetune.py --dense trp_edge/pretrained/resnet20-fashion-mnist.pt \
        --targets 2,3,4 --seeds 0,1 --budget 3 --out bench-out/finetune
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("tsvd", "tsvd+ft", "trp", "trp+ft", "tsvd+ft+kd", "trp+kd", "trp+ft+kd")


def row_options(row: str, budget: int, nuclear: float) -> list[str]:
    base = row.removesuffix("+kd")
    opts = {"tsvd": ["--steps", "0"],
            "tsvd+ft": ["--steps", "0", "--finetune", str(budget)],
            "trp": ["--epochs", str(budget), "--nuclear", str(nuclear)],
            "trp+ft": ["--epochs", str(budget - 1), "--nuclear", str(nuclear), "--finetune", "1"]}[base]
    return opts + (["--distill"] if row.endswith("+kd") else [])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", required=True, help="the trained dense checkpoint")
    ap.add_argument("--targets", default="3", help="MAC targets, comma-separated")
    ap.add_argument("--seeds", default="0", help="seeds, comma-separated")
    ap.add_argument("--budget", type=int, default=3, help="training epochs per row")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows, comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--nuclear", type=float, default=3e-4)
    ap.add_argument("--scheme", default="spatial")
    ap.add_argument("--extra", default="", help="more compress options, as one string")
    ap.add_argument("--out", default="bench-out/finetune")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "trp_edge.cli"]
    for target in args.targets.split(","):
        for seed in args.seeds.split(","):
            for row in args.rows.split(","):
                if row not in ROWS:
                    sys.exit(f"unknown row {row!r}: use {', '.join(ROWS)}")
                if row.startswith("trp+ft") and args.budget < 2:
                    continue
                run = out / f"{row}-{target}x-s{seed}"
                cmd = [*exe, "compress", args.dense, "--data", "fashion-mnist", "--scheme", args.scheme,
                       "--target-speedup", target, "--seed", seed, "--lr", str(args.lr), "--runtime", "ort,tflite",
                       "--precision", "fp32", "--out", str(run), "--force", "-q",
                       *row_options(row, args.budget, args.nuclear), *args.extra.split()]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."})
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(f"{row} {target}x seed {seed}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                rep = json.loads((run / "report.json").read_text())
                lat = rep.get("latency") or {}
                entry = {"row": row, "target": float(target), "seed": int(seed), "budget_epochs": args.budget,
                         "dense_top1": rep["dense"]["accuracy"], "top1": rep["compressed"]["accuracy"],
                         "initial_top1": rep.get("initial_accuracy"), "mac_speedup": round(rep["mac_speedup"], 3),
                         "ort_speedup": lat.get("latency_speedup"), "wall_s": round(wall, 1), "cpu": cpu_name(),
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "command": "trp-edge " + " ".join(cmd[3:])}
                with (out / "finetune.jsonl").open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                ref = entry["initial_top1"] or entry["dense_top1"]
                print(f"{row:11s} {target}x seed {seed}: top-1 {entry['top1']:.2f} (dense {ref:.2f}, "
                      f"{entry['top1'] - ref:+.2f} pt), {entry['mac_speedup']:.2f}x MACs, {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
