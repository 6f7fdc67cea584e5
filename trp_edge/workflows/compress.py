"""`trp-edge compress`: load -> TRP training -> decompose_ -> ONNX export -> report.

Artifacts go to a staging folder inside --out and replace the old ones only when everything has
been written and validated, so a failed run loses nothing already there."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import CompressConfig, DecomposeConfig
from ..contracts import CompressReport
from ..errors import InputError
from ..flops import count_macs, param_count
from ..latency_table import LatencyTable, layer_shape, load_tables
from ..lowrank import conv_layers, scheme_names
from ..planning import LayerPlan, decompose_
from ..planning_latency import precision_dense, precision_models
from ..trp_distributed import current
from . import out_lock
from .compress_checks import int8_net_check, latency_check
from .compress_train import (
    FINETUNE_CHECKPOINT,
    finetune_stage,
    finish,
    loop_options,
    loop_stats,
    prepare,
    training_section,
)

log = logging.getLogger(__name__)

# compressed.pt / dense.pt for the families trp-edge rebuilds; compressed.pt2 / dense.pt2 for any other model
OUTPUTS = ("dense.onnx", "model.onnx", "report.json", "ranks.png")  # beside the two model files
ARTIFACTS = ("compressed.pt", "dense.pt", *OUTPUTS)
PROGRAMS = {"compressed.pt": "compressed.pt2", "dense.pt": "dense.pt2"}


@dataclass
class CompressResult:
    out: Path
    report: CompressReport
    model: torch.nn.Module | None = None  # the compressed model
    artifacts: tuple[str, ...] = ARTIFACTS


def default_out(name: str) -> Path:
    return Path("trp-edge-out") / name


def _prepare_out(cfg: CompressConfig, name: str) -> Path:
    out = Path(cfg.out) if cfg.out else default_out(name)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if current().is_main:  # one run per --out: of two racing, the second is refused here (out_lock)
        out.mkdir(parents=True, exist_ok=True)
        out_lock.claim(out)
    if out.is_dir() and any(p.name != out_lock.LOCK for p in out.iterdir()) and not (cfg.force or cfg.resume):
        raise InputError(f"--out {out}: already holds a result; pass --force to replace it or --resume to go on")
    if cfg.force:
        for ckpt in ("checkpoint.pt", FINETUNE_CHECKPOINT):
            (out / ckpt).unlink(missing_ok=True)
    return out


@dataclass
class _Run:
    """What the stages of one compress run hand each other."""

    cfg: CompressConfig
    data: Any
    name: str
    spec: dict[str, Any]
    model: torch.nn.Module
    example: torch.Tensor
    out: Path
    dense_macs: Any = None
    other_macs: int = 0
    initial_acc: float | None = None
    last_iterate_acc: float | None = None
    train: Any = None
    dcfg: DecomposeConfig | None = None
    energy: float | None = None  # the energy of TRP's last TSVD (None: the decomposition finds it)
    tables: tuple = ()  # the latency tables of dcfg.latency_table, loaded once (tables_stage)
    services: Services | None = None
    teacher: torch.nn.Module | None = None  # --distill: the dense model as loaded, frozen (compress_train.prepare)
    metrics: Any = None  # the MetricsLog of a run that trains
    loop_stats: dict[str, Any] | None = None  # precision, training and evaluation images/s (compress_train)
    trp_kept: dict[str, Any] | None = None  # --keep best: TRP's epoch kept
    finetune: dict[str, Any] | None = None  # --finetune: the fine-tune's figures


@dataclass(frozen=True)
class Services:
    """What compress is handed from above instead of importing it (it reaches no device): how the latency tables
    of its deployments are found or measured (trp_edge.workflows.calibrate.deployment_tables), and how a device
    job runs on this machine (the session deploy --local opens), which times the latency check as deploy does.
    trp_edge.compress (trp_edge.api) wires both."""

    find_tables: Callable[..., tuple[str, ...]]
    run_job: Callable[[dict[str, Any], dict[str, Path]], dict[str, Any]]


def compress(cfg: CompressConfig | torch.nn.Module | str, /, *, services: Services, progress: bool = True,
             on_step=None, **options: Any) -> CompressResult | None:
    """load -> TRP training -> decomposition -> ONNX export and report, each a stage below; returns the
    CompressResult (`.model` is the compressed module, `.report` the report, `.out` the output folder).

    `cfg`: a CompressConfig, or (the Python API) a model (any nn.Module, or a name or file as on the command line)
    with keyword options named as the CLI's (`data=`, `scheme=`, `energy=`, `epochs=`, `out=`, ...). A module
    passed in is left as it was. `services`: see Services (trp_edge.compress passes them). On a torchrun job every
    rank trains and rank 0 alone goes on to write the outputs; the other ranks return None."""
    module, api = None, not isinstance(cfg, CompressConfig)
    if api:
        module = copy.deepcopy(cfg) if isinstance(cfg, torch.nn.Module) else None
        label = type(cfg).__name__.lower() if module is not None else str(cfg)
        cfg = CompressConfig.from_options(label, **options)
    elif options:
        raise InputError(f"compress(config) takes no options ({', '.join(options)}): set them in the config")
    with out_lock.released():  # the --out lock load_stage takes goes however the run ends
        return _stages(cfg, module, services, progress, on_step)


def _stages(cfg: CompressConfig, module: torch.nn.Module | None, services: Services, progress: bool,
            on_step) -> CompressResult | None:
    dist = current()  # under torchrun: this rank (trp_distributed); else one process
    run = load_stage(cfg, module=module)
    run.services = services
    with dist.main_first():  # rank 0 finds or measures the tables; the others then find them
        tables_stage(run, progress=progress and dist.is_main)
    prepare(run)
    train_stage(run, progress=progress, on_step=on_step)
    if not dist.is_main and not cfg.trp.finetune:  # rank 0 decomposes, exports and writes; the others are done
        return None
    dense_model, plans = decompose_stage(run)  # with --finetune on every rank: all of them fine-tune
    finetune_stage(run, plans, progress=progress, on_step=on_step)
    if not dist.is_main:
        return None
    finish(run)
    result = export_stage(run, dense_model, plans)
    return result


def load_stage(cfg: CompressConfig, module: torch.nn.Module | None = None) -> _Run:
    """The data, the model (checked against the data) and its example input; prepares --out. `module`: a
    model object (the Python API) in place of cfg.model."""
    from ..data import free_size, load_data
    from ..models import default_input_size, load_model

    data = load_data(cfg.data, workers=cfg.trp.workers, seed=cfg.trp.seed) if cfg.data else None
    in_ch = cfg.in_channels or (data.in_channels if data else None)
    n_cls = cfg.num_classes or (data.num_classes if data else None)
    fixed = cfg.input_size or (data.image_size if data is not None and not free_size(cfg.data) else None)
    torch.manual_seed(cfg.trp.seed)  # random init of built-in models is part of the run's identity
    loaded = load_model(module if module is not None else cfg.model, arch=cfg.arch, weights=cfg.weights,
                        trust_pickle=cfg.trust_pickle, in_channels=in_ch, num_classes=n_cls, input_size=fixed)
    if loaded.lowrank is not None:
        raise InputError(f"{cfg.model}: already a trp-edge compressed model; compress its dense source instead")
    spec = loaded.spec
    size = cfg.input_size or default_input_size(spec)
    if data is not None and free_size(cfg.data) and data.image_size != size:  # made or resized at the model's size
        data = load_data(cfg.data, workers=cfg.trp.workers, seed=cfg.trp.seed, size=size)
    if data is not None:
        if spec["in_channels"] != data.in_channels:
            raise InputError(f"{cfg.model}: takes {spec['in_channels']}-channel input but {data.name} has "
                             f"{data.in_channels} channels")
        if spec["num_classes"] != data.num_classes:
            raise InputError(f"{cfg.model}: has {spec['num_classes']} classes but {data.name} has {data.num_classes}")
        example = data.example
    else:
        example = torch.zeros(1, spec["in_channels"], size, size)
    out = _prepare_out(cfg, loaded.name)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, data, loaded.name, spec, loaded.model, example, out, dcfg=cfg.decompose)
    run.dense_macs = count_macs(run.model, example)
    layers = conv_layers(run.model, example, cfg.decompose)
    run.other_macs = run.dense_macs.total - sum(la.macs_dense for la in layers)
    unknown = sorted(set(cfg.decompose.ranks or {}) - {la.name for la in layers})
    if unknown:  # before any calibration or training is spent on the run
        raise InputError(f"explicit ranks name layers the model does not have: {unknown}")
    return run


def tables_stage(run: _Run, *, progress: bool = True) -> None:
    """The latency tables of the deployments compress chooses ranks for (found, or measured now: calibrate);
    the run's config records them and the resolved deployment."""
    from ..deployment import deployments

    cfg = run.cfg
    tables = run.services.find_tables(cfg, run.name, run.model.eval(), run.example, progress=progress)
    deps = deployments(cfg.target, cfg.runtime, cfg.precision, cfg.threads)
    dep = deps[0]
    run.cfg = replace(cfg, target=dep.target, threads=dep.threads, runtime=cfg.runtime or (dep.runtime,),
                      precision=cfg.precision or (dep.precision,),
                      decompose=replace(cfg.decompose, latency_table=tables or None))
    run.dcfg = run.cfg.decompose
    shapes = {la.name: layer_shape(la) for la in conv_layers(run.model, run.example, run.dcfg)
              if isinstance(la.module, torch.nn.Conv2d)}  # the tables, loaded once: planning and TRP take these
    run.tables = load_tables(run.dcfg.latency_table, layers=shapes, schemes=scheme_names(run.dcfg))
    if not tables and cfg.calibrate:  # with --no-calibrate the user asked for it (and the summary says so)
        log.warning("no latency table for %s: ranks are MAC-based, and a pair may be slower than its dense conv "
                    "(calibrate, or drop --no-calibrate)", ", ".join(map(str, deps)))


def train_stage(run: _Run, *, progress: bool = True, on_step=None) -> None:
    """TRP training (when the config trains); the trainer decides the final decomposition's config."""
    from ..trp import TRPTrainer, evaluate, resolve_device
    from ..trp_loop import timed_evaluate

    tcfg = run.cfg.trp
    if not tcfg.trains:
        return
    fixed = run.spec.get("fixed_batch")
    if fixed is not None and fixed != tcfg.batch:
        raise InputError(f"{run.cfg.model}: exported with a fixed batch of {fixed}, so it cannot train in batches of "
                         f"{tcfg.batch}: export it with dynamic_shapes=({{0: torch.export.Dim('batch')}},), or pass "
                         "--steps 0 to decompose without training")
    device = resolve_device(tcfg.device)
    run.initial_acc = evaluate(run.model.to(device), run.data.test, device, fixed)
    trainer = TRPTrainer(run.model, run.data, tcfg, run.dcfg, tables=run.tables,
                         checkpoint=run.out / "checkpoint.pt", other_macs=run.other_macs, progress=progress,
                         on_step=on_step, loop=loop_options(run, "trp"))
    run.train = trainer.train(resume=run.cfg.resume)
    log.info("TRP: %d steps in %.1f s (%.1f ms/step, of which SVD %.1f ms)", run.train.steps, run.train.train_seconds,
             run.train.step_ms, run.train.svd_ms_per_step)
    run.last_iterate_acc, rate = timed_evaluate(run.model, run.data.test, device, fixed)
    run.trp_kept, run.loop_stats = trainer.loop.kept, loop_stats(trainer.loop, rate)
    run.dcfg, run.energy = trainer.decompose_config()


def decompose_stage(run: _Run) -> tuple[torch.nn.Module, list[LayerPlan]]:
    """The dense model as trained (a copy) and the plans; run.model is decomposed in place."""
    run.model = run.model.cpu().eval()
    dense_model = copy.deepcopy(run.model)
    plans, energy = decompose_(run.model, run.dcfg, run.example, tables=run.tables, other_macs=run.other_macs)
    run.energy = energy if run.energy is None else run.energy  # after TRP: the energy its last TSVD used
    return dense_model, plans


def export_stage(run: _Run, dense_model: torch.nn.Module, plans: list[LayerPlan]) -> CompressResult:
    """ONNX export (validated), the latency check, the report and the weights, written to a staging folder
    that replaces the old artifacts only when everything is there."""
    from ..export import export_onnx, onnx_macs
    from ..lowrank import merge_pairs_
    from ..models import compressed_spec, save_compressed, save_models
    from ..report import plot_ranks

    model, stage = run.model, run.out / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        diffs = {"dense": export_onnx(dense_model, run.example, stage / "dense.onnx"),
                 "compressed": export_onnx(model, run.example, stage / "model.onnx")}
        onnx_count = {"dense": onnx_macs(stage / "dense.onnx"), "compressed": onnx_macs(stage / "model.onnx")}
        comp_macs = count_macs(model, run.example)
        latency = latency_check(run, stage, dense_model, model, comp_macs.total)

        def spec_of(kept: list[str]) -> dict:
            ranks = {p.name: p.rank for p in plans if p.rank is not None and p.name not in kept}
            return compressed_spec(run.spec, run.dcfg.scheme, ranks, {p.name: p.scheme for p in plans},
                                   {"energy": run.energy, "input_shape": list(run.example.shape)})

        written = save_models(stage, dense_model, model, spec_of([]), run.example)
        kept_at = precision_dense(run.tables, plans)
        if latency is not None and (checked := int8_net_check(run, stage, dense_model, model, plans, kept_at,
                                                              spec_of)):
            latency["int8"] = checked
        precisions = {}
        for key, kept in precision_models(kept_at).items():
            if kept:  # int8, or int8/ort: one runtime's model, written as model-int8-ort.onnx
                merged, suffix = copy.deepcopy(model), key.replace("/", "-")
                merge_pairs_(merged, dense_model, kept)
                diffs[f"model-{suffix}.onnx"] = export_onnx(merged, run.example, stage / f"model-{suffix}.onnx")
                macs = count_macs(merged, run.example).total
                precisions[key] = {"dense_layers": kept, "macs": macs, "mac_speedup": run.dense_macs.total / macs,
                                   "onnx": f"model-{suffix}.onnx", "model": save_compressed(
                                       stage, f"compressed-{suffix}", merged, spec_of(kept), run.example)}
        extra = [f for p in precisions.values() for f in (p["onnx"], p["model"])]
        report = _report(run, plans, comp_macs, dense_model, diffs, onnx_count, latency, precisions)
        report.write(stage / "report.json")
        plot_ranks(report, stage / "ranks.png")
        names = (*written, *OUTPUTS, *extra)
        for name in names:
            os.replace(stage / name, run.out / name)
        for pt, pt2 in PROGRAMS.items():  # the other kind, from an earlier run, would shadow what was written
            (run.out / (pt2 if pt in written else pt)).unlink(missing_ok=True)
        for old in (*run.out.glob("compressed-*.pt*"), *run.out.glob("model-*.onnx")):
            if old.name not in names:  # a precision's model from an earlier run
                old.unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote %s", ", ".join(str(run.out / n) for n in names))
    return CompressResult(run.out, report, model, names)


def _report(run: _Run, plans: list[LayerPlan], comp_macs, dense_model, diffs, onnx_count, latency,
            precisions: dict[str, Any]) -> CompressReport:
    from ..trp import evaluate

    cfg, dense_macs, model = run.cfg, run.dense_macs, run.model
    dcfg, tcfg, train = cfg.decompose, cfg.trp, run.train
    test = run.data.test if run.data is not None else None
    fixed = run.spec.get("fixed_batch")  # a program exported at a fixed batch runs at that batch only
    layers = []
    for p in plans:
        d = p.to_dict()
        # per-layer MACs as torch.utils.flop_counter counts them on the built modules
        d["macs_dense"] = dense_macs.per_module.get(p.name, p.macs_dense)
        d["macs_lowrank"] = comp_macs.per_module.get(p.name) if p.rank is not None else p.macs_lowrank
        layers.append(d)
    rel = {k: abs(onnx_count[k] - v) / max(v, 1) for k, v in (("dense", dense_macs.total),
                                                                ("compressed", comp_macs.total))}
    cpu = torch.device("cpu")
    return CompressReport(
        model=run.name, arch=run.spec, created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        torch=torch.__version__, scheme=dcfg.scheme, energy=run.energy, nuclear=tcfg.nuclear, period=tcfg.period,
        target_speedup=dcfg.target_speedup, input_shape=list(run.example.shape), data=cfg.data,
        allocate=dcfg.allocate if dcfg.target_speedup and any(p.dense_ms is not None for p in plans) else None,
        dense={"macs": dense_macs.total, "params": param_count(dense_model),
               "accuracy": evaluate(dense_model, test, cpu, fixed) if test is not None else None},
        compressed={"macs": comp_macs.total, "params": param_count(model),
                    "accuracy": None if test is None else run.finetune["accuracy_after"] if run.finetune else
                    evaluate(model, test, cpu, fixed)},  # the fine-tune's last evaluation is of this model
        initial_accuracy=run.initial_acc, mac_speedup=dense_macs.total / comp_macs.total,
        param_ratio=param_count(dense_model) / param_count(model), layers=layers,
        onnx={"max_abs_diff": max(diffs.values()), "max_abs_diff_dense": diffs["dense"],
              "max_abs_diff_compressed": diffs["compressed"], "macs_dense": onnx_count["dense"],
              "macs_compressed": onnx_count["compressed"], "macs_rel_diff": max(rel.values())},
        training=training_section(run),
        # host latency in onnxruntime (batch 1): a first look; `trp-edge deploy` measures on the device
        latency=latency, trajectory=[] if train is None else train.history, config=cfg.to_dict(),
        predictions=_predictions(run.tables, plans, precisions), precisions=precisions or None)


def _predictions(tables: tuple[LatencyTable, ...], plans: list[LayerPlan],
                 precisions: dict[str, Any]) -> list[dict[str, Any]] | None:
    """What each latency table (the run's, loaded once) predicts for the whole net, dense and compressed (as built
    at the table's precision: without the layers that precision keeps dense)."""
    from ..contracts import precision_entry
    from ..latency_table import predict

    if not tables:
        return None
    preds = []
    for table in tables:
        entry = precision_entry(precisions, table.precision, table.runtime) or {}
        kept = set(entry.get("dense_layers", []))
        preds.append(predict(table, [(p.name, p.scheme, None if p.name in kept else p.rank) for p in plans]))
    return [p for p in preds if p is not None]
