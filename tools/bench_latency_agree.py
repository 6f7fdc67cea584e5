#!/usr/bin/env python3
"""compress's latency figure and deploy's, for the same dense/compressed pair, side by side in one run.

Both go through trp_edge.backends.ort.load (the one place an onnxruntime session is configured); this checks
that the two numbers a user compares agree within the machine's noise. Rounds alternate between
compress's latency check (a pair job on dense.onnx / model.onnx through trp_edge.api.run_here, as compress
runs it) and deploy's bench job (what `deploy --local` reports, on the build's saved ORT graphs); each round is
one full protocol.

    python tools/bench_latency_agree.py --model resnet18 --speedup 3 --rounds 6 --out bench-out/agree
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--scheme", default="spatial")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--min-runs", type=int, default=30)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--out", default="bench-out/agree")
    args = ap.parse_args()

    import numpy as np
    import torch

    from trp_edge.api import compress, run_here
    from trp_edge.config import BuildConfig, CompressConfig, DecomposeConfig, DeployConfig, ProfileConfig, TRPConfig
    from trp_edge.contracts import pair_job
    from trp_edge.profile import host_identity
    from trp_edge.transport import run_local
    from trp_edge.workflows.build import build
    from trp_edge.workflows.deploy import plan_job

    out = Path(args.out)
    torch.manual_seed(0)
    compress(CompressConfig(model=args.model, out=str(out), force=True, latency=None, trp=TRPConfig(steps=0),
                            decompose=DecomposeConfig(scheme=args.scheme, target_speedup=args.speedup)),
             progress=False)
    folder = build(BuildConfig(model=str(out), target="host", runtimes="ort", int8=False)).out / "ort"
    protocol = ProfileConfig(warmup=5, block=5, min_runs=args.min_runs, min_seconds=args.min_seconds,
                             max_seconds=600, threads=args.threads)
    job, files, _ = plan_job([(out, folder)], args.threads,
                             DeployConfig(target="host", local=True, layers=False, protocol=protocol))
    shape = tuple(json.loads((out / "report.json").read_text())["input_shape"])
    ref = folder.parent / "reference.npz"  # the build's: input, dense and compressed outputs (torch)
    assert set(np.load(ref).files) >= {"input", "dense", "compressed"}, shape
    rows = {"compress": {"dense": [], "compressed": []}, "deploy": {"dense": [], "compressed": []}}
    for i in range(args.rounds):
        pair = {"dense.onnx": out / "dense.onnx", "model.onnx": out / "model.onnx", "reference.npz": ref}
        c = run_here(pair_job("ort", args.threads, protocol, "dense.onnx", "model.onnx", "reference.npz"),
                     pair)["timing"]
        d = run_local(job, files)["timing"]
        for side in ("dense", "compressed"):
            rows["compress"][side].append(c[side]["median_ms"])
            rows["deploy"][side].append(d[side]["median_ms"])
        print(f"round {i + 1}: compress dense {c['dense']['median_ms']:.3f} compressed "
              f"{c['compressed']['median_ms']:.3f} | deploy dense {d['dense']['median_ms']:.3f} compressed "
              f"{d['compressed']['median_ms']:.3f} ms", flush=True)
    result = {"host": host_identity(), "model": args.model, "scheme": args.scheme, "threads": args.threads,
              "rounds": args.rounds, "median_ms": {k: {s: statistics.median(v) for s, v in r.items()}
                                                   for k, r in rows.items()}, "per_round_ms": rows}
    m = result["median_ms"]
    for side in ("dense", "compressed"):
        spread = {k: (min(r[side]), max(r[side])) for k, r in rows.items()}
        print(f"{side}: compress {m['compress'][side]:.3f} ms (rounds {spread['compress'][0]:.3f}-"
              f"{spread['compress'][1]:.3f}), deploy {m['deploy'][side]:.3f} ms (rounds {spread['deploy'][0]:.3f}-"
              f"{spread['deploy'][1]:.3f}): ratio {m['deploy'][side] / m['compress'][side]:.3f}")
    print(f"latency speedup: compress {m['compress']['dense'] / m['compress']['compressed']:.3f}x, deploy "
          f"{m['deploy']['dense'] / m['deploy']['compressed']:.3f}x")
    (out / "agree.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
