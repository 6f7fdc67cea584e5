"""TVM 0.27 (Relax): ONNX -> Relax -> fused kernels -> (MetaSchedule-tuned) shared library for the
target's CPU and, where it has one, its GPU (OpenCL / CUDA / Vulkan through DLight schedules).

Untuned Relax code is not usable on a CPU (measured: ResNet-18 2.36 s untuned vs 72 ms in PyTorch), so
`--tune-trials N` tunes every fused kernel with MetaSchedule. The tuning database lives in
OUT/<target>/tuning/<cpu-hash>/ and is keyed by each kernel's structure (shapes included): a second
build of the same model and target tunes nothing, and the dense and compressed models share the
kernels they have in common. Tuning runs on this machine, so it is only done for a native target;
tuning an ARM target on x86 measures the wrong machine."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConversionError, MissingTool
from ..targets import require_tool
from .base import PROFILE_RUNS, Artifact, Run, Samples, Source

if TYPE_CHECKING:
    from ..config import BuildConfig
    from ..targets import Target

log = logging.getLogger(__name__)

OPS_NOTE = None


# ---- on the device: loading and per-op profiling (numpy and the TVM runtime only) ----------------------

def tvm_device(device: str):
    import tvm

    return {"cpu": tvm.cpu, "opencl": tvm.opencl, "cuda": tvm.cuda, "vulkan": tvm.vulkan}[device](0)


def _threads(threads: int) -> None:
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


def load(path: str, threads: int = 1, device: str = "cpu") -> Run:
    import tvm

    vm, dev = tvm_vm(path, threads, device)

    def run(x: np.ndarray) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(x, dev))
        if not hasattr(out, "numpy"):  # a tuple of outputs
            out = out[0]
        return out.numpy()

    return run


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
            shapes = [tuple(int(s) for s in a.shape) for a in args if hasattr(a, "shape")]
            per[key] = {"op": "conv" if "conv" in name else name.split("_")[1] if "_" in name else name,
                        "weight": list(shapes[1]) if len(shapes) > 2 else None,
                        "output": list(shapes[-1]) if shapes else None, "us": []}
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


# ---- on this machine: import, tune, build ---------------------------------------------------------------


def check_available(target: Target, src: Source) -> None:
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise MissingTool("apache-tvm is not installed: pip install 'trp-edge[tvm]'") from None
    cc = target.cpu.cross_compiler
    if not target.native and cc and not _android(target):
        require_tool(cc, f"it links {target.name}'s {target.cpu.arch} libraries")


def _android(target: Target) -> bool:
    return "android" in target.cpu.triple


def lazy_tensor_intrin(preload: tuple[str, ...] = ()) -> None:
    """Register tvm.s_tir.tensor_intrin without running its __init__, which imports every backend's
    intrinsics (about 30 s, 21 s of it CUDA) in this process and again in each builder worker, so the
    default builder timed out on every sample. Submodules still import on demand."""
    import importlib
    import importlib.util
    import sys

    import tvm.s_tir as s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        pkg = importlib.util.module_from_spec(importlib.util.find_spec(name))
        sys.modules[name] = pkg
        s_tir.tensor_intrin = pkg
    for sub in preload:
        importlib.import_module(f"{name}.{sub}")


def cpu_target(target: Target):
    import tvm

    t = target.cpu.tvm_target()
    if target.native:
        t.pop("mtriple")  # LLVM's default triple for this wheel; an explicit one changes nothing but the name
    return tvm.target.Target(t)


def import_onnx(path: Path, shape: tuple[int, ...]):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    m = onnx.load(str(path))
    name = m.graph.input[0].name
    try:
        return from_onnx(m, shape_dict={name: list(shape)}, dtype_dict="float32", keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 - an op the frontend cannot lower
        raise ConversionError(f"{path.name}: TVM cannot import it ({str(e).strip().splitlines()[-1][:200]})") from e


def prepare(mod, target):
    """Inference decompositions, legalization and fusion: the fused kernels are what MetaSchedule
    tunes and what the database is matched against."""
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")])(mod)


def cpu_build(mod, target, _params):
    """MetaSchedule builder: the default one minus `import tvm.s_tir.tensor_intrin` (see above)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def tuning_dir(root: Path, target: Target, tvm_target) -> Path:
    key = hashlib.sha256(json.dumps(str(tvm_target), sort_keys=True).encode()).hexdigest()[:10]
    d = root / key
    d.mkdir(parents=True, exist_ok=True)
    (d / "target.json").write_text(json.dumps({"target": target.name, "tvm_target": str(tvm_target)}, indent=2))
    return d


def tune(mod, target, work_dir: Path, trials: int) -> dict[str, Any]:
    """Tune the kernels of `mod` that have no record in work_dir yet; returns what was done."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    tasks = ms.relax_integration.extract_tasks(mod, target)
    done = [t for t in tasks if db.has_workload(t.dispatched[0])
            and db.get_top_k(db.commit_workload(t.dispatched[0]), 1)]
    todo = [t for t in tasks if t not in done]
    info: dict[str, Any] = {"tasks": len(tasks), "reused_from_database": len(done), "tuned": len(todo),
                            "trials": 0, "seconds": 0.0}
    log.info("tvm: %d kernels, %d already tuned in %s, tuning %d", len(tasks), len(done), work_dir, len(todo))
    if not todo:
        return info
    per_task = max(1, trials // len(todo))
    t0 = time.perf_counter()

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self):
            self.n, self.best = 0, {}

        def apply(self, scheduler, task_id, candidates, builds, runs):
            name = scheduler.tasks_[task_id].ctx.task_name
            for b, r in zip(builds, runs):
                self.n += 1
                if b.error_msg is None and r.error_msg is None:
                    us = 1e6 * sorted(float(s) for s in r.run_secs)[len(r.run_secs) // 2]
                    self.best[name] = min(self.best.get(name, float("inf")), us)
            log.info("tvm tuning: %d/%d trials, %.0f s; %s best %.1f us", self.n, per_task * len(todo),
                     time.perf_counter() - t0, name, self.best.get(name, float("nan")))

    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        todo, work_dir=str(work_dir), space="post-order-apply",
        strategy=ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=min(16, per_task),
                                                       genetic_num_iters=2),
        num_threads=1, seed=0)
    progress = Progress()
    ms.tune_tasks(
        tasks=ctxs, task_weights=weights, work_dir=str(work_dir), max_trials_global=per_task * len(todo),
        max_trials_per_task=per_task, num_trials_per_iter=min(per_task, 32),
        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=120, f_build=cpu_build),
        runner=ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)),
        database=db, cost_model="xgb", measure_callbacks=ms.MeasureCallback.create("default") + [progress],
        task_scheduler="round-robin")  # round-robin writes records after each batch: a killed run resumes
    info.update(trials=progress.n, seconds=round(time.perf_counter() - t0, 1))
    return info


def apply_database(mod, target, work_dir: Path):
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    with target, db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def export(ex, path: Path, target: Target) -> dict[str, Any]:
    """Write a shared library the device's TVM runtime loads; an Android target without the NDK's
    compiler gets the object files (.tar) to link there."""
    from tvm.support import cc

    if target.native:
        ex.export_library(str(path))
        return {}
    compiler = target.cpu.cross_compiler
    if _android(target) and not (compiler and shutil.which(compiler)):
        tar = path.with_suffix(".tar")
        ex.export_library(str(tar))
        return {"file": tar.name, "linked": False,
                "link_note": f"{compiler or 'the NDK clang'} not found; link with tvm.support.ndk.create_shared "
                             "or put the NDK compiler on PATH and build again"}
    ex.export_library(str(path), fcompile=cc.cross_compiler(compiler))
    return {}


def build(src: Source, target: Target, folder: Path, cfg: BuildConfig,
          samples: Samples | None) -> tuple[list[Artifact], dict[str, Any]]:
    import tvm

    lazy_tensor_intrin(("x86",) if target.cpu.arch == "x86_64" else ("arm_cpu",) if target.cpu.arch == "aarch64"
                       else ())
    cpu_t = cpu_target(target)
    tuning: dict[str, Any] = {"trials_requested": cfg.tune_trials, "per_model": {}}
    tune_here = cfg.tune_trials > 0 and target.native
    if cfg.tune_trials > 0 and not target.native:
        tuning["skipped"] = (f"tuning {target.name} ({target.cpu.mcpu}) on this {target.cpu.arch} machine would "
                             "measure the wrong CPU; tune on the device over RPC")
        log.warning("tvm: %s", tuning["skipped"])
    root = Path(cfg.tuning_db) if cfg.tuning_db else folder.parent / "tuning"
    db_dir = tuning_dir(root, target, cpu_t) if tune_here else None
    arts = []
    for v in src.variants:
        t0 = time.perf_counter()
        imported = import_onnx(v.onnx, src.input_shape)
        mod = prepare(imported, cpu_t)
        if tune_here:
            tuning["per_model"][v.name] = tune(mod, cpu_t, db_dir, cfg.tune_trials)
            mod = apply_database(mod, cpu_t, db_dir)
        ex = tvm.compile(mod, target=cpu_t)
        f = folder / f"{v.name}.so"
        extra = export(ex, f, target)
        arts.append(Artifact(v.name, extra.pop("file", f.name), "tvm",
                             extra={"tuned": tune_here, "compile_seconds": round(time.perf_counter() - t0, 1),
                                    **extra}))
        if target.gpu and cfg.gpu:
            gpu_t = tvm.target.Target(target.gpu.tvm_target(target.cpu))
            gex = tvm.compile(imported, target=gpu_t)  # the default GPU pipeline schedules with DLight
            kinds = [m.kind for m in gex.mod.imports[0].imports] if gex.mod.imports else []
            if target.gpu.api not in kinds:
                raise ConversionError(f"{v.name}: TVM produced no {target.gpu.api} kernels for {target.name}")
            gf = folder / f"{v.name}-{target.gpu.api}.so"
            gextra = export(gex, gf, target)
            arts.append(Artifact(v.name, gextra.pop("file", gf.name), "tvm", device=target.gpu.api,
                                 extra={"tuned": False, "schedules": "DLight defaults", **gextra}))
    info = {"runtime_version": {"tvm": tvm.__version__}, "tvm_target": {"cpu": str(cpu_t)},
            "tuning": {**tuning, "database": str(db_dir) if db_dir else None}}
    if target.gpu and cfg.gpu:
        info["tvm_target"]["gpu"] = target.gpu.tvm_target(target.cpu)
    return arts, info
