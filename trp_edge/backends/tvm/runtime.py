"""On the device: loading a TVM library into a Relax VM, its thread pool and the per-op profile (numpy and the
TVM runtime only: this runs on a board, under qemu and inside `trp-edge serve`)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..base import PROFILE_RUNS, Run


def tvm_device(device: str):
    import tvm

    return {"cpu": tvm.cpu, "opencl": tvm.opencl, "cuda": tvm.cuda, "vulkan": tvm.vulkan}[device](0)


def _threads(threads: int) -> None:
    """The thread count, with TVM's workers sleeping rather than spinning between calls (ONNX Runtime's spin
    within a run and stop after it; TVM's pool has no such switch, so they sleep within a run too): a spinning
    pool took a core from the runtime timed next in the alternating protocol (measured: ORT at 2 threads
    20.4-21.1 ms beside a spinning TVM, 13.5-16.6 ms beside a sleeping one; TVM itself 5-7 % slower).
    Set before TVM starts its pool; a user's own TVM_THREAD_POOL_SPIN_COUNT wins."""
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    import tvm

    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(1, threads)  # 1 = big cores first; the count of worker threads


def tvm_vm(path: str, threads: int = 1, device: str = "cpu"):
    """The library's Relax VM on its device, with the thread count set: (vm, device)."""
    import tvm
    from tvm import relax

    _threads(threads)
    dev = tvm_device(device)
    return relax.VirtualMachine(tvm.runtime.load_module(str(path)), dev), dev


def load(path: str, threads: int = 1, device: str = "cpu", function: str = "main") -> Run:
    import tvm

    vm, dev = tvm_vm(path, threads, device)
    fn = vm[function]

    def run(x: np.ndarray) -> np.ndarray:
        out = fn(tvm.runtime.tensor(x, dev))
        if not hasattr(out, "numpy"):  # a tuple of outputs
            out = out[0]
        return out.numpy()

    return run


def load_signature(path: str, signature: str, threads: int = 1) -> Run:
    """One function of a calibration grid library (grid_library), run as `load` runs a model's main."""
    return load(path, threads, "cpu", signature)


def _unpacked(shape: list[int] | None, weight: bool) -> list[int] | None:
    """A packed conv tensor's shape in OIHW / NCHW terms (pack_convs): the block on the last axis goes back to
    the output channels, (O/b, I, kh, kw, b) -> (O, I, kh, kw) and (N, C/b, H, W, b) -> (N, C, H, W)."""
    if shape is None or len(shape) != 5:
        return shape
    return [shape[0] * shape[4], *shape[1:4]] if weight else [shape[0], shape[1] * shape[4], *shape[2:4]]


def profile_ops(path: str, x: np.ndarray, threads: int = 1, device: str = "cpu",
                runs: int = PROFILE_RUNS) -> list[dict[str, Any]]:
    """Each VM call timed through the VM's instrument hook (0.27 has no VM profiler); kernel arguments give
    the weight and output shapes. The hook costs about 1 us per call."""
    import tvm
    from tvm import relax

    vm, dev = tvm_vm(path, threads, device)
    per: dict[tuple[int, str], dict[str, Any]] = {}
    order: list[int] = [0]
    stack: list[float] = []

    def instrument(func, name, before, ret, *args):
        if before:
            stack.append(time.perf_counter())
            return relax.VMInstrumentReturnKind.NO_OP
        dt = time.perf_counter() - stack.pop()
        name = str(name)
        if name.startswith("vm.builtin"):
            return relax.VMInstrumentReturnKind.NO_OP
        key = (order[0], name)
        order[0] += 1
        if key not in per:
            shapes = [[int(s) for s in a.shape] for a in args if hasattr(a, "shape")]
            per[key] = {"op": "conv" if "conv" in name else name.split("_")[1] if "_" in name else name,
                        "weight": _unpacked(shapes[1], True) if len(shapes) > 2 else None,
                        "output": _unpacked(shapes[-1], False) if shapes else None, "us": []}
        per[key]["us"].append(dt * 1e6)
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

