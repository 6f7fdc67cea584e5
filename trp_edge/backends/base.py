"""The runtime protocol and the types a build hands between stages.

Every runtime (tvm, ort, tflite) is a module of this package with the same functions:

    check_available(target, source)                  -> None, or one clear error before any work
    build(source, target, folder, cfg, samples, measurer=None)
                                                     -> (list[Artifact], extra manifest keys); `measurer`:
                                                        where tuning times candidates, made by the caller
                                                        (trp_edge.tuning_device; a runtime that tunes
                                                        nothing ignores it)
    load(path, threads=1, device="cpu")              -> run(x: np.ndarray) -> np.ndarray
    profile_ops(path, x, threads=1, device="cpu")    -> [{name, op, weight, output, ms}] per kernel, or None
    OPS_NOTE                                         -> why profile_ops gives None (no op profiler), or None

How a runtime's session is configured (threads, spinning, graph optimization) is decided once, in its module:
the build's validation, the device-side timing, the per-op profile, compress's latency check and calibration
all load artifacts through `load`, so two numbers a user compares come from identically configured sessions.

Loading and profiling need numpy and the runtime only (no torch): they run on a board, under qemu and
inside `trp-edge serve`."""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..targets import RUNTIMES

if TYPE_CHECKING:
    from ..config import BuildConfig
    from ..targets import Target

# TVM sizes its thread pool once, from TVM_NUM_THREADS (default: half the cores), and a later
# runtime.config_threadpool can only lower it: allow every core, then set each run's count.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

PROFILE_RUNS = 10  # runs of a per-op profile; the median per kernel is reported

Run = Callable[[np.ndarray], np.ndarray]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Variant:
    """One model to build: 'dense' and 'compressed' from a compress output, or one ONNX file."""

    name: str
    onnx: Path
    torch: Path | None = None
    macs: int | None = None
    # per runtime: the model its INT8 artifacts are made from, when compress kept some pairs dense for INT8
    # there (slower there); a runtime not named quantizes this variant's model
    int8: dict[str, Variant] = field(default_factory=dict)

    def int8_extra(self, runtime: str, *, from_torch: bool = False) -> dict[str, Any]:
        """What an INT8 artifact's manifest entry says about its source (the ONNX file, or the torch file a
        converter read) when that is not this variant's model."""
        v = self.int8.get(runtime)
        if v is None:
            return {}
        source = v.torch if from_torch else v.onnx
        return {"source": source.name if source else None, "macs": v.macs,
                "note": f"pairs slower than dense in {runtime} INT8 are merged back into one conv "
                        "(compress: precisions)"}


@dataclass
class Source:
    """What a build starts from: a compress output (its report read through trp_edge.report) or one ONNX file."""

    name: str
    path: Path
    variants: list[Variant]
    input_shape: tuple[int, ...]
    data: str | None = None
    report: Any = None  # trp_edge.report.CompressReport of a compress output, None for an ONNX file

    @property
    def mac_speedup(self) -> float | None:
        m = {v.name: v.macs for v in self.variants}
        return m["dense"] / m["compressed"] if m.get("dense") and m.get("compressed") else None


@dataclass
class Artifact:
    """One built file; `validation` and `accuracy` are filled in by build()."""

    variant: str
    file: str
    runtime: str
    precision: str = "fp32"
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] | None = None

    def to_dict(self, folder: Path) -> dict[str, Any]:
        p = folder / self.file
        d = {"variant": self.variant, "file": self.file, "precision": self.precision, "device": self.device,
             "bytes": p.stat().st_size if p.exists() else None, "sha256": sha256(p) if p.exists() else None,
             "validation": self.validation}
        if self.accuracy is not None:
            d["accuracy"] = self.accuracy
        return {**d, **self.extra}


@dataclass
class Samples:
    """Images for INT8 calibration and for the accuracy of quantized artifacts against fp32."""

    calib: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray | None
    origin: str


class Runtime(Protocol):
    """What every module of trp_edge.backends provides (see the module docstring)."""

    OPS_NOTE: str | None

    def check_available(self, target: Target, src: Source) -> None: ...

    def build(self, src: Source, target: Target, folder: Path, cfg: BuildConfig, samples: Samples | None,
              measurer: Any = None) -> tuple[list[Artifact], dict[str, Any]]: ...

    def load(self, path: str, threads: int = 1, device: str = "cpu") -> Run: ...

    def profile_ops(self, path: str, x: np.ndarray, threads: int = 1,
                    device: str = "cpu") -> list[dict[str, Any]] | None: ...


def get(name: str) -> Runtime:
    """The backend module of a runtime."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
    mod: ModuleType = importlib.import_module(f"{__package__}.{name}")
    return mod  # type: ignore[return-value]

