"""MetaSchedule tuning: where candidates are timed (a Measurer, made by the caller and passed in), the builder,
the tuning database (one per target, measuring CPU and threads), the tuning itself and applying its records.

Candidates are built here (cross-compiled for a foreign target) and timed where the model will run: on this
machine for a native target, else on the device's `trp-edge serve` over RPC, at the measurer's threads. A
device lost mid-tuning ends the build with one line, and the records already written are reused by the next
run."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import DeviceError
from ...targets import Connection
from .lowering import cpu_build

if TYPE_CHECKING:
    from ...targets import Target

log = logging.getLogger(__name__)


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
    """Where MetaSchedule times its candidates: this machine (conn None) or a `trp-edge serve` over RPC, at
    `threads`. Made above the backends (trp_edge.tuning_device) and passed into build: `connect` is the
    transport's connect(conn, timeout, handshake=...), which opens the sessions on the device."""

    runner: str  # for the manifest: "local", "rpc (HOST:PORT)", "emulated rpc (...)"
    device: dict[str, Any] = field(default_factory=dict)  # the identity the measuring machine reports
    conn: Connection | None = None
    threads: int = 1
    emulated: bool = False
    connect: Callable[..., Any] | None = None


MeasurerFactory = Callable[[], AbstractContextManager["Measurer | None"]]  # what build is given: entered to tune


def tuning_dir(root: Path, target: Target, tvm_target, m: Measurer) -> Path:
    """root/<hash of the TVM target, the measuring CPU and the threads>/: one database per target, CPU and
    thread count (a kernel's best schedule at one thread is not its best at four)."""
    ident = {"tvm_target": str(tvm_target), "cpu": m.device.get("cpu"), "machine": m.device.get("machine"),
             "threads": m.threads}
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


def rpc_session(connect: Callable[..., Any], conn: dict[str, Any], timeout: float, _rpc_config):
    """MetaSchedule runner: a session on the device's trp-edge serve, direct or through a tracker."""
    return connect(Connection(**conn), timeout, handshake=30.0)


def rpc_evaluate(threads: int, session, rt_mod, device, evaluator_config, repeated_args):
    """MetaSchedule runner: the device's thread pool set to the target's threads, then the default timing."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    try:
        session.get_function("runtime.config_threadpool")(1, threads)
    except Exception:  # noqa: BLE001 - a runtime without it keeps its default pool
        pass
    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


def local_evaluate(threads: int, rt_mod, device, evaluator_config, repeated_args):
    """MetaSchedule's local runner: its worker's thread pool set to the measurer's threads (else it is TVM's
    default, every core here: TVM_NUM_THREADS in backends.base), then the default timing."""
    import tvm
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(1, threads)
    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


def _runner(m: Measurer):
    from tvm.s_tir import meta_schedule as ms

    ev = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if m.emulated:  # qemu's timings rank nothing: one run per candidate checks the flow
        ev = ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
    if m.conn is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ev,
                                     f_run_evaluator=functools.partial(local_evaluate, m.threads))
    timeout = 600 if m.emulated else 120
    fields = {"key": m.conn.key, "tracker": m.conn.tracker, "host": m.conn.host, "port": m.conn.port}
    host, _, port = (m.conn.tracker or f"{m.conn.host}:{m.conn.port}").rpartition(":")
    return ms.runner.RPCRunner(  # the tracker fields only pass the config check: the session is ours
        ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=m.conn.key or "-",
                            session_timeout_sec=timeout),
        ev, f_create_session=functools.partial(rpc_session, m.connect, fields, timeout),
        f_run_evaluator=functools.partial(rpc_evaluate, m.threads))


def _alive(m: Measurer) -> str | None:
    """None when the device still accepts a session, else why not."""
    try:
        m.connect(m.conn, 30, handshake=15.0)
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
                why = _alive(m)
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


