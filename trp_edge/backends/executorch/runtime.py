"""Device side of ExecuTorch: a .pte loaded by executorch.runtime (which links libtorch: a board needs torch, no
trp_edge module that needs torch), timed, and profiled per op through ETDump.

Threads: XNNPACK runs on ExecuTorch's process-wide threadpool. `load` sizes it to the session's thread count
before loading the program (the delegate takes the pool when its method is initialised, so the pool is not
resized under a loaded method: one job, one thread count), and checks the count it got.

Per-op rows come from ETDump (the Inspector's events of the "Execute" block). XNNPACK names them after its own
operators, so convolution events are mapped to the model's convs by order and kernel class, from the rows the
program carries (CONVS_METHOD): the k-th conv call takes the next event that can be its kernel (an
IGEMM or DWConv convolution, a 1x1 conv a GEMM convolution or a fully connected op). Where they do not line up
the mapping is refused with the reason, not guessed."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, ConversionError
from ..base import PROFILE_RUNS, Run, layer_stats

CONVS_METHOD = "trp_edge_convs"  # the constant method export.py writes, listing the program's convs


def _runtime():
    from executorch.runtime import Runtime

    return Runtime.get()


@contextmanager
def _stderr_muted() -> Iterator[None]:
    """The process's stderr (file descriptor 2, where the C++ runtime logs) sent to /dev/null for a moment."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def set_threads(threads: int) -> None:
    """Size ExecuTorch's threadpool (XNNPACK's workers) to `threads`; refuses when the runtime keeps another."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        with _stderr_muted():  # the runtime logs every reset on stderr ("Resetting threadpool to N threads.")
            portable_lib._unsafe_reset_threadpool(threads)
    got = portable_lib._threadpool_get_thread_count()
    if got != threads:
        raise ConfigError(f"ExecuTorch kept {got} threads where {threads} were asked for")


def _method(path: str, method: str, threads: int, etdump: bool = False):
    set_threads(threads)
    program = _runtime().load_program(Path(path), enable_etdump=etdump, debug_buffer_size=0)
    if method not in program.method_names:
        raise ConfigError(f"{Path(path).name}: no method {method!r} (it has {', '.join(sorted(program.method_names))})")
    return program, program.load_method(method)


def _runner(method) -> Run:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.ascontiguousarray(x, np.float32))])[0].numpy()

    return run


def load(path: str, threads: int = 1, device: str = "cpu") -> Run:
    if device != "cpu":
        raise ConfigError(f"{Path(path).name}: ExecuTorch runs on the CPU here (XNNPACK), not on {device}")
    return _runner(_method(path, "forward", threads)[1])


def load_signature(path: str, signature: str, threads: int = 1) -> Run:
    """One method of a multi-method calibration grid (lower_calibration)."""
    return _runner(_method(path, signature, threads)[1])


def _convs(program) -> np.ndarray:
    """The conv rows a loaded program carries (export.CONV_COLUMNS), empty when it has none."""
    if CONVS_METHOD not in program.method_names:
        return np.zeros((0, 8), np.int64)
    return program.load_method(CONVS_METHOD).execute([])[0].numpy().reshape(-1, 8)


def _events(path: str, x: np.ndarray, threads: int, runs: int) -> tuple[list[tuple[str, list[float]]], np.ndarray]:
    """`runs` calls of the model with ETDump on: each op event of the execution, in order, with its time in
    ms per run; and the program's conv rows (_convs, read once the dump is written)."""
    from executorch.devtools import Inspector

    program, method = _method(path, "forward", threads, etdump=True)
    run = _runner(method)
    for _ in range(runs):
        run(x)
    fd, dump = tempfile.mkstemp(suffix=".etdp")
    os.close(fd)
    try:
        program.write_etdump_result_to_file(dump, dump + ".bin")
        rows = _convs(program)
        with warnings.catch_warnings():  # "Output Buffer not found": no tensor dumps were asked for, only times
            warnings.simplefilter("ignore")
            inspector = Inspector(etdump_path=dump)
    finally:
        for f in (dump, dump + ".bin"):
            Path(f).unlink(missing_ok=True)
    out = []
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for e in block.events:
            if e.perf_data is not None and e.name not in ("Method::execute", "DELEGATE_CALL"):
                out.append((e.name, [float(v) for v in e.perf_data.raw]))
    return out, rows


def _fits(row, event: str) -> bool:
    """Whether an XNNPACK event can be the conv of `row`: a depthwise conv is a DWConv convolution, a 1x1 conv a
    GEMM convolution or (stride 1, NHWC) a fully connected op, any other conv an IGEMM convolution."""
    _, in_c, kh, kw, _, _, groups, _ = (int(v) for v in row)
    kind = event.split(" #")[0]
    if groups > 1 and groups == in_c:
        return kind.startswith("Convolution") and "DWConv" in kind
    if (kh, kw) == (1, 1) and groups == 1:
        return kind.startswith("Fully Connected") or kind.startswith("Convolution") and kind.endswith("GEMM")
    return kind.startswith("Convolution") and "DWConv" not in kind


def _conv_events(events: list[tuple[str, list[float]]], rows: np.ndarray) -> list[int]:
    """Which events are the model's convs, in order: each conv row takes the next event that can be its conv
    (_fits); a fully connected event passed over is the classifier. Raises ConversionError naming the mismatch
    (a convolution event passed over, a conv left without one): the mapping is not guessed."""
    idx, at = [], 0
    for row in rows:
        while at < len(events) and not _fits(row, events[at][0]):
            if events[at][0].startswith(("Convolution", "Deconvolution")):
                raise ConversionError(f"event {events[at][0]!r} does not fit conv {row[:4].tolist()} of the model: "
                                      "per-layer rows not mapped (the op order differs from the model's)")
            at += 1
        if at == len(events):
            raise ConversionError(f"{len(rows) - len(idx)} of {len(rows)} convs have no XNNPACK event in the ETDump "
                                  "profile: per-layer rows not mapped (ops run outside XNNPACK, or were merged)")
        idx.append(at)
        at += 1
    left = [n for n, _ in events[at:] if n.startswith(("Convolution", "Deconvolution"))]
    if left:
        raise ConversionError(f"{len(left)} convolution events left over after the model's {len(rows)} convs: "
                              "per-layer rows not mapped")
    return idx


def profile_ops(path: str, x: np.ndarray, threads: int = 1, device: str = "cpu",
                runs: int = PROFILE_RUNS) -> list[dict[str, Any]]:
    """Per op of the XNNPACK execution (ETDump), median over runs; each convolution named after the conv it
    runs ("weight" [out, in, kh, kw] and "output" [1, out, oh, ow], for trp_edge.layers)."""
    events, rows = _events(path, x, threads, runs)
    conv_at = dict(zip(_conv_events(events, rows), rows))
    out = []
    for i, (name, ms) in enumerate(events):
        r = conv_at.get(i)
        op = {"name": name, "op": "conv" if r is not None else name.split(" (")[0].split(" #")[0],
              "weight": None, "output": None, "ms": float(np.median(ms))}
        if r is not None:
            op["weight"], op["output"] = [int(r[0]), int(r[1]), int(r[2]), int(r[3])], [1, int(r[0]), int(r[4]),
                                                                                      int(r[5])]
        out.append(op)
    return out


def layer_profile(path: str, x: np.ndarray, threads: int = 1, runs: int = 2 * PROFILE_RUNS) -> dict[str, Any]:
    """Per layer tag (the program's conv rows, export.conv_rows with tags) the convolution events' time summed
    per run: median_ms (the mean of the middle half of the runs), p10, p90; and each run's whole time over every
    op ("total_ms", for scaling to the model's timed latency). Two warm-up runs are left out."""
    events, rows = _events(path, x, threads, runs + 2)
    total = np.zeros(runs)
    layers: dict[str, np.ndarray] = {}
    conv_at = dict(zip(_conv_events(events, rows), rows))
    for i, (_, ms) in enumerate(events):
        last = np.asarray(ms[-runs:])
        total[-len(last):] += last
        r = conv_at.get(i)
        if r is not None and r[7] >= 0:
            acc = layers.setdefault(str(int(r[7])), np.zeros(runs))
            acc[-len(last):] += last
    return layer_stats(total, layers)
