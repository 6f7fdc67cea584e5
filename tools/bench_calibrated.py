#!/usr/bin/env python3
"""Energy-only vs latency-calibrated decomposition, measured side by side by one `trp-edge deploy --compare` run
on this machine (ONNX Runtime).

For each scheme in --schemes (channel, spatial, auto) it makes (or remakes) two compress outputs of MODEL at
about SPEEDUP x fewer MACs (e chosen by the energy rule, no training): without a table ("energy") and with
--latency-table ("calibrated": ranks rounded to the fastest measured rank at or above the energy rank, pairs no
faster than dense kept dense, and for auto the fastest form per layer). Then one deploy times every model and
the shared dense model in alternating blocks and writes one report per model with the side-by-side table and,
for calibrated models, the table's predicted conv latency against the measured whole-net latency.

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
    ap.add_argument("--schemes", default="spatial,auto")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--table", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-runs", type=int, default=60)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--out", default="bench-out/calibrated")
    args = ap.parse_args()

    import torch

    from trp_edge.api import compress
    from trp_edge.config import CompressConfig, DecomposeConfig, DeployConfig, ProfileConfig, TRPConfig
    from trp_edge.profile import host_identity
    from trp_edge.report import comparison_markdown
    from trp_edge.workflows.deploy import deploy

    out = Path(args.out)
    models = []
    for scheme in args.schemes.split(","):
        for kind, table in (("energy", None), ("calibrated", args.table)):
            torch.manual_seed(0)  # the same random weights for every model: one dense model, timed once
            d = out / f"{scheme}-{kind}"
            compress(CompressConfig(model=args.model, out=str(d), force=True, latency=None, trp=TRPConfig(steps=0),
                                    decompose=DecomposeConfig(scheme=scheme, target_speedup=args.speedup,
                                                              latency_table=table),
                                    calibrate=table is not None, threads=args.threads), progress=False)
            models.append(str(d))
    protocol = ProfileConfig(warmup=5, block=5, min_runs=args.min_runs, min_seconds=args.min_seconds,
                             max_seconds=600)
    paths = deploy(DeployConfig(target="host", model=models[0], compare=tuple(models[1:]), runtimes="ort",
                                local=True, threads=args.threads, reports=str(out / "reports"), protocol=protocol))
    reps = [json.loads(p.read_text()) for p in paths]
    lines = comparison_markdown(reps[0]["comparison"])
    for r in reps:
        pr = r.get("prediction")
        if pr:
            lines.append(f"- {r['name']}: predicted {pr['compressed_ms']:.3f} ms (dense {pr['dense_ms']:.3f}), "
                         f"measured whole net {pr['measured_compressed_ms']:.3f} ms "
                         f"(dense {pr['measured_dense_ms']:.3f}): {100 * pr['error']:+.1f}%")
    table = "\n".join(lines)
    print(table)
    (out / "bench_calibrated.json").write_text(json.dumps(
        {"reports": [str(p) for p in paths], "comparison": reps[0]["comparison"],
         "prediction": {r["name"]: r.get("prediction") for r in reps}, "host": host_identity(),
         "date": time.strftime("%Y-%m-%d"), "args": vars(args)}, indent=2))
    (out / "bench_calibrated.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
