"""The TRP trainer (Xu et al., IJCAI 2020, Algorithm 1).

Every `period` steps each eligible conv weight is projected onto TSVD(W, e) in the scheme's matrix
form and the SGD step is taken at the projected weights; the other steps are plain SGD. With a
nuclear-norm weight lambda > 0, lambda * U_tru V_tru^T (the sub-gradient of the nuclear norm, from the
singular vectors of the non-zero singular values) is added to each eligible layer's gradient at
every step. The SVDs run batched, one call per distinct weight shape.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .config import DecomposeConfig, TRPConfig
from .contracts import CHECKPOINT
from .data import Dataset
from .errors import InputError, Interrupted
from .lowrank import ConvLayer, Scheme, conv_layers, get_scheme, scheme_names
from .planning import SchemeView, plan_for_speedup, plan_model, rank_model
from .planning_latency import LatencyModel
from .trp_distributed import current
from .trp_loop import Loop, LoopOptions, evaluate  # noqa: F401  (evaluate: re-exported)
from .trp_shard import group_subgradients, group_svds

log = logging.getLogger(__name__)

# options that may differ between a run and its --resume (the fine-tune has its own checkpoint and epochs)
RESUME_FREE = {("trp", "workers"), ("trp", "eval_every"), ("trp", "finetune")}


def resolve_device(name: str) -> torch.device:
    """The training device; under torchrun on CUDA, this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        return current().device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return current().device(torch.device(name))


@dataclass
class _Group:
    """Eligible layers whose weights share one shape, in one matrix form: their SVDs run as one batched call."""

    layers: list[ConvLayer]
    shape: tuple[int, ...]
    scheme: Scheme


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    train_seconds: float
    step_ms: float
    svd_ms_per_step: float
    history: list[dict] = field(default_factory=list)  # one entry per TSVD projection
    energy: float = 0.0
    train_accuracy: float | None = None


class TRPTrainer:
    def __init__(self, model: nn.Module, data: Dataset, tcfg: TRPConfig, dcfg: DecomposeConfig, *,
                 tables: Sequence[LatencyModel] = (), checkpoint: Path | None = None, other_macs: int = 0,
                 progress: bool = True, on_step: Callable[[TRPTrainer], None] | None = None,
                 loop: LoopOptions | None = None):
        self.tcfg, self.dcfg, self.data = tcfg, dcfg, data
        self.dist = current()  # one process, or this rank of a torchrun job (trp_distributed)
        self.dist.check_batch(tcfg.batch)
        self.device = resolve_device(tcfg.device)
        self.model = model.to(self.device)
        self.forward_model = self.dist.wrap(self.model, self.device)  # DDP on 2+ ranks; the model's own params
        example = data.example.to(self.device)
        self.layers = [la for la in conv_layers(self.model, example, dcfg) if la.reason is None]
        # with latency tables (loaded: planning.rank_model) every TSVD keeps the fastest measured rank at or above the
        # energy rank
        self.table = rank_model(dcfg, tables)
        # each eligible layer in every matrix form that can take it (one form unless the scheme is 'auto')
        self.schemes = scheme_names(dcfg)
        self.reasons = {n: {la.name: get_scheme(n).ineligible(la.module) for la in self.layers} for n in self.schemes}
        groups: dict[tuple, list[ConvLayer]] = {}
        for n in self.schemes:
            for la in self.layers:
                if self.reasons[n][la.name] is None:
                    groups.setdefault((n, tuple(la.weight.shape)), []).append(la)
        self.all_groups = [_Group(v, shape, get_scheme(n)) for (n, shape), v in groups.items()]
        fixed = dcfg.layer_schemes or {}
        # the form each layer is truncated in; with 'auto' every TSVD chooses it again
        self.layer_scheme = {la.name: fixed.get(la.name) or next(n for n in self.schemes if self.reasons[n][la.name]
                                                                  is None) for la in self.layers}
        self.groups = self._active()
        self.svd_device = self.device if tcfg.svd_device in ("auto", "same") else torch.device("cpu")
        self.nuclear_solver = tcfg.nuclear_solver if tcfg.nuclear_solver != "auto" else (
            "newton-schulz" if self.device.type == "cuda" else "svd")
        self.checkpoint, self.other_macs = checkpoint, other_macs
        self.progress, self.on_step = progress and self.dist.is_main, on_step
        self.steps_per_epoch = data.train.num_batches(tcfg.batch, drop_last=True)
        if self.steps_per_epoch == 0:
            raise InputError(f"the training set ({len(data.train)} images) is smaller than one batch ({tcfg.batch})")
        self.total_steps = tcfg.steps if tcfg.steps is not None else (tcfg.epochs or 0) * self.steps_per_epoch
        self.opt = torch.optim.SGD(self.model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum,
                                   weight_decay=tcfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.step = 0
        self.energy = dcfg.energy
        self.history: list[dict] = []
        self.stop_requested = False
        self._svd_seconds = 0.0
        self.loop = Loop(self, loop)  # mixed precision, the loss, per-epoch evaluation and metrics (trp_loop)

    # ---- schedule ----
    def _lr_factor(self, t: int) -> float:
        T = max(self.total_steps, 1)
        if self.tcfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, T) / T))
        if self.tcfg.schedule == "step":
            return 0.1 ** sum(t >= int(T * f) for f in (0.5, 0.75))
        return 1.0

    # ---- the two TRP operations ----
    def _active(self) -> list[_Group]:
        """The groups of layers in the form they are currently truncated in."""
        out = []
        for g in self.all_groups:
            mine = [la for la in g.layers if self.layer_scheme[la.name] == g.scheme.name]
            if mine:
                out.append(_Group(mine, g.shape, g.scheme))
        return out

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def project_(self, fixed: dict[str, int] | None = None) -> dict[str, int]:
        """W <- TSVD(W, e) for every eligible conv (or the rank-k truncation at `fixed` ranks); returns
        the rank kept per layer. The ranks come from plan_model, so an explicit rank, the latency table's
        rounding, and with scheme 'auto' the choice of form, act at every TSVD as they will at the final
        decomposition (the guard acts only there). Also caches the truncated singular vectors for the
        nuclear-norm term."""
        t0 = time.perf_counter()
        choose = fixed is None and len(self.schemes) > 1
        groups = self.all_groups if choose else self.groups
        svds = group_svds(self.dist, groups, self.svd_device)  # on a torchrun job: each rank some shapes
        if fixed is not None:
            ranks = dict(fixed)
        else:
            views = {n: SchemeView([ConvLayer(la.name, la.module, la.in_hw, la.out_hw, self.reasons[n][la.name])
                                    for la in self.layers], {}) for n in self.schemes}
            for g, (_, s, _) in zip(groups, svds):
                for i, la in enumerate(g.layers):
                    views[g.scheme.name].svals[la.name] = s[i].cpu()
            shipped = []
            if self.dcfg.target_speedup is not None:  # the budget picks e on the current spectrum, for the plan
                # that ships: with a table, rounded, guarded and allocated as the final decomposition will be
                self.energy, shipped = plan_for_speedup(views, self.dcfg, self.other_macs, self.table)
            ranks = {}
            # no guard while training: TRP truncates every eligible layer, at the energy rank where no pair at or
            # above it beats the dense conv (a layer left whole, or rounded up to a slow rank, would never see its
            # rank fall to where its pair gets faster); the final decomposition keeps the slower ones dense
            for p in plan_model(views, self.dcfg, self.energy, self.table, guard=False):
                # a pair that saves no MACs is truncated all the same at its planned rank
                ranks[p.name] = p.rank if p.rank is not None else p.planned_rank
                self.layer_scheme[p.name] = p.scheme
            for p in shipped:  # the pairs that ship train at their rank (a latency allocation may move it)
                if p.rank is not None:
                    ranks[p.name], self.layer_scheme[p.name] = p.rank, p.scheme
        parts: dict[str, tuple] = {}
        kept: dict[str, int] = {}
        for g, (u, s, vh) in zip(groups, svds):
            k = torch.tensor([min(ranks[la.name], s.shape[-1]) for la in g.layers], device=s.device)
            keep = (torch.arange(s.shape[-1], device=s.device)[None, :] < k[:, None]).to(s.dtype)
            m = (u * (s * keep)[:, None, :]) @ vh
            w = g.scheme.from_matrix(m, g.shape).to(self.device)
            for i, la in enumerate(g.layers):
                if self.layer_scheme[la.name] == g.scheme.name:
                    la.weight.copy_(w[i])
                    parts[la.name] = (u[i], keep[i], vh[i])
                    kept[la.name] = int(k[i])
        self.groups = self._active()
        self._cached = [tuple(torch.stack([parts[la.name][j] for la in g.layers]) for j in range(3))
                        for g in self.groups]
        self._sync()
        self._svd_seconds += time.perf_counter() - t0
        self.dist.after_projection(self.step, self.model.parameters())
        return {la.name: kept[la.name] for la in self.layers}

    def _record(self, ranks: dict[str, int], **extra) -> None:
        entry = {"step": self.step, "energy": self.energy, "ranks": ranks, **extra}
        if len(self.schemes) > 1:
            entry["schemes"] = dict(self.layer_scheme)
        self.history.append(entry)

    @torch.no_grad()
    def add_nuclear_grad_(self, cached: bool) -> None:
        """grad += lambda * U_tru V_tru^T in each eligible layer's matrix form: at a projection step from the
        TSVD's own factors, otherwise from the current weights (by SVD, or as their polar factor by
        Newton-Schulz, all shapes in one batch)."""
        t0 = time.perf_counter()
        if cached:
            subs = [(u * keep[:, None, :]) @ vh for u, keep, vh in self._cached]
        else:
            subs = group_subgradients(self.dist, self.groups, self.nuclear_solver, self.svd_device, self.device)
        for g, m in zip(self.groups, subs):
            sub = g.scheme.from_matrix(m, g.shape).to(self.device)
            for i, la in enumerate(g.layers):
                grad = la.module.weight.grad
                if grad is not None:
                    grad.view(la.weight.shape).add_(sub[i], alpha=self.tcfg.nuclear)
        self._sync()
        self._svd_seconds += time.perf_counter() - t0

    # ---- checkpoints ----
    def _state(self, epoch: int, batch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "epoch": epoch, "batch": batch,
                "energy": self.energy, "history": self.history, "layer_scheme": self.layer_scheme,
                "config": {"trp": self.tcfg.to_dict(), "decompose": self.dcfg.to_dict()}, **self.loop.state()}

    def _identity(self, config: dict | None = None) -> dict:
        """The settings a checkpoint must share to be resumed: every TRP and decomposition option except those
        that do not change the numbers (RESUME_FREE: data loader workers)."""
        config = {"trp": self.tcfg.to_dict(), "decompose": self.dcfg.to_dict()} if config is None else config
        defaults = {"trp": TRPConfig().to_dict(), "decompose": DecomposeConfig().to_dict()}  # options added later
        return {sec: {k: v for k, v in {**defaults[sec], **(config.get(sec) or {})}.items()
                      if (sec, k) not in RESUME_FREE} for sec in ("trp", "decompose")}

    def save_checkpoint(self, epoch: int, batch: int) -> None:
        if self.checkpoint is None or not self.dist.is_main:  # one writer; the state is the same on every rank
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(CHECKPOINT.stamp(self._state(epoch, batch)), tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> tuple[int, int]:
        path = self.checkpoint
        if path is None or not path.exists():
            raise InputError(f"--resume: no checkpoint at {path}")
        try:
            st = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:160]})") from e
        CHECKPOINT.check(st, str(path))  # a newer trp-edge's checkpoint is refused; one from before 0.2 is version 0
        mine, theirs = self._identity(), self._identity(st.get("config", {}))
        if theirs != mine:
            diff = sorted(f"{sec}.{k}" for sec in mine for k in mine[sec] if theirs.get(sec, {}).get(k) != mine[sec][k])
            raise InputError(f"{path}: the checkpoint was made with other settings ({', '.join(diff)}); "
                             "resume with the same options or start again with --force")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.step, self.energy, self.history = st["step"], st["energy"], st["history"]
        self.layer_scheme.update(st.get("layer_scheme", {}))
        self.groups = self._active()
        self.loop.load_state(st)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, st["epoch"], st["batch"])
        return st["epoch"], st["batch"]

    # ---- the loop ----
    def train(self, resume: bool = False) -> TrainResult:
        epoch, start = self.load_checkpoint() if resume else (0, 0)
        self.model.train()
        try:
            prev = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C handling stays as it is
            prev = None
        t_start = time.perf_counter()
        steps_at_start = self.step
        acc = None
        self.loop.start()
        try:
            while self.step < self.total_steps:
                acc, loss = self._epoch(epoch, start)
                epoch, start = epoch + 1, 0
                if self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps:  # an epoch's end
                    self.loop.epoch_end(epoch, loss, acc)
                    self.save_checkpoint(epoch, 0)
                    rank, speedup = self.loop.shape()  # the fine-tune's fixed ranks too
                    log.info("epoch %d: loss %.4f, train acc %.2f%%, total rank %s (%.2fx fewer MACs)", epoch, loss,
                             acc or 0.0, rank or 0, speedup or 1.0)
        finally:
            if prev is not None:
                signal.signal(signal.SIGINT, prev)
        self._sync()
        seconds = time.perf_counter() - t_start
        self.loop.finish()  # --keep best: that epoch's weights back
        done = max(self.step - steps_at_start, 1)
        return TrainResult(self.step, self.step / self.steps_per_epoch, seconds, 1000 * seconds / done,
                           1000 * self._svd_seconds / done, self.history, self.energy, acc)

    def _epoch(self, epoch: int, start: int) -> tuple[float | None, float]:
        """One epoch (or what is left of it, from batch `start`); returns its training accuracy and last loss."""
        from tqdm.auto import tqdm

        cfg = self.tcfg
        n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        bar = tqdm(total=min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch),
                   initial=start, desc=f"epoch {epoch + 1}/{n_epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        correct = seen = 0
        loss = None
        for b, (x, y) in enumerate(self.data.train.batches(cfg.batch, epoch=epoch, seed=cfg.seed, shuffle=True,
                                                           start=start, part=self.dist.part), start=start):
            if self.stop_requested:
                self.save_checkpoint(epoch, b)
                raise Interrupted(f"interrupted at step {self.step}; checkpoint saved to {self.checkpoint}: "
                                  "run the same command with --resume to go on")
            out, loss, y = self._step(x, y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct / seen:.1f}", rank=self._total_rank(),
                            refresh=False)
            if self.on_step is not None:
                self.on_step(self)
            if self.step >= self.total_steps:
                break
        bar.close()
        return (100 * correct / seen if seen else None), (loss.item() if loss is not None else float("nan"))

    def _step(self, x: torch.Tensor, y: torch.Tensor):
        """One SGD step; every `period` steps at the TSVD-projected weights. Returns (logits, loss, labels)."""
        x, y = self.loop.inputs(x, y)
        projected = self.tcfg.period > 0 and self.step % self.tcfg.period == 0
        if projected:
            self._record(self.project_())
        out, loss = self.loop.forward_backward(x, y)  # under autocast with --amp; the loss distills with a teacher
        if self.tcfg.nuclear > 0:
            self.add_nuclear_grad_(cached=projected)
        self.loop.opt_step()
        self.sched.step()
        self.step += 1
        return out, loss, y

    def _total_rank(self) -> int:
        return sum(self.history[-1]["ranks"].values()) if self.history else 0

    def finalize_(self) -> dict[str, int] | None:
        """End TRP on low-rank weights: truncate each layer to the rank its last TSVD(W, e) chose (the
        last iterate is that projection plus fewer than m SGD steps, so little is cut). Returns the
        ranks, at which the decomposition reproduces the model exactly; None for plain SGD."""
        if self.tcfg.period == 0:
            return None
        ranks = self.project_(fixed=self.history[-1]["ranks"] if self.history else None)
        self._record(ranks, final=True)
        return ranks

    def decompose_config(self) -> tuple[DecomposeConfig, float | None]:
        """End training: finalize_, then the config the final decomposition uses and the energy it used. After
        TRP that is the ranks of the last TSVD(W, e) (explicit ranks still win) and, with scheme 'auto', the
        forms it chose, at which the decomposition reproduces the trained model exactly; after plain SGD the
        config as given (None: the energy comes from the decomposition)."""
        ranks = self.finalize_()
        if ranks is None:
            return self.dcfg, None
        auto = self.dcfg.scheme == "auto"
        return replace(self.dcfg, ranks={**ranks, **(self.dcfg.ranks or {})}, target_speedup=None,
                       layer_schemes=dict(self.layer_scheme) if auto else None), self.energy

    def _on_sigint(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        log.warning("Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to quit at once)")
        self.stop_requested = True

