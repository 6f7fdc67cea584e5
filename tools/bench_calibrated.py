#!/usr/bin/env python3
"""Energy-only vs latency-calibrated decomposition, side by side in one run on this machine (ONNX Runtime).

Makes (or reuses) three models of MODEL at about SPEEDUP x fewer MACs: the energy rule alone, and the same
energy with `--latency-table` (ranks rounded up to the fastest measured rank, slower pairs kept dense);
times dense, energy-only and calibrated ONNX models in alternating blocks; compares the table's predicted
conv latency with the measured whole-net latency.

    python tools/bench_calibrated.py --table calibration/host/ort/resnet18.csv --out bench-out/calibrated
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--scheme", default="spatial")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--table", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench-out/calibrated")
    args = ap.parse_args()

    import numpy as np
    import torch

    from trp_edge.calibrate import load_table
    from trp_edge.compress import compress
    from trp_edge.config import CompressConfig, DecomposeConfig, ProfileConfig, TRPConfig
    from trp_edge.device.runner import load_ort
    from trp_edge.profile import host_identity, time_alternating

    out = Path(args.out)
    reps = {}
    for name, table in (("energy", None), ("calibrated", args.table)):
        torch.manual_seed(0)
        reps[name] = compress(CompressConfig(
            model=args.model, out=str(out / name), force=True, latency=None, trp=TRPConfig(steps=0),
            decompose=DecomposeConfig(scheme=args.scheme, target_speedup=args.speedup, latency_table=table)),
            progress=False).report
    shape = reps["energy"]["input_shape"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    runs = {"dense": load_ort(str(out / "energy" / "dense.onnx"), args.threads),
            "energy": load_ort(str(out / "energy" / "model.onnx"), args.threads),
            "calibrated": load_ort(str(out / "calibrated" / "model.onnx"), args.threads)}
    t = time_alternating({k: (lambda f=f: f(x)) for k, f in runs.items()},
                         ProfileConfig(warmup=5, block=5, min_runs=60, min_seconds=3, max_seconds=120))
    tab = load_table(args.table)
    predicted = {}
    for name, rep in reps.items():
        ms = 0.0
        for la in rep["layers"]:
            if la["rank"] is None:
                ms += tab.latency(la["name"], "dense", 0) or 0.0
            else:
                ms += tab.ranks(la["name"], la["scheme"]).get(la["rank"], float("nan"))
        predicted[name] = ms
    predicted["dense"] = sum(tab.latency(la["name"], "dense", 0) or 0.0 for la in reps["energy"]["layers"])
    rows = []
    for name in ("dense", "energy", "calibrated"):
        macs = reps["energy"]["dense"]["macs"] if name == "dense" else reps[name]["compressed"]["macs"]
        mac_x = reps["energy"]["dense"]["macs"] / macs
        lat_x = t["dense"].median_ms / t[name].median_ms
        rows.append({"model": name, "macs": macs, "mac_speedup": mac_x, "median_ms": t[name].median_ms,
                     "p10_ms": t[name].p10_ms, "p90_ms": t[name].p90_ms, "runs": t[name].runs,
                     "latency_speedup": lat_x, "efficiency": lat_x / mac_x, "predicted_conv_ms": predicted[name],
                     "slower_layers_kept_dense": sum(1 for la in reps.get(name, {"layers": []})["layers"]
                                                     if (la.get("reason") or "").startswith("calibrated"))})
    lines = ["| model | MAC speedup | median ms (p10-p90) | latency speedup | efficiency | predicted conv ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mac_speedup']:.2f}x | {r['median_ms']:.2f} ({r['p10_ms']:.2f}-"
                     f"{r['p90_ms']:.2f}) | {r['latency_speedup']:.2f}x | {r['efficiency']:.2f} | "
                     f"{r['predicted_conv_ms']:.2f} |")
    table = "\n".join(lines)
    print(table)
    (out / "bench_calibrated.json").write_text(json.dumps(
        {"rows": rows, "host": host_identity(), "date": time.strftime("%Y-%m-%d"), "args": vars(args)}, indent=2))
    (out / "bench_calibrated.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
