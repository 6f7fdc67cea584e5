"""TVM 0.27 (Relax): ONNX -> Relax -> fused kernels -> (MetaSchedule-tuned) shared library for the
target's CPU and, where it has one, its GPU (OpenCL / CUDA / Vulkan through DLight schedules).

Untuned Relax code is not usable on a CPU (measured: ResNet-18 2.36 s untuned vs 72 ms in PyTorch), so
`--tune-trials N` tunes every fused kernel with MetaSchedule. The tuning database lives in
OUT/<target>/tuning/<cpu-hash>/ and is keyed by each kernel's structure (shapes included): a second
build of the same model and target tunes nothing, and the dense and compressed models share the
kernels they have in common. Candidates are built here (cross-compiled for a foreign target) and timed where
the model will run: on this machine for a native target, else on the device's `trp-edge serve` over RPC
(host:port or tracker/key), at the target's threads. The database is kept per target and per CPU the
measuring machine reports; a device lost mid-tuning ends the build with one line, and the records already
written are reused by the next run."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ConversionError, DeviceError, MissingTool
from ..targets import Connection, require_tool
from .base import PROFILE_RUNS, Artifact, Run, Samples, Source, sha256

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


# ---- on this machine: import, tune, build ---------------------------------------------------------------


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


BUILDER_RESTART = 16  # batches one builder worker serves before a fresh one (TVM restarts it for every batch)


def persistent_builder(compiler: str | None, timeout: float = 120.0):
    """MetaSchedule's LocalBuilder with its worker process kept between batches. The stock builder starts a new
    worker for every batch (against a memory leak in long-lived workers), and each new worker spends about 6 s
    importing TVM: with one worker that was 8 s a trial at small batches. This one restarts its worker every
    BUILDER_RESTART batches instead."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    f_export = functools.partial(export_so, compiler)

    @derived_object
    class PersistentBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool, self.batches = None, 0

        def build(self, build_inputs):
            if self.pool is None or self.batches >= BUILDER_RESTART:
                self.shutdown()
                self.pool = PopenPoolExecutor(max_workers=1, timeout=timeout)
            self.batches += 1
            jobs = [(cpu_build, f_export, b.mod, b.target, lb._serialize_params(b.params)) for b in build_inputs]
            out = []
            for r in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), jobs):
                if r.status == StatusKind.COMPLETE:
                    out.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    out.append(BuilderResult(None, f"LocalBuilder: Timeout, killed after {timeout} seconds"))
                else:
                    out.append(BuilderResult(None, f"LocalBuilder: An exception occurred\n{r.value}"))
            return out

        def shutdown(self):
            if self.pool is not None:
                self.pool.shutdown()
            self.pool, self.batches = None, 0

    return PersistentBuilder()


@dataclass
class Measurer:
    """Where MetaSchedule times its candidates: this machine (conn None) or a `trp-edge serve` over RPC."""

    runner: str  # for the manifest: "local", "rpc (HOST:PORT)", "emulated rpc (...)"
    device: dict[str, Any] = field(default_factory=dict)  # the identity the measuring machine reports
    conn: Connection | None = None
    threads: int = 1
    emulated: bool = False


def _device_info(conn: Connection) -> dict[str, Any]:
    from ..transport import connect

    sess = connect(conn, 120)
    try:
        info = json.loads(sess.get_function("trp_edge.info")())
    except Exception:  # noqa: BLE001 - tvm.exec.rpc_server has no trp_edge.info
        raise DeviceError(f"{conn.describe()} is a TVM RPC server without trp-edge's trp_edge.info; run "
                          "`trp-edge serve` there to tune on it") from None
    if "cpu" not in info.get("tvm_devices", ["cpu"]):
        raise DeviceError(f"{conn.describe()} has no TVM runtime to time kernels with (pip install apache-tvm "
                          "there, or build the TVM runtime: README)")
    return info


@contextmanager
def measurer(target: Target, cfg: BuildConfig) -> Iterator[Measurer | None]:
    """The machine tuning measures on: the device given by cfg's host/port or tracker/key, else an emulated
    aarch64 server (cfg.tune_emulated), else this machine for a native target, else the target's [rpc] or
    $TRP_EDGE_TRACKER / $TRP_EDGE_RPC; None when there is none (the build is left untuned, with a warning)."""
    from ..profile import host_identity
    from ..transport import resolve

    if cfg.tune_trials <= 0 and cfg.tune_minutes <= 0:
        yield None
        return
    given = bool(cfg.host or cfg.tracker)
    if cfg.tune_emulated and not given and not target.native:
        from ..emulate import emulated_server

        with emulated_server(target) as conn:
            yield Measurer(f"emulated rpc (qemu-user {target.cpu.arch}, {conn.describe()})", _device_info(conn),
                           conn, 1, emulated=True)  # one thread: qemu on this machine's cores
        return
    if target.native and not given:
        yield Measurer("local", host_identity(), threads=target.threads)
        return
    try:
        conn = resolve(target, host=cfg.host, port=cfg.port, tracker=cfg.tracker, key=cfg.key)
    except ConfigError:
        yield None
        return
    yield Measurer(f"rpc ({conn.describe()})", _device_info(conn), conn, target.threads)


def tuning_dir(root: Path, target: Target, tvm_target, device: dict[str, Any]) -> Path:
    """root/<hash of the TVM target and the measuring CPU>/: one database per target and CPU."""
    ident = {"tvm_target": str(tvm_target), "cpu": device.get("cpu"), "machine": device.get("machine")}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    d = root / key
    d.mkdir(parents=True, exist_ok=True)
    (d / "target.json").write_text(json.dumps({"target": target.name, **ident}, indent=2))
    return d


def export_so(compiler: str | None, mod) -> str:
    """MetaSchedule export: a shared library (cross-linked with `compiler`) the device's runtime loads."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(compiler) if compiler else None)
    return path


def rpc_session(conn: dict[str, Any], timeout: float, _rpc_config):
    """MetaSchedule runner: a session on the device's trp-edge serve, direct or through a tracker."""
    from ..transport import connect

    return connect(Connection(**conn), timeout, handshake=30.0)


def rpc_evaluate(threads: int, session, rt_mod, device, evaluator_config, repeated_args):
    """MetaSchedule runner: the device's thread pool set to the target's threads, then the default timing."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    try:
        session.get_function("runtime.config_threadpool")(1, threads)
    except Exception:  # noqa: BLE001 - a runtime without it keeps its default pool
        pass
    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


def _runner(m: Measurer):
    from tvm.s_tir import meta_schedule as ms

    ev = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if m.emulated:  # qemu's timings rank nothing: one run per candidate checks the flow
        ev = ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
    if m.conn is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ev)
    timeout = 600 if m.emulated else 120
    fields = {"key": m.conn.key, "tracker": m.conn.tracker, "host": m.conn.host, "port": m.conn.port}
    host, _, port = (m.conn.tracker or f"{m.conn.host}:{m.conn.port}").rpartition(":")
    return ms.runner.RPCRunner(  # the tracker fields only pass the config check: the session is ours
        ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=m.conn.key or "-",
                            session_timeout_sec=timeout),
        ev, f_create_session=functools.partial(rpc_session, fields, timeout),
        f_run_evaluator=functools.partial(rpc_evaluate, m.threads))


def _alive(conn: Connection) -> str | None:
    """None when the device still accepts a session, else why not."""
    from ..transport import connect

    try:
        connect(conn, 30, handshake=15.0)
    except DeviceError as e:
        return str(e).split(" (", 1)[-1].split(")", 1)[0]
    return None


def open_database(work_dir: Path):
    """The JSONDatabase in work_dir. TVM 0.27 writes some records it cannot read back (seen: a mean reduction
    rfactor-ed for aarch64), and one such record fails the whole load: those are moved to
    database_tuning_record.rejected.json, with a warning, and the rest kept."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir))
    except Exception:  # noqa: BLE001 - tvm_ffi's RuntimeError from the parallel record parser
        pass
    records = work_dir / "database_tuning_record.json"
    lines = [ln for ln in records.read_text().splitlines() if ln.strip()]
    good, bad = [], []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(work_dir / "database_workload.json", tmp)
        for ln in lines:
            Path(tmp, "database_tuning_record.json").write_text(ln + "\n")
            try:
                ms.database.JSONDatabase(work_dir=tmp)
                good.append(ln)
            except Exception:  # noqa: BLE001 - this record is the unreadable one
                bad.append(ln)
    with open(work_dir / "database_tuning_record.rejected.json", "a") as f:
        f.writelines(ln + "\n" for ln in bad)
    tmp_records = records.with_suffix(".json.tmp")
    tmp_records.write_text("".join(ln + "\n" for ln in good))
    os.replace(tmp_records, records)
    log.warning("tvm: %d tuning record(s) in %s could not be read back by TVM; moved to %s", len(bad), work_dir,
                "database_tuning_record.rejected.json")
    return ms.database.JSONDatabase(work_dir=str(work_dir))


def _cost(task) -> float:
    """A kernel's share of the model's work: its FLOPs times the calls to it (its weight)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * task.weight
    except Exception:  # noqa: BLE001 - a kernel the estimator cannot read: last
        return 0.0


def _has_record(db, task) -> bool:
    mod = task.dispatched[0]
    return bool(db.has_workload(mod) and db.get_top_k(db.commit_workload(mod), 1))


UNCAPPED = 100_000  # the trial cap of a tuning bounded by time only (--tune-minutes without --tune-trials)


class _TimeUp(Exception):
    pass


def _progress(m: Measurer, work_dir: Path, trials: int, seconds: float | None):
    """MetaSchedule measure callback: trials done and the best time per kernel in the log; stops the tuning
    (by raising) when the device has gone away or the time budget is spent."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self):
            self.n, self.best, self.lost, self.time_up = 0, {}, None, False
            self.t0 = time.perf_counter()

        def apply(self, scheduler, task_id, candidates, builds, runs):
            name = scheduler.tasks_[task_id].ctx.task_name
            for b, r in zip(builds, runs):
                self.n += 1
                if b.error_msg is None and r.error_msg is None:
                    us = 1e6 * sorted(float(s) for s in r.run_secs)[len(r.run_secs) // 2]
                    self.best[name] = min(self.best.get(name, float("inf")), us)
            failed = [r.error_msg for r in runs if r.error_msg and "RPCRunner" in r.error_msg]
            if m.conn is not None and failed and len(failed) == len(runs):
                why = _alive(m.conn)
                if why:  # stop here: every further trial would fail the same way
                    self.lost = DeviceError(
                        f"{m.conn.describe()} went away during TVM tuning after {self.n} trials ({why}); the "
                        f"records measured so far are kept in {work_dir}: run the same command again to resume")
                    raise self.lost
            log.info("tvm tuning: %d/%d trials, %.0f s; %s best %.1f us", self.n, trials,
                     time.perf_counter() - self.t0, name, self.best.get(name, float("nan")))
            if seconds is not None and time.perf_counter() - self.t0 >= seconds:
                self.time_up = True
                raise _TimeUp()

    return Progress()


@contextmanager
def _nameless_handlers_detached():
    """MetaSchedule's logging setup re-lists the handlers of its logger by name and fails on one without a name
    (seen: pytest's capture handlers after a first tuning in the same process); they are set aside meanwhile."""
    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    nameless = [h for h in lg.handlers if h.get_name() is None]
    for h in nameless:
        lg.removeHandler(h)
    try:
        yield
    finally:
        for h in nameless:
            lg.addHandler(h)


def tune(mod, target, work_dir: Path, trials: int, m: Measurer, compiler: str | None = None,
         seconds: float | None = None, scheduler: str = "round-robin") -> dict[str, Any]:
    """Tune the kernels of `mod` that have no record in work_dir yet, timed where `m` says, for `trials` in all
    or until `seconds` have passed; returns what was done. Records are written after each batch, so a run that
    stops (time up, device lost) keeps what it measured. `scheduler`: MetaSchedule's task scheduler,
    "round-robin" (every kernel in turn) or "gradient" (the kernels that cost the most time first)."""
    from tvm.s_tir import meta_schedule as ms

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    db = open_database(work_dir)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    done = [t for t in tasks if _has_record(db, t)]
    todo = sorted((t for t in tasks if t not in done), key=_cost, reverse=True)  # the costliest kernels first
    info: dict[str, Any] = {"tasks": len(tasks), "reused_from_database": len(done), "tuned": len(todo),
                            "trials": 0, "seconds": 0.0, "runner": m.runner}
    log.info("tvm: %d kernels, %d already tuned in %s, tuning %d", len(tasks), len(done), work_dir, len(todo))
    if not todo:
        return info
    per_task = max(1, trials // len(todo))  # `trials` in all: with fewer than kernels, the first ones get one each

    progress = _progress(m, work_dir, trials, seconds)
    with _nameless_handlers_detached():
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir=str(work_dir), space="post-order-apply",
            strategy=ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=min(16, per_task),
                                                           genetic_num_iters=2),
            num_threads=1, seed=0)
    builder = persistent_builder(compiler)
    try:
        ms.tune_tasks(
            tasks=ctxs, task_weights=weights, work_dir=str(work_dir), max_trials_global=trials,
            max_trials_per_task=per_task, num_trials_per_iter=min(per_task, 32), builder=builder,
            runner=_runner(m), database=db, cost_model="xgb",
            measure_callbacks=ms.MeasureCallback.create("default") + [progress],
            task_scheduler=scheduler)
    except Exception:
        if progress.lost is not None:  # raised in the callback; TVM re-raises it wrapped
            raise progress.lost from None
        if not progress.time_up:
            raise
    finally:
        builder.shutdown()
    tuned = sum(1 for t in todo if _has_record(db, t))
    info.update(tuned=tuned, trials=progress.n, seconds=round(time.perf_counter() - progress.t0, 1))
    if progress.time_up:
        info["stopped"] = f"time budget of {seconds / 60:g} min"
    if tuned < len(todo):
        log.warning("tvm: %d of %d kernels got no trial within the budget (%s; they use the default schedule)",
                    len(todo) - tuned, len(todo), info.get("stopped") or f"--tune-trials {trials}")
    return info


def apply_database(mod, target, work_dir: Path):
    from tvm import relax

    db = open_database(work_dir)
    with target, db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


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


def build(src: Source, target: Target, folder: Path, cfg: BuildConfig,
          samples: Samples | None) -> tuple[list[Artifact], dict[str, Any]]:
    lazy_tensor_intrin(_INTRIN.get(target.cpu.arch, ()))
    cpu_t = cpu_target(target)
    with measurer(target, cfg) as m:
        return _build(src, target, folder, cfg, cpu_t, m)


def _build(src: Source, target: Target, folder: Path, cfg: BuildConfig, cpu_t,
           m: Measurer | None) -> tuple[list[Artifact], dict[str, Any]]:
    import tvm

    tuning: dict[str, Any] = {"trials_requested": cfg.tune_trials, "minutes_requested": cfg.tune_minutes,
                              "per_model": {}}
    tune_here = m is not None
    if (cfg.tune_trials > 0 or cfg.tune_minutes > 0) and m is None:
        tuning["skipped"] = (f"no device to tune {target.name} ({target.cpu.mcpu}) on: timing it on this "
                             f"{os.uname().machine} machine would measure the wrong CPU; pass --host/--port or "
                             f"--tracker/--key of the device's `trp-edge serve` (or set [rpc] in its target file)")
        log.warning("tvm: %s", tuning["skipped"])
    root = Path(cfg.tuning_db) if cfg.tuning_db else folder.parent / "tuning"
    db_dir = tuning_dir(root, target, cpu_t, m.device) if tune_here else None
    compiler = None if target.native else target.cpu.cross_compiler
    if tune_here:
        tuning.update(runner=m.runner, device=m.device.get("cpu"), threads=m.threads, emulated=m.emulated)
    arts = []
    for v in src.variants:
        t0 = time.perf_counter()
        imported = import_onnx(v.onnx, src.input_shape)
        mod = prepare(imported, cpu_t)
        if tune_here:
            tuning["per_model"][v.name] = tune(mod, cpu_t, db_dir, cfg.tune_trials or UNCAPPED, m, compiler,
                                               seconds=60 * cfg.tune_minutes or None)
            if v.name == "compressed":  # the untuned module too: deploy times it beside the tuned one
                ref = export(tvm.compile(default_schedule(mod, cpu_t), target=cpu_t),
                             folder / "compressed-untuned.so", target).get("file", "compressed-untuned.so")
                tuning["untuned_reference"] = {"file": ref, "sha256": sha256(folder / ref)}
            mod = apply_database(mod, cpu_t, db_dir)
        mod = default_schedule(mod, cpu_t)
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
            "conv_layout": f"NCHW{_lanes(cpu_t)}c where channels divide, else NCHW",
            "tuning": {**tuning, "database": str(db_dir) if db_dir else None}}
    if target.gpu and cfg.gpu:
        info["tvm_target"]["gpu"] = target.gpu.tvm_target(target.cpu)
    return arts, info
