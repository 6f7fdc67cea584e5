#!/usr/bin/env python3
"""TVM on the host against ONNX Runtime and TFLite (issue 12): the compressed ResNet-18 (spatial, about 3x
fewer MACs), side by side in one run at 1 and 2 threads.

1. Untuned: raw Relax lowering against trp-edge's default schedule (parallel + vectorized), and the
   default schedule on an NHWC graph and on an NCHW{lanes}c one (the layout levers without tuning).
2. Tuned: one MetaSchedule run of --minutes on this machine, of the packed graph trp-edge builds or, with
   --tune-layout nchw, of the graph as exported; the database is copied at each of --snapshots minutes, so "what
   5 minutes of tuning gives" is the state of the same search after 5 minutes.
3. Which BYOC codegens this TVM wheel carries.

    python tools/bench_tvm.py --minutes 30 --snapshots 5,15,30 --out bench-out/tvm

Prints a Markdown table and saves bench_tvm.{json,md} in OUT. Random weights: a latency study.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))  # before TVM starts its pool
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")  # as trp-edge times TVM (backends.tvm.runtime._threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--speedup", type=float, default=3.0)
    ap.add_argument("--minutes", type=float, default=30.0, help="tuning time budget")
    ap.add_argument("--snapshots", default="5,15,30", help="minutes at which the database is taken")
    ap.add_argument("--task-scheduler", default="round-robin", choices=["round-robin", "gradient"],
                    help="MetaSchedule's: every kernel in turn, or the costliest kernels first")
    ap.add_argument("--tune-layout", default="nchwc", choices=["nchw", "nchwc"],
                    help="the graph tuned: as exported, or with convs packed to NCHW{lanes}c")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--min-runs", type=int, default=10)
    ap.add_argument("--out", default="bench-out/tvm")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("trp_edge").setLevel(logging.WARNING)

    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from trp_edge.api import compress
    from trp_edge.backends import tvm as tb
    from trp_edge.config import BuildConfig, CompressConfig, DecomposeConfig, ProfileConfig, TRPConfig
    from trp_edge.device.runner import load
    from trp_edge.profile import host_identity, time_alternating
    from trp_edge.targets import load_target, resolve_threads
    from trp_edge.workflows.build import build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = out / f"{args.model}-spatial"
    if not (d / "report.json").is_file():
        torch.manual_seed(0)
        compress(CompressConfig(model=args.model, out=str(d), force=True, latency=None, trp=TRPConfig(steps=0),
                                calibrate=False,
                                decompose=DecomposeConfig(scheme="spatial", target_speedup=args.speedup)),
                 progress=False)
    rep = json.loads((d / "report.json").read_text())
    shape = tuple(rep["input_shape"])
    b = out / "build"
    if not (b / "host" / "tflite" / "compressed.tflite").is_file():
        build(BuildConfig(model=str(d), target="host", runtimes="ort,tflite", out=str(b), int8=False))
    target = load_target("host")
    cpu_t = tb.cpu_target(target)
    tb.lazy_tensor_intrin(("x86",))
    so = out / "so"
    so.mkdir(exist_ok=True)
    compile_s: dict[str, float] = {}

    def compile_to(name: str, mod) -> Path:
        t0 = time.perf_counter()
        f = so / f"{name}.so"
        tvm.compile(mod, target=cpu_t).export_library(str(f))
        compile_s[name] = round(time.perf_counter() - t0, 1)
        return f

    base = tb.prepare(tb.import_onnx(d / "model.onnx", shape), cpu_t, packed=False)
    files = {"tvm raw lowering": compile_to("raw", base),
             "tvm default schedule": compile_to("default", tb.default_schedule(base, cpu_t))}
    with cpu_t:
        nhwc = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(
            tb.import_onnx(d / "model.onnx", shape))
    files["tvm default schedule, NHWC"] = compile_to("nhwc", tb.default_schedule(tb.prepare(nhwc, cpu_t, packed=False),
                                                                                         cpu_t))
    lanes = tb.lowering._lanes(cpu_t)
    packed = tb.prepare(tb.import_onnx(d / "model.onnx", shape), cpu_t)  # trp-edge's build: convs packed
    files[f"tvm default schedule, NCHW{lanes}c"] = compile_to("nchwc", tb.default_schedule(packed, cpu_t))
    tuned_graph = packed if args.tune_layout == "nchwc" else base

    # tuning, with the database copied at each snapshot
    db = out / "tuning"
    shutil.rmtree(db, ignore_errors=True)
    db.mkdir()
    snaps = [float(s) for s in args.snapshots.split(",") if s]
    done = threading.Event()

    def snapshot():
        t0 = time.perf_counter()
        for s in snaps:
            if done.wait(max(0.0, 60 * s - (time.perf_counter() - t0))):
                break
            dst = out / f"tuning-{s:g}min"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(db, dst)

    watcher = threading.Thread(target=snapshot)
    watcher.start()
    measurer = tb.Measurer("local", host_identity(), threads=resolve_threads(None, target))
    info = tb.tune(tuned_graph, cpu_t, db, tb.UNCAPPED, measurer, seconds=60 * args.minutes,
                   scheduler=args.task_scheduler)
    done.set()
    watcher.join()
    for s in snaps:
        snap = out / f"tuning-{s:g}min"
        if s >= args.minutes or not snap.is_dir():  # the last snapshot is the database at the end
            shutil.rmtree(snap, ignore_errors=True)
            shutil.copytree(db, snap)
        recs = len((snap / "database_tuning_record.json").read_text().splitlines())
        mod = tb.default_schedule(tb.apply_database(tuned_graph, cpu_t, snap), cpu_t)
        layout = f", NCHW{lanes}c" if args.tune_layout == "nchwc" else ""
        files[f"tvm tuned {s:g} min{layout} ({recs} records)"] = compile_to(f"tuned-{s:g}", mod)

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = None
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        fns = {"ort": load(str(b / "host" / "ort" / "compressed.onnx"), "ort", threads),
               "tflite": load(str(b / "host" / "tflite" / "compressed.tflite"), "tflite", threads)}
        fns.update({k: load(str(f), "tvm", threads) for k, f in files.items()})
        want = fns["ort"](x)
        diffs = {k: float(np.max(np.abs(np.asarray(fn(x)) - want))) for k, fn in fns.items()}
        runners = {k: (lambda fn=fn: fn(x)) for k, fn in fns.items()}
        t = time_alternating(runners, ProfileConfig(warmup=2, block=2, min_runs=args.min_runs, min_seconds=0.5,
                                                    max_seconds=120, threads=threads))
        for k in fns:
            rows.append({"variant": k, "threads": threads, "median_ms": t[k].median_ms, "p10_ms": t[k].p10_ms,
                         "p90_ms": t[k].p90_ms, "runs": t[k].runs, "max_abs_diff_vs_ort": diffs[k]})
            print(json.dumps(rows[-1]), flush=True)

    byoc = {name: tvm.get_global_func(f"relax.ext.{name}", True) is not None
            for name in ("dnnl", "arm_compute_lib", "cutlass", "tensorrt", "clml", "cudnn", "cublas")}
    ms_at = {(r["variant"], r["threads"]): r["median_ms"] for r in rows}
    lines = ["| variant | 1 thread ms | 2 threads ms | 2t / 1t | vs ORT (1t) | vs ORT (2t) |",
             "|---|---|---|---|---|---|"]
    for k in dict.fromkeys(r["variant"] for r in rows):
        one, two = ms_at.get((k, 1)), ms_at.get((k, 2))
        o1, o2 = ms_at.get(("ort", 1)), ms_at.get(("ort", 2))
        lines.append(f"| {k} | {one:.2f} | {two:.2f} | {two / one:.2f} | {one / o1:.2f}x | {two / o2:.2f}x |"
                     if one and two else f"| {k} | {one} | {two} | | | |")
    lines.append(f"\nTuning: {info['trials']} trials over {info['tuned']} of {info['tasks']} kernels in "
                 f"{info['seconds']:.0f} s ({info.get('stopped', 'trial cap')}); compile s: {compile_s}; "
                 f"BYOC codegens in this wheel: {[k for k, v in byoc.items() if v] or 'none'}")
    table = "\n".join(lines)
    print(table)
    meta = {"host": host_identity(), "tvm": tvm.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
            "mac_speedup": rep["mac_speedup"], "input_shape": shape}
    (out / "bench_tvm.json").write_text(json.dumps({"meta": meta, "rows": rows, "tuning": info, "byoc": byoc,
                                                    "compile_seconds": compile_s}, indent=2))
    (out / "bench_tvm.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
