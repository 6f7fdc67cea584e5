"""What TRPTrainer's loop takes from here: mixed precision, the loss (with a frozen teacher: distillation), the
forward+backward timing, and at every epoch's end the held-out evaluation, the best epoch kept and the metrics line.

"Best" under TRP: between projections the weights are not low-rank, so an epoch is scored as it would ship: its
weights truncated at the ranks of the last TSVD (finalize_'s truncation). Those truncated weights, with the TRP
state that produced them (history, energy, forms), are what --keep best restores; finalize_ then truncates them at
the same ranks again, which changes nothing. Under plain SGD (period 0, and the fine-tune) an epoch's weights are
scored and kept as they are."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import get_scheme

if TYPE_CHECKING:
    from .trp import TRPTrainer
    from .trp_metrics import MetricsLog

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoopOptions:
    """What the workflow hands the loop beside the configs."""

    teacher: nn.Module | None = None  # the frozen dense model (distillation with tcfg.distill)
    metrics: MetricsLog | None = None  # one line per epoch
    phase: str = "trp"  # trp | finetune: the metrics line's phase
    fixed_batch: int | None = None  # evaluation batch of a program exported at a fixed batch
    dense_macs: int | None = None  # the dense model's MACs: the MAC speedup at the current ranks
    shape: tuple[int, float] | None = None  # (total rank, MAC speedup) where ranks do not change (the fine-tune)


@torch.no_grad()
def evaluate(model: nn.Module, split, device: torch.device, fixed_batch: int | None = None) -> float:
    """Top-1 accuracy in percent; in batches of `fixed_batch` for a program exported at that batch only (loading
    takes batch 1 only, so no batch is partial), of 500 otherwise."""
    was = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in split.batches(fixed_batch or 500):
            out = model(x.to(device, non_blocking=True))
            correct += int((out.argmax(1).cpu() == y).sum())
            total += len(y)
    finally:
        model.train(was)
    return 100.0 * correct / max(total, 1)


def timed_evaluate(model: nn.Module, split, device: torch.device, fixed_batch: int | None = None
                   ) -> tuple[float, float]:
    """Top-1 (evaluate) and the images per second it ran at."""
    t0 = time.perf_counter()
    acc = evaluate(model, split, device, fixed_batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return acc, len(split) / max(time.perf_counter() - t0, 1e-9)


def resolve_amp(mode: str, device: torch.device) -> str:
    """auto: bf16 on a CUDA device that supports it, off elsewhere."""
    if mode != "auto":
        return mode
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                 weight: float) -> torch.Tensor:
    """(1 - a) CE(student, y) + a T^2 KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015; T^2
    keeps the soft term's gradient on the scale of the hard one's), in fp32."""
    s, t = student.float(), teacher.float()
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                  reduction="batchmean")
    return (1.0 - weight) * ce + weight * temperature ** 2 * kl


class Loop:
    """The loop's parts for one trainer (trainer.loop)."""

    def __init__(self, trainer: TRPTrainer, options: LoopOptions | None = None):
        self.tr, self.opts = trainer, options or LoopOptions()
        cfg, device = trainer.tcfg, trainer.device
        self.amp = resolve_amp(cfg.amp, device)
        self.dtype = DTYPES.get(self.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        self.memory = torch.channels_last if cfg.channels_last else torch.preserve_format
        teacher = self.opts.teacher if cfg.distill is not None else None
        self.teacher = None if teacher is None else teacher.to(device).eval().requires_grad_(False)
        if cfg.channels_last:
            for m in (trainer.model, self.teacher):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        self.best: dict[str, Any] | None = None
        self.kept: dict[str, Any] | None = None  # the epoch --keep best restored
        self.fwd_bwd_seconds = 0.0
        self.eval_images_per_s: float | None = None
        self.images_per_s: float | None = None
        self._mark = (time.perf_counter(), 0, 0.0, 0.0, 0.0)

    # ---- one step ----
    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.tr.device
        return x.to(dev, non_blocking=True, memory_format=self.memory), y.to(dev, non_blocking=True)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (and the teacher's) under autocast, the loss in fp32, backward; with fp16 the gradients are
        unscaled again at once, so what is added to them next (the nuclear term) adds to the true ones."""
        tr, cfg = self.tr, self.tr.tcfg
        t0 = time.perf_counter()
        with torch.autocast(tr.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            out = tr.forward_model(x)  # DDP on a torchrun job, else the model
            if self.teacher is not None:
                with torch.no_grad():
                    soft = self.teacher(x)
        if self.teacher is not None:
            loss = distill_loss(out, soft, y, cfg.distill, cfg.distill_weight)
        else:
            loss = F.cross_entropy(out.float(), y)
        tr.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(tr.opt)  # a no-op unless fp16
        tr._sync()
        self.fwd_bwd_seconds += time.perf_counter() - t0
        return out, loss

    def opt_step(self) -> None:
        self.scaler.step(self.tr.opt)  # skipped by the scaler where an fp16 gradient overflowed
        self.scaler.update()

    # ---- an epoch's end ----
    def start(self) -> None:
        tr = self.tr
        self._mark = (time.perf_counter(), tr.step, tr._svd_seconds, self.fwd_bwd_seconds, tr.dist.comm_seconds)

    def epoch_end(self, epoch: int, loss: float, acc: float | None) -> None:
        """`epoch` counts from 1. Evaluates every eval_every epochs and after the last one, keeps the best, writes
        the metrics line; the time spent here is not the next epoch's."""
        tr, cfg = self.tr, self.tr.tcfg
        t0, step0, svd0, fb0, comm0 = self._mark
        comm = tr.dist.comm_seconds - comm0  # the sharded SVDs' broadcasts: part of the SVD time, split out
        seconds, steps = time.perf_counter() - t0, max(tr.step - step0, 1)
        self.images_per_s = steps * cfg.batch / max(seconds, 1e-9)
        held = None
        if cfg.eval_every and (epoch % cfg.eval_every == 0 or tr.step >= tr.total_steps):
            held = self._held_out(epoch)
        rank, speedup = self.shape()
        row = {"phase": self.opts.phase, "epoch": epoch, "step": tr.step, "loss": loss, "train_accuracy": acc,
               "test_accuracy": held, "total_rank": rank, "mac_speedup": speedup,
               "lr": tr.opt.param_groups[0]["lr"], "images_per_s": self.images_per_s,
               "forward_backward_ms": 1000 * (self.fwd_bwd_seconds - fb0) / steps,
               "svd_ms": 1000 * (tr._svd_seconds - svd0 - comm) / steps, "comm_ms": 1000 * comm / steps}
        if self.opts.metrics is not None:
            self.opts.metrics.write(row)
        if held is not None:
            log.info("%s epoch %d: held-out top-1 %.2f%%", self.opts.phase, epoch, held)
        self.start()

    def shape(self) -> tuple[int | None, float | None]:
        """Total rank and MAC speedup at the current ranks (the last TSVD's; a per-layer sum: cheap)."""
        if self.opts.shape is not None:
            return self.opts.shape
        tr = self.tr
        if not tr.history:
            return None, (1.0 if self.opts.dense_macs else None)
        ranks = tr.history[-1]["ranks"]
        saved = 0
        for la in tr.layers:
            k = ranks.get(la.name)
            if k is not None:
                pair = get_scheme(tr.layer_scheme[la.name]).pair_macs(la.module, la.in_hw, la.out_hw, k)
                saved += max(la.macs_dense - pair, 0)
        dense = self.opts.dense_macs
        return sum(ranks.values()), (dense / max(dense - saved, 1) if dense else None)

    def evaluate(self) -> float:
        tr = self.tr
        acc, self.eval_images_per_s = timed_evaluate(tr.model, tr.data.test, tr.device, self.opts.fixed_batch)
        return acc

    @torch.no_grad()
    def _held_out(self, epoch: int) -> float:
        """Held-out top-1 of the weights as they would ship (see the module's text); keeps the best."""
        tr = self.tr
        saved = None
        if tr.tcfg.period > 0 and tr.history:
            saved, svd = copy.deepcopy(tr.model.state_dict()), tr._svd_seconds
            tr.project_(fixed=tr.history[-1]["ranks"])
            tr._svd_seconds = svd
        acc = self.evaluate()
        if tr.tcfg.keep == "best" and (self.best is None or acc > self.best["accuracy"]):
            self.best = {"epoch": epoch, "accuracy": acc, "model": copy.deepcopy(tr.model.state_dict()),
                         "history": copy.deepcopy(tr.history), "energy": tr.energy,
                         "layer_scheme": dict(tr.layer_scheme)}
        if saved is not None:
            tr.model.load_state_dict(saved)
        return acc

    def finish(self) -> dict[str, Any] | None:
        """With --keep best: the best epoch's weights (and the TRP state they were truncated at) back in the
        model; returns {epoch, accuracy} of the epoch kept."""
        b, tr = self.best, self.tr
        if b is None:
            return None
        tr.model.load_state_dict(b["model"])
        tr.history, tr.energy = copy.deepcopy(b["history"]), b["energy"]
        tr.layer_scheme.update(b["layer_scheme"])
        tr.groups = tr._active()
        log.info("--keep best: %s epoch %d (held-out top-1 %.2f%%)", self.opts.phase, b["epoch"], b["accuracy"])
        self.kept = {"epoch": b["epoch"], "accuracy": b["accuracy"]}
        return self.kept

    # ---- in the checkpoint ----
    def state(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state(self, st: dict[str, Any]) -> None:
        self.best = st.get("best")
