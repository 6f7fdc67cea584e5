#!/usr/bin/env python3
"""What one conv op costs in TFLite (XNNPACK), fp32 and full-integer INT8, on one input: the dense 3×3 conv,
the spatial and channel pairs at a few ranks, and single thin convs (3×1, 1×3, 1×1, 3×3 to few channels). Shows
whether a pair's time follows its MACs or a per-op floor (on CPUs with VNNI/AMX the INT8 convs of a thin
pair cost about as much as a dense one). The models are calibration grids (trp_edge.backends.tflite_grid).

    python tools/bench_op_floor.py --channels 64 --size 56 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def conv(out: int, k: tuple[int, int]) -> dict:
    return {"out": out, "k": k, "s": (1, 1), "p": (k[0] // 2, k[1] // 2), "d": (1, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", default="8,32")
    ap.add_argument("--out", default="bench-out/op-floor")
    args = ap.parse_args()

    import numpy as np

    from trp_edge.backends.tflite import load_signature
    from trp_edge.backends.tflite_grid import grid_model

    c, out = args.channels, Path(args.out)
    variants = {"call": [], "dense 3x3": [conv(c, (3, 3))], "two dense 3x3": [conv(c, (3, 3)), conv(c, (3, 3))],
                f"1x1 to {c}": [conv(c, (1, 1))], f"3x1 to {c}": [conv(c, (3, 1))], f"1x3 to {c}": [conv(c, (1, 3))]}
    for r in map(int, args.ranks.split(",")):
        variants |= {f"1x1 to {r}": [conv(r, (1, 1))], f"3x1 to {r}": [conv(r, (3, 1))],
                     f"3x3 to {r}": [conv(r, (3, 3))],
                     f"spatial pair r{r}": [conv(r, (3, 1)), conv(c, (1, 3))],
                     f"channel pair r{r}": [conv(r, (3, 3)), conv(c, (1, 1))]}
    out.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).random((1, c, args.size, args.size), dtype=np.float32)
    results = {}
    for int8 in (False, True):
        prec = "int8" if int8 else "fp32"
        path = out / f"grid-{prec}.tflite"
        names = {label: f"v{i}" for i, label in enumerate(variants)}  # signature names: identifiers
        path.write_bytes(grid_model(x.shape, {names[k]: v for k, v in variants.items()}, int8=int8))
        ms = {}
        for sig in variants:
            run = load_signature(str(path), names[sig], args.threads)
            for _ in range(20):
                run(x)
            reps = []
            for _ in range(9):
                t = time.perf_counter()
                for _ in range(50):
                    run(x)
                reps.append((time.perf_counter() - t) / 50 * 1e3)
            ms[sig] = sorted(reps)[len(reps) // 2]
        results[prec] = ms
    print(f"{c} channels at {args.size}x{args.size}, {args.threads} thread(s), median ms per call:")
    print(f"{'':22s} {'fp32':>8s} {'int8':>8s}")
    for sig in variants:
        print(f"{sig:22s} {results['fp32'][sig]:8.3f} {results['int8'][sig]:8.3f}")
    (out / "bench_op_floor.json").write_text(json.dumps(
        {"results": results, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
