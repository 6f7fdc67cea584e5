"""The timing protocol, in one place for every runtime.

Warm-up runs, then the variants are timed in alternating blocks (a block of runs of A, then of B,
repeated) until each has at least `min_runs` runs and `min_seconds` of timed work, so drift and
leftover worker threads hit every variant alike. Reported: median, p10, p90, standard deviation and
runs kept. latency speedup = dense median / compressed median; efficiency = that / MAC speedup."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ProfileConfig

if TYPE_CHECKING:
    from .backends.base import Runtime

log = logging.getLogger(__name__)


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    std_ms: float
    runs: int

    @classmethod
    def of(cls, samples_s: list[float]) -> Timing:
        ms = sorted(1000.0 * s for s in samples_s)

        def pct(q: float) -> float:
            i = q * (len(ms) - 1)
            lo, hi = int(i), min(int(i) + 1, len(ms) - 1)
            return ms[lo] + (ms[hi] - ms[lo]) * (i - lo)

        return cls(statistics.median(ms), pct(0.1), pct(0.9), statistics.pstdev(ms), len(ms))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def time_alternating(runners: dict[str, Callable[[], object]], cfg: ProfileConfig) -> dict[str, Timing]:
    """Time each runner with the protocol above; returns a Timing per name."""
    for fn in runners.values():
        for _ in range(cfg.warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    spent = dict.fromkeys(runners, 0.0)
    start = time.perf_counter()
    while True:
        for name, fn in runners.items():
            for _ in range(cfg.block):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                samples[name].append(dt)
                spent[name] += dt
        enough = all(len(samples[n]) >= cfg.min_runs and spent[n] >= cfg.min_seconds for n in runners)
        if enough or time.perf_counter() - start > cfg.max_seconds:
            break
    return {name: Timing.of(s) for name, s in samples.items()}


def host_identity() -> dict:
    """What machine the timings come from: CPU model, cores, governor, OS (the runtimes' versions: time_pair, and
    trp_edge.device.bench.device_identity)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gov = None
    try:
        gov = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        pass
    ident = {"cpu": cpu, "machine": platform.machine(), "cores": os.cpu_count(), "governor": gov,
             "os": platform.platform()}
    return ident


def time_pair(backend: Runtime, dense: Path, compressed: Path, shape, cfg: ProfileConfig) -> dict:
    """Dense vs compressed artifacts of one runtime (`backend`: its module, trp_edge.backends.get) on this machine,
    by the protocol above, in sessions made as the device side makes them (the backend's load). The backend is
    passed in: this module sits below the backends registry (backends.tvm reads host_identity)."""
    import importlib

    import numpy as np

    package = backend.CAPABILITIES.version_key
    threads = cfg.threads or 1
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    loaded = {"dense": backend.load(str(dense), threads), "compressed": backend.load(str(compressed), threads)}
    runners = {name: (lambda fn=fn: fn(x)) for name, fn in loaded.items()}
    t = time_alternating(runners, cfg)
    speedup = t["dense"].median_ms / t["compressed"].median_ms
    try:
        version = getattr(importlib.import_module(package), "__version__", "unknown")
    except ImportError:  # run by another package (a TFLite file by tflite_runtime)
        version = None
    return {"runtime": package, "target": "host", "threads": threads,
            "device": {**host_identity(), package: version}, "protocol": cfg.to_dict(), "dense": t["dense"].to_dict(),
            "compressed": t["compressed"].to_dict(), "latency_speedup": speedup}


def time_onnx_pair(dense: Path, compressed: Path, shape, cfg: ProfileConfig) -> dict:
    """Dense vs compressed ONNX models in onnxruntime on this machine (time_pair)."""
    from .backends import ort

    return time_pair(ort, dense, compressed, shape, cfg)
