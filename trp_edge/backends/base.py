"""The runtime protocol and the types a build hands between stages.

Every runtime (tvm, ort, tflite, executorch) is a module of this package with the same functions:

    CAPABILITIES                                     -> what the runtime can do (Capabilities), read without
                                                        importing the runtime itself
    check_available(target, source)                  -> None, or one clear error before any work
    build(source, target, folder, cfg, samples, measurer=None)
                                                     -> (list[Artifact], extra manifest keys); `measurer`:
                                                        where tuning times candidates, made by the caller
                                                        (trp_edge.tuning_device; a runtime that tunes
                                                        nothing ignores it)
    load(path, threads=1, device="cpu")              -> run(x: np.ndarray) -> np.ndarray
    load_signature(path, signature, threads=1)      -> run(x) of one signature of a calibration grid; a backend
                                                        whose grids are separate files raises ConfigError
    profile_ops(path, x, threads=1, device="cpu")    -> [{name, op, weight, output, ms}] per kernel, or None
    layer_profile(path, x, threads=1)                -> per layer tag the conv kernels' time in a tagged net
                                                        (CAPABILITIES.in_net); the others raise ConfigError
    lower_calibration(groups, cfg, tmp)              -> {group: (artifacts, files)}: a calibration's models
    int8_artifact(model, work, name, shape, calib, target)
                                                     -> a net (ModelFiles) as an INT8 artifact in `work`
                                                        (CAPABILITIES.int8); the others raise ConfigError

`trp_edge.backends.get(name)` returns one backend module, `trp_edge.backends.capabilities(name)` its
CAPABILITIES.

How a runtime's session is configured (threads, spinning, graph optimization) is decided once, in its module:
the build's validation, the device-side timing, the per-op profile, compress's latency check and calibration
all load artifacts through `load`, so two numbers a user compares come from identically configured sessions.

Loading and profiling need numpy and the runtime only (no torch): they run on a board, under qemu and
inside `trp-edge serve`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..config import BuildConfig, CalibrateConfig
    from ..targets import Target

# TVM sizes its thread pool once, from TVM_NUM_THREADS (default: half the cores), and a later
# runtime.config_threadpool can only lower it: allow every core, then set each run's count.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

PROFILE_RUNS = 10  # runs of a per-op profile; the median per kernel is reported

Run = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Capabilities:
    """What one runtime can do, declared by its backend module (CAPABILITIES) so that the workflows, the latency
    tables and the device side ask the backend instead of naming runtimes.

    int8: trp-edge builds (so deploys and calibrates) it at INT8 as well as fp32 (int8_artifact works).
    in_net: calibration times its layers again in place, in whole nets tagged per layer (layer_profile works).
    version_key: the runtime's package in a device identity ("runtimes", "sessions": onnxruntime, ai_edge_litert,
        tvm); other_packages: packages a device may run it with instead (tflite_runtime).
    session_mode: how its sessions run worker threads, where that changes multi-thread latency (recorded in a
        device identity's "sessions"; a table measured another way is stale), or None.
    reference: the runtime deploy times its compressed model against in the same run (with its untuned module:
        the report's tuned / untuned / reference line), or None.
    ops_note: why it has no per-op profile (profile_ops gives None), or None.
    host_validates: why a foreign target's artifacts are validated on this host rather than under emulation (they
        are CPU-portable and the emulated userland cannot run the runtime), or None."""

    int8: bool
    in_net: bool
    version_key: str
    other_packages: tuple[str, ...] = ()
    session_mode: str | None = None
    reference: str | None = None
    ops_note: str | None = None
    host_validates: str | None = None

    def built_at(self, precision: str) -> bool:
        """Whether trp-edge builds (so deploys and calibrates) the runtime at `precision`."""
        return precision == "fp32" or (precision == "int8" and self.int8)


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


@dataclass
class ModelFiles:
    """One torch net as the files a backend can make an artifact from, each written when first asked for (by the
    caller, which owns the export): `onnx()` an ONNX file, `torch()` a torch file a converter reads."""

    onnx: Callable[[], Path]
    torch: Callable[[], Path]


def write_onnx(module, shape, path: Path) -> None:
    """One small module (a conv, a pair) exported on a zero input of `shape` with the legacy exporter, unchecked:
    a calibration model, timed as it is (ORT's and TVM's calibration lowering)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), str(path), input_names=["input"], dynamo=False)


def calibration_images(shape, n: int = 8) -> np.ndarray:
    """Random images for quantizing a model whose latency, not accuracy, is measured (the latency of integer
    kernels does not depend on the values): n of `shape`'s size, fixed seed."""
    return np.random.default_rng(0).standard_normal((n, *shape[1:])).astype(np.float32)


def middle_mean(a: np.ndarray) -> float:
    """The mean of the middle half of the runs: a profiler counting whole microseconds makes the median of a thin
    layer's few microseconds that coarse; this is as robust and finer."""
    lo, hi = np.percentile(a, [25, 75])
    mid = a[(a >= lo) & (a <= hi)]
    return float(mid.mean() if len(mid) else np.median(a))


def layer_stats(total: np.ndarray, layers: dict[str, np.ndarray]) -> dict[str, Any]:
    """A layer_profile's answer from per-run sums: each whole run's time and each layer tag's conv time."""
    stats = {t: {"median_ms": middle_mean(a), "p10_ms": float(np.percentile(a, 10)),
                 "p90_ms": float(np.percentile(a, 90)), "runs": len(a)} for t, a in layers.items()}
    return {"total_ms": middle_mean(total), "layers": stats}


Lowered = dict[str, Path | Callable[[], Path]]  # a calibration call's files: a file, or a function that writes it


class Runtime(Protocol):
    """What every module of trp_edge.backends provides (see the module docstring)."""

    CAPABILITIES: Capabilities

    def check_available(self, target: Target, src: Source) -> None: ...

    def build(self, src: Source, target: Target, folder: Path, cfg: BuildConfig, samples: Samples | None,
              measurer: Any = None) -> tuple[list[Artifact], dict[str, Any]]: ...

    def load(self, path: str, threads: int = 1, device: str = "cpu") -> Run: ...

    def load_signature(self, path: str, signature: str, threads: int = 1) -> Run: ...

    def profile_ops(self, path: str, x: np.ndarray, threads: int = 1,
                    device: str = "cpu") -> list[dict[str, Any]] | None: ...

    def layer_profile(self, path: str, x: np.ndarray, threads: int = 1) -> dict[str, Any]: ...

    def lower_calibration(self, groups: dict[str, dict[str, Any]], cfg: CalibrateConfig,
                          tmp: Path) -> dict[str, tuple[list[dict[str, Any]], Lowered]]: ...

    def int8_artifact(self, model: ModelFiles, work: Path, name: str, shape: tuple[int, ...], calib: np.ndarray,
                      target: Target) -> Path: ...


def lower_nets(g: dict[str, Any], int8: bool, lower: Callable[[str, Any, list[int] | None], Path],
               name: Callable[[str, bool], str]) -> tuple[list[dict[str, Any]], Lowered]:
    """The whole nets of a calibration's NET group grid (workflows.in_net.net_grid), each lowered by the backend's
    `lower(stem, model, tags)`: tags[i] the layer of the model's i-th conv call (a pair's two convs share one),
    which the backend's layer_profile sums by. `name(stem, int8)` is the file `lower` writes. The dense net is
    lowered now; every other net's file is a function that lowers it when its call comes, so the host holds one
    net at a time (ResNet-18's 37 ONNX nets took 0.8 GB at once). Only the dense net when the tags do not fit the
    export (`lower` raises ConversionError: a conv called twice, say): the table then has the layers as timed
    alone."""
    import copy
    import logging
    from functools import partial

    from ..errors import ConversionError
    from ..latency_table import DENSE
    from ..lowrank import make_pair

    net, order = g["variants"][DENSE], g["order"]

    def one(vi: int, pairs: dict[str, tuple[str, int]], tag: bool = True) -> Path:
        model = copy.deepcopy(net) if pairs else net
        for layer, (scheme, k) in pairs.items():
            parent, _, attr = layer.rpartition(".")
            setattr(model.get_submodule(parent), attr, make_pair(model.get_submodule(layer), scheme, k, init=False))
        tags = [i for i, n in enumerate(order) for _ in range(2 if n in pairs else 1)] if tag else None
        return lower(f"net{vi}", model, tags)

    grid = list(g["grid"].items())
    try:
        dense = one(0, grid[0][1])
    except ConversionError as e:
        logging.getLogger(__name__).warning("calibrate: cannot find the layers in the exported net (%s): every "
                                            "layer is timed alone", e)
        dense = one(0, grid[0][1], tag=False)
        grid = grid[:1]
    arts = [{"variant": variant, "file": name(f"net{vi}", int8)} for vi, (variant, _) in enumerate(grid)]
    files: Lowered = {arts[0]["file"]: dense}
    files.update({a["file"]: partial(one, vi, pairs) for vi, (a, (_, pairs)) in enumerate(zip(arts, grid)) if vi})
    return arts, files
