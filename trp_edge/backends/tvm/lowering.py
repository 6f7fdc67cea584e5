"""On this machine: ONNX -> Relax import, preparation (inference decompositions, packed convs, fusion), the
default schedule untuned kernels get, compiling and exporting a library for the target's CPU, and the
calibration grids (one library per layer shape)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, ConversionError, MissingTool
from ...latency_table import DENSE, NET
from ...targets import load_target, require_tool

if TYPE_CHECKING:
    from ...config import CalibrateConfig
    from ...targets import Target
    from ..base import Source

log = logging.getLogger(__name__)


def check_available(target: Target, src: Source | None = None) -> None:
    """TVM and, for a foreign board, its compiler are here (else one MissingTool line)."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise MissingTool("apache-tvm is not installed: pip install 'trp-edge[tvm]'") from None
    cc = target.cpu.cross_compiler
    if not target.native and cc and not _android(target):
        require_tool(cc, f"it links {target.name}'s {target.cpu.arch} libraries")


def _android(target: Target) -> bool:
    return "android" in target.cpu.triple


_INTRIN = {"x86_64": ("x86",), "aarch64": ("arm_cpu",)}  # the tensor intrinsics a target's CPU may use


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


def prepare(mod, target, packed: bool = True):
    """Inference decompositions, legalization and fusion: the fused kernels are what MetaSchedule
    tunes and what the database is matched against. `packed`: convs in NCHW{lanes}c (pack_convs)."""
    import tvm
    from tvm import relax

    with target:
        mod = relax.transform.DecomposeOpsForInference()(mod)
        if packed:
            mod = pack_convs(mod, target)
        return tvm.transform.Sequential([relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")])(mod)


def pack_convs(mod, target):
    """Convs in NCHW{lanes}c / OIHW{lanes}o where their channels divide (TVM's CPU conv layout: the innermost
    axis is one SIMD vector of output channels; the others, and grouped convs, stay NCHW), legalized by TOPI's
    packed conv, their weights repacked once at compile time. Measured on ResNet-18 at 3x (BENCHMARKS.md, issue
    12): the default schedule 67 ms against 76 NCHW; after 30 minutes of tuning 1.44x ORT's time, against 2.04x
    for NCHW (each against ORT in its own run)."""
    from tvm import relax
    from tvm.relax.transform.legalize_ops.adreno import conv2d_NCHWc_OIHWo
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    def legalize(bb, call):
        return _nn_conv2d(bb, call) if call.attrs.data_layout == "NCHW" else conv2d_NCHWc_OIHWo(bb, call)

    lanes = _lanes(target)

    def layouts(call):  # TOPI's packed conv has no groups: grouped and depthwise convs stay NCHW
        if getattr(call.op, "name", None) != "relax.nn.conv2d":
            return {}
        packed = [f"NCHW{lanes}c", f"OIHW{lanes}o"] if call.attrs.groups == 1 else ["NCHW", "OIHW"]
        return {"relax.nn.conv2d": packed}

    mod = relax.transform.ConvertLayout({}, layouts)(mod)
    return relax.transform.LegalizeOps({"relax.nn.conv2d": legalize})(relax.transform.Normalize()(mod))


def _lanes(target) -> int:
    """fp32 SIMD lanes of the target's CPU: AVX-512 16, AVX2 8, NEON / SSE 4."""
    attrs = " ".join(str(a) for a in target.attrs.get("mattr", [])) + " " + str(target.attrs.get("mcpu", ""))
    if "avx512" in attrs or "skylake-avx512" in attrs or "znver4" in attrs:
        return 16
    return 8 if target.kind.name == "llvm" and "aarch64" not in str(target) and "arm" not in str(target) else 4


def _schedule_block(sch, info, lanes: int) -> None:
    """Leading spatial loops fused and parallel; the innermost spatial loop split by the SIMD width and
    vectorized, inside the reduction loops where the block reduces (a convolution's output row), with the init
    split off after vectorizing (TVM refuses to vectorize a loop once the init is a block of its own: every conv
    with a row divisible by the width was left serial and scalar before, 200 ms against 84 ms on ResNet-18)."""
    kinds = info.dom_kind()
    ns = len(kinds) - len(kinds.lstrip("S"))
    loops = info.get_loops()
    if ns == 0:
        return
    inner = loops[ns - 1]
    if ns == 1:  # a single spatial axis: parallel over it, nothing left to vectorize
        sch.parallel(inner)
        return
    sch.parallel(sch.fuse(*loops[:ns - 1]))
    extent = getattr(sch.get(inner).extent, "value", None)
    # the full SIMD width only: half-width vectors on the 28-wide rows were slower here than none (measured)
    vec = sch.split(inner, factors=[None, lanes])[-1] if extent and extent % lanes == 0 else None
    if info.is_reduction():
        rest = loops[ns:]
        sch.reorder(*rest, vec if vec is not None else inner)
        if vec is not None:
            sch.vectorize(vec)
        sch.decompose_reduction(info.block_rv, rest[0])
    elif vec is not None:
        sch.vectorize(vec)


def default_schedule(mod, target):
    """The schedule untuned kernels get: every PrimFunc MetaSchedule did not schedule, with its loop nests
    parallel over the target's threads and vectorized (DLight's CPU rules cover only GEMV and reductions;
    raw Relax lowering is serial and scalar). A kernel the rule cannot schedule stays as lowered."""
    from tvm import s_tir
    from tvm.s_tir import dlight

    lanes = _lanes(target)

    class ParallelVectorize(dlight.ScheduleRule):
        def apply(self, func, _target, _tunable):
            sch = s_tir.Schedule(func)
            infos = dlight.normalize_prim_func(sch)
            if not infos:
                return None
            try:
                for info in infos:
                    _schedule_block(sch, info, lanes)
            except Exception:  # noqa: BLE001 - tvm.s_tir.ScheduleError: leave this kernel as lowered
                return None
            return sch

    with target:  # on a clone: DLight writes the scheduled functions into the module it is given
        return dlight.ApplyDefaultSchedule(ParallelVectorize())(mod.clone())


def cpu_build(mod, target, _params):
    """MetaSchedule builder: the default one minus `import tvm.s_tir.tensor_intrin` (see above)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def grid_library(models: dict[str, Path], shape: tuple[int, ...], target: Target, path: Path) -> dict[str, Any]:
    """A calibration grid: ONNX models of one input shape (function name -> file) as the functions of one
    library, each lowered as build lowers a model untuned (packed convs, the default schedule), so a layer's
    whole grid costs one compile; written to `path` as export writes (cross-compiled for a board). One model
    comes as it imports (its function "main"); several must each import as one function (a conv or a pair)."""
    check_available(target)
    import tvm

    lazy_tensor_intrin(_INTRIN.get(target.cpu.arch, ()))
    cpu_t = cpu_target(target)
    imported = {name: import_onnx(f, shape) for name, f in models.items()}
    if len(imported) == 1:
        mod = next(iter(imported.values()))
    else:
        several = [n for n, m in imported.items() if len(m.functions) != 1]
        if several:
            raise ConversionError(f"{models[several[0]].name}: imports as {len(imported[several[0]].functions)} "
                                  "functions; a calibration grid takes single-function models")
        mod = tvm.IRModule({name: m["main"].with_attr("global_symbol", name) for name, m in imported.items()})
    return export(tvm.compile(default_schedule(prepare(mod, cpu_t), cpu_t), target=cpu_t), path, target)


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




def lower_calibration(groups: dict[str, dict[str, Any]], cfg: CalibrateConfig, tmp: Path):
    """Each layer's grid one TVM library with a function per variant, lowered as build lowers a model untuned
    (grid_library: one compile per layer shape), for the target's CPU. {group: (artifacts, files)}."""
    import torch

    from ...export import export_onnx
    from ..base import write_onnx

    target, out = load_target(cfg.target), {}
    for gi, (key, g) in enumerate(groups.items()):
        models = {f"v{vi}": tmp / f"{gi}-{vi}.onnx" for vi in range(len(g["variants"]))}
        if key == NET:  # the whole net as compress exports it (the legacy exporter's pads are dynamic), as built
            models = {"main": models["v0"]}
            export_onnx(g["variants"][DENSE], torch.zeros(g["input_shape"]), models["main"])
        else:
            for module, f in zip(g["variants"].values(), models.values()):
                write_onnx(module, g["input_shape"], f)
        file, t0 = tmp / f"grid{gi}.so", time.perf_counter()
        if grid_library(models, tuple(g["input_shape"]), target, file).get("linked") is False:
            raise ConfigError(f"{target.name}: no compiler to link TVM libraries for it ({target.cpu.cross_compiler}"
                              "): put it on PATH to calibrate TVM there")
        log.info("calibrate: tvm: %s compiled, %d function(s) (%d of %d, %.1f s)", key, len(models), gi + 1,
                 len(groups), time.perf_counter() - t0)
        arts = [{"variant": v, "file": file.name, "signature": name} for v, name in zip(g["variants"], models)]
        out[key] = (arts, {file.name: file})
    return out
