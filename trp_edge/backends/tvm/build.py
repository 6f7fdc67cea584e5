"""The backend's build: every variant imported, prepared, tuned where a measurer is given (its records applied),
scheduled, compiled and exported for the target's CPU, and for its GPU where it has one (DLight schedules).

The measurer (where MetaSchedule times candidates, at which threads) is made by the caller and passed in:
this package reaches no device itself."""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConversionError
from ..base import Artifact, sha256
from .lowering import _INTRIN, _lanes, cpu_target, default_schedule, export, import_onnx, lazy_tensor_intrin, prepare
from .tuning import UNCAPPED, Measurer, MeasurerFactory, apply_database, tune, tuning_dir

if TYPE_CHECKING:
    from ...config import BuildConfig
    from ...targets import Target
    from ..base import Samples, Source

log = logging.getLogger(__name__)


def build(src: Source, target: Target, folder: Path, cfg: BuildConfig, samples: Samples | None,
          measurer: MeasurerFactory | Measurer | None = None) -> tuple[list[Artifact], dict[str, Any]]:
    """`measurer`: a ready Measurer, or a factory of a context yielding one (None: no device to tune on),
    entered only here, after TVM's set-up (an emulated server lives as long as the build). None: untuned."""
    lazy_tensor_intrin(_INTRIN.get(target.cpu.arch, ()))
    cpu_t = cpu_target(target)
    with _measuring(measurer) as m:
        return _build(src, target, folder, cfg, cpu_t, m)


def _measuring(measurer: MeasurerFactory | Measurer | None) -> AbstractContextManager[Measurer | None]:
    if measurer is None or isinstance(measurer, Measurer):
        return nullcontext(measurer)
    return measurer()


def _tuning(target: Target, cfg: BuildConfig, folder: Path, cpu_t, m: Measurer | None) -> dict[str, Any]:
    """The manifest's tuning entry before any model is tuned; its "database" is where the records go."""
    tuning: dict[str, Any] = {"trials_requested": cfg.tune_trials, "minutes_requested": cfg.tune_minutes,
                              "per_model": {}}
    if (cfg.tune_trials > 0 or cfg.tune_minutes > 0) and m is None:
        tuning["skipped"] = (f"no device to tune {target.name} ({target.cpu.mcpu}) on: timing it on this "
                             f"{os.uname().machine} machine would measure the wrong CPU; pass --host/--port or "
                             f"--tracker/--key of the device's `trp-edge serve` (or set [rpc] in its target file)")
        log.warning("tvm: %s", tuning["skipped"])
    if m is None:
        return {**tuning, "database": None}
    root = Path(cfg.tuning_db) if cfg.tuning_db else folder.parent / "tuning"
    tuning.update(runner=m.runner, device=m.device.get("cpu"), threads=m.threads, emulated=m.emulated)
    return {**tuning, "database": str(tuning_dir(root, target, cpu_t, m))}


def _build(src: Source, target: Target, folder: Path, cfg: BuildConfig, cpu_t,
           m: Measurer | None) -> tuple[list[Artifact], dict[str, Any]]:
    import tvm

    tuning = _tuning(target, cfg, folder, cpu_t, m)
    db_dir = Path(tuning["database"]) if m is not None else None
    compiler = None if target.native else target.cpu.cross_compiler
    arts = []
    for v in src.variants:
        t0 = time.perf_counter()
        imported = import_onnx(v.onnx, src.input_shape)
        mod = prepare(imported, cpu_t)
        if m is not None:
            tuning["per_model"][v.name] = tune(mod, cpu_t, db_dir, cfg.tune_trials or UNCAPPED, m, compiler,
                                               seconds=60 * cfg.tune_minutes or None)
            if v.name == "compressed":  # the untuned module too: deploy times it beside the tuned one
                ref = export(tvm.compile(default_schedule(mod, cpu_t), target=cpu_t),
                             folder / "compressed-untuned.so", target).get("file", "compressed-untuned.so")
                tuning["untuned_reference"] = {"file": ref, "sha256": sha256(folder / ref)}
            mod = apply_database(mod, cpu_t, db_dir)
        ex = tvm.compile(default_schedule(mod, cpu_t), target=cpu_t)
        f = folder / f"{v.name}.so"
        extra = export(ex, f, target)
        arts.append(Artifact(v.name, extra.pop("file", f.name), "tvm",
                             extra={"tuned": m is not None, "compile_seconds": round(time.perf_counter() - t0, 1),
                                    **extra}))
        if target.gpu and cfg.gpu:
            arts.append(_gpu_artifact(v.name, imported, target, folder))
    info = {"runtime_version": {"tvm": tvm.__version__}, "tvm_target": {"cpu": str(cpu_t)},
            "conv_layout": f"NCHW{_lanes(cpu_t)}c where channels divide, else NCHW", "tuning": tuning}
    if target.gpu and cfg.gpu:
        info["tvm_target"]["gpu"] = target.gpu.tvm_target(target.cpu)
    return arts, info


def _gpu_artifact(variant: str, imported, target: Target, folder: Path) -> Artifact:
    """The imported model compiled for the target's GPU by TVM's default pipeline (DLight schedules)."""
    import tvm

    gpu_t = tvm.target.Target(target.gpu.tvm_target(target.cpu))
    gex = tvm.compile(imported, target=gpu_t)
    kinds = [m.kind for m in gex.mod.imports[0].imports] if gex.mod.imports else []
    if target.gpu.api not in kinds:
        raise ConversionError(f"{variant}: TVM produced no {target.gpu.api} kernels for {target.name}")
    gf = folder / f"{variant}-{target.gpu.api}.so"
    gextra = export(gex, gf, target)
    return Artifact(variant, gextra.pop("file", gf.name), "tvm", device=target.gpu.api,
                    extra={"tuned": False, "schedules": "DLight defaults", **gextra})
