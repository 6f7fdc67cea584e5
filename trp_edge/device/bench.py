"""Device side of the profiler: check each artifact against the reference, time the dense and compressed
models by the one timing protocol (trp_edge.profile: warm-up, alternating blocks, a count and a minimum
time), then a per-op breakdown where the runtime offers one. numpy and the runtimes only, no torch.

Used in-process (`--local`), by the emulated aarch64 python (`--emulate`) and by `trp-edge serve` (over
TVM RPC). Every failure of one artifact is returned as data.

    python -m trp_edge.device.bench JOB.json             # prints the result as one JSON line
    python -m trp_edge.device.bench calibrate JOB.json   # the same for a calibration job (below)

JOB: {"runtime": "ort", "threads": 4, "reference": "reference.npz", "protocol": {...ProfileConfig...},
      "artifacts": [{"variant": "dense", "file": "dense.onnx", "device": "cpu"}, {"variant": "compressed", ...}],
      "layers": true}
An artifact may name its own "reference" file and the "key" of its output there (default: the job's
reference and its variant), so the models of several compress runs are timed side by side in one job.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ProfileConfig
from ..profile import host_identity, time_alternating
from .runner import load, runtime_versions, tvm_vm

PROFILE_RUNS = 10


def device_identity() -> dict[str, Any]:
    return {**host_identity(), "runtimes": runtime_versions()}


def ort_ops(path: str, x: np.ndarray, threads: int, runs: int = PROFILE_RUNS) -> list[dict[str, Any]]:
    """onnxruntime's own profiler (enable_profiling), in a separate session after the timing: per kernel of
    the optimized graph (fused node names), median over runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"trp-edge-ort-{os.getpid()}")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(runs):
        sess.run(None, feed)
    prof = sess.end_profiling()
    try:
        events = json.loads(Path(prof).read_text())
    finally:
        Path(prof).unlink(missing_ok=True)
    per: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        a = e.get("args", {})
        shapes = [next(iter(t.values())) for t in a.get("input_type_shape", [])]
        outs = [next(iter(t.values())) for t in a.get("output_type_shape", [])]
        d = per.setdefault(e["name"][: -len("_kernel_time")],
                           {"op": a.get("op_name", "?"), "weight": shapes[1] if len(shapes) > 1 else None,
                            "output": outs[0] if outs else None, "us": []})
        d["us"].append(float(e["dur"]))
    return [{"name": n, "op": d["op"], "weight": d["weight"], "output": d["output"],
             "ms": float(np.median(d["us"])) / 1000.0} for n, d in per.items()]


def tvm_ops(fn_vm, x: np.ndarray, runs: int = PROFILE_RUNS) -> list[dict[str, Any]]:
    """Each VM call timed through the VM's instrument hook (0.27 has no VM profiler); kernel arguments give
    the weight and output shapes. The hook costs about 1 us per call."""
    import tvm
    from tvm import relax

    vm, dev = fn_vm
    per: dict[tuple[int, str], dict[str, Any]] = {}
    order: list[int] = [0]
    stack: list[float] = []

    def instrument(func, name, before, ret, *args):
        if before:
            stack.append(time.perf_counter())
            return relax.VMInstrumentReturnKind.NO_OP
        dt = time.perf_counter() - stack.pop()
        if str(name).startswith("vm.builtin"):
            return relax.VMInstrumentReturnKind.NO_OP
        key = (order[0], str(name))
        order[0] += 1
        d = per.get(key)
        if d is None:
            shapes = [tuple(int(s) for s in a.shape) for a in args if hasattr(a, "shape")]
            d = per[key] = {"op": "conv" if "conv" in str(name) else str(name).split("_")[1] if "_" in str(name)
                            else str(name), "weight": list(shapes[1]) if len(shapes) > 2 else None,
                            "output": list(shapes[-1]) if shapes else None, "us": []}
        d["us"].append(dt * 1e6)
        return relax.VMInstrumentReturnKind.NO_OP

    xt = tvm.runtime.tensor(x, dev)
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            order[0] = 0
            vm["main"](xt)
    finally:
        vm.set_instrument(None)
    return [{"name": name, "op": d["op"], "weight": d["weight"], "output": d["output"],
             "ms": float(np.median(d["us"])) / 1000.0} for (_, name), d in sorted(per.items())]


def bench(job: dict[str, Any], base: Path) -> dict[str, Any]:
    rt, threads = job["runtime"], int(job.get("threads", 1))
    cfg = ProfileConfig(**job.get("protocol", {}))
    refs: dict[str, Any] = {}
    inputs: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"runtime": rt, "threads": threads, "device": device_identity(), "artifacts": {}}
    runners = {}
    for a in job["artifacts"]:
        r: dict[str, Any] = {"file": a["file"]}
        out["artifacts"][a["variant"]] = r
        try:
            ref_name = a.get("reference", job.get("reference"))
            if ref_name not in refs:
                refs[ref_name] = np.load(base / ref_name)
            ref = refs[ref_name]
            x = inputs[a["variant"]] = ref["input"]
            fn = load(str(base / a["file"]), rt, threads, a.get("device", "cpu"))
            got = np.asarray(fn(x), dtype=np.float32)
            want = ref[a.get("key", a["variant"])]
            r["max_abs_diff"] = float(np.max(np.abs(got - want))) if got.shape == want.shape else None
            runners[a["variant"]] = (lambda fn=fn, x=x: fn(x))
        except ImportError as e:
            r["error"] = f"runtime missing on the device: {e}"
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            r["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    if not runners:
        out["error"] = "; ".join(f"{v}: {r['error']}" for v, r in out["artifacts"].items() if "error" in r)
        return out
    out["timing"] = {k: t.to_dict() for k, t in time_alternating(runners, cfg).items()}
    out["protocol"] = cfg.to_dict()
    if job.get("layers", True):
        for a in job["artifacts"]:
            if a["variant"] not in runners:
                continue
            path, x = str(base / a["file"]), inputs[a["variant"]]
            try:
                if rt == "ort":
                    ops = ort_ops(path, x, threads)
                elif rt == "tvm":
                    ops = tvm_ops(tvm_vm(path, threads, a.get("device", "cpu")), x)
                else:
                    ops = None
                out["artifacts"][a["variant"]]["ops"] = ops
            except Exception as e:  # noqa: BLE001
                out["artifacts"][a["variant"]]["ops_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if rt == "tflite":
        out["ops_note"] = ("no per-layer breakdown: the Python TFLite interpreters (ai-edge-litert 2.3, "
                           "tflite-runtime 2.14) expose no op profiler")
    return out


def calibrate(job: dict[str, Any], base: Path) -> dict[str, Any]:
    """One layer of `trp-edge calibrate`: the dense conv and its low-rank pairs (one small model each) timed in
    alternating blocks on a random input of the layer's shape. A variant that fails is recorded, not raised.

    JOB: {"runtime": "ort", "threads": 1, "protocol": {...}, "input_shape": [1, 64, 56, 56],
          "artifacts": [{"variant": "dense", "file": "dense.onnx"}, {"variant": "spatial:8", "file": ...}, ...]}"""
    rt, threads = job["runtime"], int(job.get("threads", 1))
    cfg = ProfileConfig(**job.get("protocol", {}))
    x = np.random.default_rng(0).standard_normal(job["input_shape"]).astype(np.float32)
    out: dict[str, Any] = {"runtime": rt, "threads": threads, "device": device_identity(), "errors": {}}
    runners = {}
    for a in job["artifacts"]:
        try:
            fn = load(str(base / a["file"]), rt, threads, a.get("device", "cpu"))
            fn(x)
            runners[a["variant"]] = (lambda fn=fn: fn(x))
        except ImportError as e:
            out["error"] = f"runtime missing on the device: {e}"
            return out
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            out["errors"][a["variant"]] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    out["timing"] = {k: t.to_dict() for k, t in time_alternating(runners, cfg).items()} if runners else {}
    out["protocol"] = cfg.to_dict()
    return out


JOBS = {"bench": bench, "calibrate": calibrate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[0] not in JOBS):
        print(__doc__, file=sys.stderr)
        return 2
    job_path = Path(argv[-1])
    run = JOBS[argv[0]] if len(argv) == 2 else bench
    print(json.dumps(run(json.loads(job_path.read_text()), job_path.parent)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
