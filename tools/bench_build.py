#!/usr/bin/env python3
"""Latency of ResNet-18 (dense, and TRP-decomposed at about 3x fewer MACs, spatial and channel) on the
host target, side by side in one run: PyTorch eager, ONNX Runtime (fp32, INT8), TFLite/XNNPACK (fp32,
INT8), TVM untuned and TVM tuned with a stated MetaSchedule trial budget; at 1 and 2 threads, with
the tuning time. Each runtime's dense and compressed models are timed in alternating blocks
(trp_edge.profile); every artifact is the one `trp-edge build` produced and validated.

    python tools/bench_build.py --trials 128 --threads 1,2 --out bench-out/build

Prints a Markdown table and saves bench_build.{json,md} in OUT. Random weights: a latency study.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

THREADS_MAX = os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))  # before TVM starts its pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--speedup", type=float, default=3.0, help="MAC speedup of the decomposed models")
    ap.add_argument("--schemes", default="spatial,channel")
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per model (dense and each scheme)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runtimes", default="torch,ort,ort-int8,tflite,tflite-int8,tvm-untuned,tvm")
    ap.add_argument("--min-runs", type=int, default=10)
    ap.add_argument("--out", default="bench-out/build")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("trp_edge").setLevel(logging.INFO)

    import torch

    from trp_edge.api import compress
    from trp_edge.config import BuildConfig, CompressConfig, DecomposeConfig, ProfileConfig, TRPConfig
    from trp_edge.device.runner import load
    from trp_edge.models import load_model
    from trp_edge.profile import host_identity, time_alternating
    from trp_edge.workflows.build import build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schemes = args.schemes.split(",")
    runtimes = args.runtimes.split(",")
    models, builds, tuning = {}, {}, {}
    for scheme in schemes:
        d = out / f"{args.model}-{scheme}"
        if not (d / "report.json").is_file():
            torch.manual_seed(0)
            compress(CompressConfig(model=args.model, out=str(d), force=True, latency=None, trp=TRPConfig(steps=0),
                                    decompose=DecomposeConfig(scheme=scheme, target_speedup=args.speedup)),
                     progress=False)
        models[scheme] = json.loads((d / "report.json").read_text())
        b = out / f"build-{scheme}"
        want = {"ort": "ort" in runtimes or "ort-int8" in runtimes,
                "tflite": "tflite" in runtimes or "tflite-int8" in runtimes}
        rts = ",".join(r for r, w in want.items() if w)
        if rts:
            shape = "x".join(map(str, models[scheme]["input_shape"][1:]))
            build(BuildConfig(model=str(d), target="host", runtimes=rts, out=str(b), calib=f"synthetic:{shape}",
                              calib_images=8, eval_images=8))
        if "tvm-untuned" in runtimes:
            build(BuildConfig(model=str(d), target="host", runtimes="tvm", out=str(b / "untuned")))
        if "tvm" in runtimes:
            t0 = time.perf_counter()
            m = build(BuildConfig(model=str(d), target="host", runtimes="tvm", out=str(b / "tuned"),
                                  tune_trials=args.trials, tuning_db=str(out / "tuning-db"))).manifests["tvm"]
            tuning[scheme] = {"wall_s": round(time.perf_counter() - t0, 1), **m["tuning"]}
        builds[scheme] = b

    def runner(rt: str, scheme: str, variant: str, threads: int):
        b = builds[scheme]
        if rt == "torch":
            net = load_model(str(out / f"{args.model}-{scheme}" / ("dense.pt" if variant == "dense"
                                                                     else "compressed.pt"))).model.eval()
            x = torch.randn(*models[scheme]["input_shape"])

            def run():
                with torch.inference_mode():
                    net(x)
            return run
        import numpy as np

        x = np.random.default_rng(0).standard_normal(models[scheme]["input_shape"]).astype(np.float32)
        file, kind = {
            "ort": (b / "host" / "ort" / f"{variant}.onnx", "ort"),
            "ort-int8": (b / "host" / "ort" / f"{variant}.int8.onnx", "ort"),
            "tflite": (b / "host" / "tflite" / f"{variant}.tflite", "tflite"),
            "tflite-int8": (b / "host" / "tflite" / f"{variant}.int8.tflite", "tflite"),
            "tvm-untuned": (b / "untuned" / "host" / "tvm" / f"{variant}.so", "tvm"),
            "tvm": (b / "tuned" / "host" / "tvm" / f"{variant}.so", "tvm"),
        }[rt]
        fn = load(str(file), kind, threads)
        return lambda: fn(x)

    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rt in runtimes:
            # dense once (it is the same network for every scheme), then each scheme's compressed model
            fns = {"dense": runner(rt, schemes[0], "dense", threads)}
            for s in schemes:
                fns[s] = runner(rt, s, "compressed", threads)
            cfg = ProfileConfig(warmup=2, block=3 if rt != "tvm-untuned" else 1, min_runs=args.min_runs,
                                min_seconds=0.5, max_seconds=120, threads=threads)
            t = time_alternating(fns, cfg)
            row = {"runtime": rt, "threads": threads, "dense": t["dense"].to_dict()}
            for s in schemes:
                row[s] = t[s].to_dict()
                row[f"{s}_latency_speedup"] = t["dense"].median_ms / t[s].median_ms
                row[f"{s}_mac_speedup"] = models[s]["mac_speedup"]
            rows.append(row)
            print(json.dumps({k: (round(v["median_ms"], 2) if isinstance(v, dict) else v) for k, v in row.items()}),
                  flush=True)

    head = "| runtime | threads | dense ms | " + " | ".join(
        f"{s} ms (speedup, {models[s]['mac_speedup']:.2f}x MACs)" for s in schemes) + " |"
    lines = [head, "|" + "---|" * (3 + len(schemes))]
    for r in rows:
        cells = [f"{r[s]['median_ms']:.2f} ({r[f'{s}_latency_speedup']:.2f}x)" for s in schemes]
        lines.append(f"| {r['runtime']} | {r['threads']} | {r['dense']['median_ms']:.2f} | " + " | ".join(cells) + " |")
    for s, t in tuning.items():
        per = t.get("per_model", {})
        lines.append(f"\nTVM tuning ({s} build): {args.trials} trials per model requested; "
                     + "; ".join(f"{m}: {v['trials']} trials over {v['tuned']} kernels "
                                 f"({v['reused_from_database']} reused) in {v['seconds']:.0f} s"
                                 for m, v in per.items()) + f"; build wall time {t['wall_s']:.0f} s")
    table = "\n".join(lines)
    print(table)
    meta = {"machine": platform.platform(), "host": host_identity(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "args": vars(args), "tvm_num_threads": THREADS_MAX}
    (out / "bench_build.json").write_text(json.dumps({"meta": meta, "rows": rows, "tuning": tuning,
                                                      "models": {s: {"mac_speedup": m["mac_speedup"]}
                                                                 for s, m in models.items()}}, indent=2))
    (out / "bench_build.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
