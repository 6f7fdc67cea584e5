#!/usr/bin/env python3
"""Latency-aware by default, per deployment: MODEL compressed at about SPEEDUP x fewer MACs for each runtime x
precision x thread count with that deployment's latency table (found in --calibration or measured first, as
`trp-edge compress` does by default), then deployed on this machine, every model timed side by side with the
MAC-based one (--no-calibrate) in one alternating run per runtime and thread count. --scheme and --allocate
take several values: each scheme and rank allocation gets its table-ranked models in the same run.

Prints and saves one row per deployment: MAC speedup, dense and compressed ms, latency speedup, efficiency, the
table's predicted whole-net latency and its error, as predicted and anchored on the dense net measured in the
run (the measured dense times the predicted speedup); and per thread count, the best compressed INT8 model
against the fastest dense deployment of any runtime.

    python tools/bench_deployments.py --model resnet18 --speedup 3 --threads 1,2 --out bench-out/deployments
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--scheme", default="spatial",
                    help="scheme(s), comma-separated: each gets its table-ranked models, timed in the same run")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--allocate", default="latency",
                    help="rank allocation(s) of the table-ranked models, comma-separated: latency, uniform")
    ap.add_argument("--runtimes", default="ort,tflite")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calibration", default=None, help="latency tables [default: as compress]")
    ap.add_argument("--min-runs", type=int, default=40)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--out", default="bench-out/deployments")
    args = ap.parse_args()

    import torch

    from trp_edge.api import compress
    from trp_edge.config import CompressConfig, DecomposeConfig, DeployConfig, ProfileConfig, TRPConfig
    from trp_edge.profile import host_identity
    from trp_edge.workflows.deploy import deploy

    out = Path(args.out)
    protocol = ProfileConfig(warmup=5, block=5, min_runs=args.min_runs, min_seconds=args.min_seconds, max_seconds=600)
    rows, best = [], []
    t0 = time.perf_counter()
    for threads in map(int, args.threads.split(",")):
        dense_ms: dict[str, float] = {}
        int8_ms: dict[str, float] = {}
        for rt in args.runtimes.split(","):
            models, made_by = {}, {}
            schemes, allocs = args.scheme.split(","), args.allocate.split(",")
            made = [(s, a, p) for s in schemes for a in allocs for p in args.precisions.split(",")] + \
                [(schemes[0], "uniform", "macs")]
            for scheme, alloc, prec in made:
                torch.manual_seed(0)  # the same random weights for every model: one dense model
                tag = "-".join([*([scheme] if len(schemes) > 1 else []),
                                *([alloc] if len(allocs) > 1 and prec != "macs" else []), prec])
                d = out / f"t{threads}-{rt}-{tag}"
                # the MAC-based model sees no table at all (an empty folder, nothing measured)
                cal = str(out / "no-tables") if prec == "macs" else args.calibration
                compress(CompressConfig(model=args.model, out=str(d), force=True, latency=None, trp=TRPConfig(steps=0),
                                        decompose=DecomposeConfig(scheme=scheme, target_speedup=args.speedup,
                                                                  allocate=alloc),
                                        runtime=rt, precision=None if prec == "macs" else prec, threads=threads,
                                        calibrate=prec != "macs", calibration=cal), progress=False)
                models[d.name], made_by[d.name] = str(d), (alloc, prec)
            names = list(models)
            paths = deploy(DeployConfig(target="host", model=models[names[0]],
                                        compare=tuple(models[n] for n in names[1:]), runtimes=rt, local=True,
                                        threads=threads, reports=str(out / "reports"),
                                        protocol=protocol, precision=args.precisions, layers=False))
            for p in paths:
                r = json.loads(p.read_text())
                alloc, made_for = made_by[Path(r["model_dir"]).name]
                if made_for not in (r["precision"], "macs"):
                    continue  # a model planned for another precision, timed at this one
                pr = r.get("prediction") or {}
                row = {"threads": threads, "runtime": rt, "precision": r["precision"], "scheme": r["scheme"],
                       "ranks": "MAC-based" if made_for == "macs" else f"latency table, {alloc}",
                       "mac_speedup": r["mac_speedup"], "dense_ms": r["dense"]["median_ms"],
                       "compressed_ms": r["compressed"]["median_ms"], "latency_speedup": r["latency_speedup"],
                       "efficiency": r["efficiency"], "predicted_ms": pr.get("compressed_ms"),
                       "prediction_error": pr.get("error"), "predicted_speedup": pr.get("latency_speedup"),
                       "anchored_error": pr.get("anchored_error"),
                       "report": str(p)}
                rows.append(row)
                if made_for != "macs":
                    if r["precision"] == "fp32":
                        dense_ms[rt] = row["dense_ms"]
                    else:
                        dense_ms[f"{rt} int8"] = row["dense_ms"]
                        if row["compressed_ms"] < int8_ms.get(f"{rt} {r['scheme']}", (float("inf"),))[0]:
                            int8_ms[f"{rt} {r['scheme']}"] = (row["compressed_ms"], row["mac_speedup"])
        if int8_ms:
            rt, (ms, macs) = min(int8_ms.items(), key=lambda kv: kv[1][0])
            fastest = min(dense_ms.items(), key=lambda kv: kv[1])
            best.append({"threads": threads, "int8": rt, "int8_ms": ms, "fastest_dense": fastest[0],
                         "fastest_dense_ms": fastest[1], "speedup": fastest[1] / ms, "mac_speedup": macs,
                         "ratio": fastest[1] / ms / macs})
    lines = ["| threads | runtime | precision | scheme | ranks | MAC speedup | dense ms | compressed ms | "
             "latency speedup | efficiency | predicted ms (error) | anchored error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred = "-" if r["predicted_ms"] is None else f"{r['predicted_ms']:.2f} ({100 * r['prediction_error']:+.0f}%)"
        pred += " | -" if r.get("anchored_error") is None else f" | {100 * r['anchored_error']:+.0f}%"
        lines.append(f"| {r['threads']} | {r['runtime']} | {r['precision']} | {r['scheme']} | {r['ranks']} | "
                     f"{r['mac_speedup']:.2f}x | "
                     f"{r['dense_ms']:.2f} | {r['compressed_ms']:.2f} | {r['latency_speedup']:.2f}x | "
                     f"{r['efficiency']:.2f} | {pred} |")
    for b in best:
        lines.append(f"\n{b['threads']} thread(s): best compressed INT8 ({b['int8']}, {b['int8_ms']:.2f} ms) against "
                     f"the fastest dense deployment ({b['fastest_dense']}, {b['fastest_dense_ms']:.2f} ms): "
                     f"{b['speedup']:.2f}x for {b['mac_speedup']:.2f}x fewer MACs ({b['ratio']:.2f} of it)")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_deployments.md").write_text(text + "\n")
    (out / "bench_deployments.json").write_text(json.dumps(
        {"rows": rows, "best_int8": best, "host": host_identity(), "date": time.strftime("%Y-%m-%d %H:%M"),
         "seconds": round(time.perf_counter() - t0), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
