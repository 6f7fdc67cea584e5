"""Device side: load one artifact with the runtime it was built for and run it on numpy arrays.

Imports numpy and that runtime only (no torch, no trp_edge modules that need torch), so it runs on a
board, under qemu in the arm64 userland, and inside `trp-edge serve`.

    python -m trp_edge.device.runner check JOB.json     # prints {"results": [...]} as JSON

JOB.json: {"reference": "reference.npz", "threads": 1,
           "artifacts": [{"file": "compressed.so", "runtime": "tvm", "variant": "compressed", "device": "cpu"}]}
reference.npz holds "input" and one "<variant>" array per model (the expected output).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

# TVM sizes its thread pool once, from TVM_NUM_THREADS (default: half the cores), and a later
# runtime.config_threadpool can only lower it: allow every core, then set each run's count.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

Run = Callable[[np.ndarray], np.ndarray]


def load_ort(path: str | bytes, threads: int = 1, device: str = "cpu") -> Run:
    """`path`: a file, or the model itself as bytes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # idle workers spinning after a call steal the core from whatever runs next (measured: 2-thread runs
    # slower than 1-thread ones); the timing protocol groups runs, and spinning is off between them.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def load_tflite(path: str, threads: int = 1, device: str = "cpu") -> Run:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the older runtime a board may have instead
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    it = Interpreter(model_path=path, num_threads=threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def run(x: np.ndarray) -> np.ndarray:
        if tuple(inp["shape"]) != x.shape:
            raise ValueError(f"{Path(path).name}: takes input {tuple(inp['shape'])}, got {x.shape}")
        it.set_tensor(inp["index"], x.astype(inp["dtype"]))
        it.invoke()
        return it.get_tensor(out["index"]).copy()

    return run


def tvm_device(device: str):
    import tvm

    return {"cpu": tvm.cpu, "opencl": tvm.opencl, "cuda": tvm.cuda, "vulkan": tvm.vulkan}[device](0)


def tvm_vm(path: str, threads: int = 1, device: str = "cpu"):
    """The library's Relax VM on its device, with the thread count set: (vm, device)."""
    import tvm
    from tvm import relax

    _tvm_threads(threads)
    dev = tvm_device(device)
    return relax.VirtualMachine(tvm.runtime.load_module(path), dev), dev


def load_tvm(path: str, threads: int = 1, device: str = "cpu") -> Run:
    import tvm

    vm, dev = tvm_vm(path, threads, device)

    def run(x: np.ndarray) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(x, dev))
        if not hasattr(out, "numpy"):  # a tuple of outputs
            out = out[0]
        return out.numpy()

    return run


def _tvm_threads(threads: int) -> None:
    import tvm

    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(1, threads)  # 1 = big cores first; the count of worker threads


LOADERS: dict[str, Callable[..., Run]] = {"ort": load_ort, "tflite": load_tflite, "tvm": load_tvm}


def load(path: str, runtime: str, threads: int = 1, device: str = "cpu") -> Run:
    if runtime not in LOADERS:
        raise ValueError(f"unknown runtime {runtime!r}")
    return LOADERS[runtime](str(path), threads, device)


def runtime_versions() -> dict[str, str | None]:
    """Which runtimes this device has (None: not installed)."""
    out: dict[str, str | None] = {"numpy": np.__version__}
    for key, mod in (("onnxruntime", "onnxruntime"), ("tvm", "tvm"), ("ai_edge_litert", "ai_edge_litert"),
                     ("tflite_runtime", "tflite_runtime")):
        try:
            m = __import__(mod)
            out[key] = getattr(m, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - a runtime that fails to import is as good as missing
            out[key] = None
    return out


def check(job: dict, base: Path) -> list[dict]:
    """Run every artifact of a job on the reference input; a failure is recorded, not raised."""
    ref = np.load(base / job["reference"])
    x = ref["input"]
    results = []
    for a in job["artifacts"]:
        r = {"file": a["file"]}
        t0 = time.perf_counter()
        try:
            fn = load(str(base / a["file"]), a["runtime"], job.get("threads", 1), a.get("device", "cpu"))
            got = np.asarray(fn(x), dtype=np.float32)
            want = ref[a["variant"]]
            if got.shape != want.shape:
                r["error"] = f"output shape {got.shape}, expected {want.shape}"
            else:
                r["max_abs_diff"] = float(np.max(np.abs(got - want)))
                r["max_abs_ref"] = float(np.max(np.abs(want)))
                r["rel_l2"] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
                r["top1_match"] = bool(np.array_equal(got.argmax(-1), want.argmax(-1)))
        except Exception as e:  # noqa: BLE001 - reported to the caller as data
            r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            r["traceback"] = traceback.format_exc(limit=3)
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "check":
        print(__doc__, file=sys.stderr)
        return 2
    job_path = Path(argv[1])
    job = json.loads(job_path.read_text())
    results = check(job, job_path.parent)
    print(json.dumps({"results": results, "runtimes": runtime_versions()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
