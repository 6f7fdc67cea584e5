#!/usr/bin/env python3
"""Whether a compress output's pairs pay off in ONNX Runtime INT8 inside the whole net, not only alone as the
per-layer table times them: the dense net, the compressed net, and the compressed net with one stage's pairs
only (the others merged back into one conv each), each quantized as build quantizes it (QDQ, per-channel s8
weights, u8 activations; 7-bit weights on x86) and timed side by side in alternating blocks, one session each.

    python tools/bench_int8_net.py trp-edge-out/resnet20 --threads 1

Prints each net's median and its speedup over dense, and what the report's ORT INT8 table predicted for the
compressed net; saves the numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a trp-edge compress output folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per net, at least")
    ap.add_argument("--out", default="bench-out/int8-net")
    args = ap.parse_args()

    import numpy as np
    import torch

    from trp_edge.backends import ort
    from trp_edge.backends.ort import quantize_int8, weights_7bit
    from trp_edge.config import ProfileConfig
    from trp_edge.export import export_onnx
    from trp_edge.latency_table import load_table, predict
    from trp_edge.lowrank import merge_pairs_
    from trp_edge.models import load_model
    from trp_edge.profile import host_identity, time_alternating
    from trp_edge.targets import load_target

    src = Path(args.model)
    report = json.loads((src / "report.json").read_text())
    dense, comp = (load_model(str(src / f)).model.eval() for f in ("dense.pt", "compressed.pt"))
    pairs = [la["name"] for la in report["layers"] if la["rank"] is not None]
    stages = dict.fromkeys(n.split(".")[0] for n in pairs)
    nets = {"dense": pairs, "compressed": []} | {f"{s} pairs only": [n for n in pairs if n.split(".")[0] != s]
                                                  for s in stages if len(stages) > 1}
    shape = tuple(report["input_shape"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    calib = np.random.default_rng(1).standard_normal((8, *shape[1:])).astype(np.float32)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kept in nets.items():
            m = copy.deepcopy(comp)
            merge_pairs_(m, dense, kept)
            f = Path(tmp) / f"{len(runners)}.onnx"
            export_onnx(m, torch.from_numpy(x), f)
            quantize_int8(f, f.with_suffix(".int8.onnx"), calib, Path(tmp),
                          reduce_range=weights_7bit(load_target("host")))
            run = ort.load(str(f.with_suffix(".int8.onnx")), args.threads)
            runners[name] = lambda run=run: run(x)
        t = time_alternating(runners, ProfileConfig(min_seconds=args.seconds, threads=args.threads))
    base = t["dense"].median_ms
    tables = [load_table(p) for p in report["config"]["decompose"].get("latency_table") or []]
    table = next((t for t in tables if (t.header["runtime"], t.precision) == ("ort", "int8")), None)
    # the table's prediction for every pair shipped (the report's own counts the pairs INT8 keeps dense as dense)
    pred = table and predict(table, [(la["name"], la["scheme"], la["rank"]) for la in report["layers"]])
    rows = [{"net": n, "median_ms": t[n].median_ms, "speedup": base / t[n].median_ms,
             "pairs": len(pairs) - len(nets[n])} for n in nets]
    for r in rows:
        print(f"{r['net']:>22}: {r['median_ms']:.4f} ms, {r['speedup']:.3f}x dense ({r['pairs']} pairs)")
    if pred:
        print(f"the ORT INT8 table predicted the compressed net at {pred['latency_speedup']:.3f}x dense")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(src), "threads": args.threads, "device": host_identity(), "rows": rows,
              "predicted_speedup": pred["latency_speedup"] if pred else None}
    (out / f"{src.resolve().name}-{args.threads}t.json").write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
