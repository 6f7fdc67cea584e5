"""compress's training side beyond TRP itself: the teacher (--distill), the metrics log, the fine-tune of the
decomposed model (--finetune: a stage between decomposition and export) and the report's `training` section."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..flops import count_macs
from ..trp_distributed import current
from ..trp_loop import LoopOptions
from ..trp_metrics import MetricsLog, plot_training

if TYPE_CHECKING:
    from ..planning import LayerPlan
    from .compress import _Run

log = logging.getLogger(__name__)

FINETUNE_CHECKPOINT = "finetune.pt"  # beside TRP's checkpoint.pt


def prepare(run: _Run) -> None:
    """Before training: the teacher (the dense model as loaded, frozen) and the metrics log (a fresh one unless
    --resume goes on)."""
    tcfg = run.cfg.trp
    run.teacher = copy.deepcopy(run.model).eval().requires_grad_(False) if tcfg.distill is not None else None
    if not tcfg.needs_data:
        return
    run.metrics = MetricsLog(run.out / "metrics.jsonl", fresh=not run.cfg.resume, tensorboard=run.out / "tb",
                             enabled=current().is_main)  # one writer on a torchrun job: rank 0


def loop_options(run: _Run, phase: str, shape: tuple[int, float] | None = None) -> LoopOptions:
    return LoopOptions(teacher=run.teacher, metrics=run.metrics, phase=phase, fixed_batch=run.spec.get("fixed_batch"),
                       dense_macs=run.dense_macs.total, shape=shape)


def finetune_stage(run: _Run, plans: list[LayerPlan], *, progress: bool = True, on_step=None) -> None:
    """--finetune N: N epochs of plain SGD on the decomposed model, pairs as layers, ranks fixed (period 0 and no
    nuclear term: nothing projects), with the run's lr, schedule (a fresh cosine), momentum, decay, batch, amp and
    teacher. Its checkpoint is finetune.pt; --resume goes on from it when it is newer than TRP's."""
    from ..trp import TRPTrainer, evaluate, resolve_device
    from ..trp_loop import timed_evaluate

    tcfg = run.cfg.trp
    if tcfg.finetune == 0:
        return
    whole = float(tcfg.finetune).is_integer()  # a fraction of an epoch runs as that share of its steps
    steps = None if whole else max(1, round(tcfg.finetune * run.data.train.num_batches(tcfg.batch, drop_last=True)))
    cfg = replace(tcfg, period=0, nuclear=0.0, epochs=int(tcfg.finetune) if whole else None, steps=steps)
    ckpt, trp_ckpt = run.out / FINETUNE_CHECKPOINT, run.out / "checkpoint.pt"
    resume = run.cfg.resume and ckpt.exists() and (not trp_ckpt.exists()
                                                   or ckpt.stat().st_mtime >= trp_ckpt.stat().st_mtime)
    if run.cfg.resume and ckpt.exists() and not resume:
        log.info("%s is older than %s (TRP went on since): the fine-tune starts again", ckpt, trp_ckpt)
    macs = count_macs(run.model, run.example).total
    rank = sum(p.rank for p in plans if p.rank is not None)
    device = resolve_device(cfg.device)
    fixed = run.spec.get("fixed_batch")
    before = evaluate(run.model.to(device), run.data.test, device, fixed)
    trainer = TRPTrainer(run.model, run.data, cfg, run.dcfg, tables=run.tables, checkpoint=ckpt,
                         other_macs=run.other_macs, progress=progress, on_step=on_step,
                         loop=loop_options(run, "finetune", (rank, run.dense_macs.total / macs)))
    res = trainer.train(resume=resume)
    after, rate = timed_evaluate(run.model, run.data.test, device, fixed)
    run.model = run.model.cpu().eval()
    run.loop_stats = run.loop_stats or loop_stats(trainer.loop, rate)
    run.finetune = {"epochs": tcfg.finetune, "steps": res.steps, "seconds": res.train_seconds,
                    "step_ms": res.step_ms, "accuracy_before": before, "accuracy_after": after,
                    "images_per_s": trainer.loop.images_per_s, "keep": trainer.loop.kept}
    log.info("fine-tune: %d steps in %.1f s, held-out top-1 %.2f%% -> %.2f%%", res.steps, res.train_seconds,
             before, after)


def finish(run: _Run) -> None:
    """After training: training.png from the metrics (beside ranks.png)."""
    if run.metrics is None:
        return
    run.metrics.close()
    if run.metrics.enabled:
        plot_training(run.metrics.rows(), run.out / "training.png")


def training_section(run: _Run) -> dict[str, Any] | None:
    """report.json's `training`: TRP's figures (when it trained), the fine-tune's, distillation, precision."""
    tcfg, train = run.cfg.trp, run.train
    if train is None and run.finetune is None:
        return None
    out: dict[str, Any] = {}
    if train is not None:
        out = {"steps": train.steps, "epochs": train.epochs_done, "seconds": train.train_seconds,
               "step_ms": train.step_ms, "svd_ms_per_step": train.svd_ms_per_step,
               "train_accuracy_last_epoch": train.train_accuracy,
               # accuracy of the last SGD iterate, before TRP's final TSVD (dense.accuracy is after it)
               "last_iterate_accuracy": run.last_iterate_acc, "keep": run.trp_kept}
    loop = run.loop_stats or {}
    return {**out, "device": str(tcfg.device), "amp": loop.get("amp"), "channels_last": tcfg.channels_last,
            "images_per_s": loop.get("images_per_s"), "eval_images_per_s": loop.get("eval_images_per_s"),
            "distill": None if tcfg.distill is None else {"temperature": tcfg.distill, "weight": tcfg.distill_weight},
            "finetune": run.finetune}


def loop_stats(loop, eval_images_per_s: float | None = None) -> dict[str, Any]:
    """What a trainer's loop measured, for the report: precision, training images/s (the last epoch's) and
    evaluation images/s (the loop's last evaluation, else `eval_images_per_s`)."""
    return {"amp": loop.amp, "images_per_s": loop.images_per_s,
            "eval_images_per_s": loop.eval_images_per_s or eval_images_per_s}

