"""The training config (TRPConfig), kept out of config.py for room; config.py re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from .config_base import _check, _JSONMixin

NUCLEAR_SOLVERS = ("auto", "svd", "newton-schulz")
AMP_MODES = ("auto", "bf16", "fp16", "off")  # auto: bf16 on a CUDA device that supports it, off elsewhere
KEEP = ("last", "best")


@dataclass(frozen=True)
class TRPConfig(_JSONMixin):
    """TRP training (Xu et al., IJCAI 2020, Alg. 1): every `period` steps project each eligible conv
    onto TSVD(W, e) and take the step there; `nuclear` > 0 adds lambda * U_tru V_tru^T each step.
    period = 0 is plain SGD (the paper's baseline, decomposed directly afterwards). nuclear_solver: how
    U_tru V_tru^T is found between projections: "svd" (batched SVD), "newton-schulz" (the polar factor by
    matrix products, all shapes in one batch: for GPUs, where small SVDs are slow), "auto" (newton-schulz on
    CUDA, svd elsewhere).

    After training (and after decomposition): `finetune` epochs (a fraction: that share of one epoch's steps) of
    plain SGD on the low-rank model itself, ranks fixed. `distill`: a temperature T makes the dense input model,
    frozen, a teacher: loss = (1-a) CE +
    a T^2 KL(teacher || student) on softmax(logits / T), a = `distill_weight`. `eval_every`: held-out top-1 every
    N epochs (0: never); `keep`: "best" ships the weights of the epoch with the best held-out top-1 (needs
    eval_every). `amp`: autocast of forward and loss (SVDs and weights stay fp32); `channels_last`: NHWC memory."""

    period: int = 20
    nuclear: float = 0.0
    epochs: int | None = None
    steps: int | None = None
    lr: float = 0.01
    batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    svd_device: str = "auto"
    nuclear_solver: str = "auto"
    finetune: float = 0  # epochs; a fraction is that share of an epoch's steps
    distill: float | None = None
    distill_weight: float = 0.5
    eval_every: int = 0
    keep: str = "last"
    amp: str = "auto"
    channels_last: bool = False

    def __post_init__(self):
        _check(self.period >= 0, f"period must be >= 0 (0: plain SGD, no TSVD), got {self.period}")
        _check(self.nuclear >= 0.0, f"nuclear (lambda) must be >= 0, got {self.nuclear}")
        _check(self.epochs is None or self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _check(self.steps is None or self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.batch >= 1, f"batch must be >= 1, got {self.batch}")
        _check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0.0, f"weight decay must be >= 0, got {self.weight_decay}")
        _check(self.schedule in ("cosine", "step", "constant"),
               f"unknown schedule {self.schedule!r}: use cosine, step or constant")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"unknown device {self.device!r}: use auto, cpu or cuda")
        _check(self.svd_device in ("auto", "cpu", "same"),
               f"unknown svd device {self.svd_device!r}: use auto, cpu or same")
        _check(self.nuclear_solver in NUCLEAR_SOLVERS,
               f"unknown nuclear solver {self.nuclear_solver!r}: use {', '.join(NUCLEAR_SOLVERS)}")
        _check(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        _check(self.finetune >= 0, f"--finetune must be >= 0 epochs, got {self.finetune}")
        _check(self.distill is None or self.distill > 0, f"--distill temperature must be > 0, got {self.distill}")
        _check(0.0 <= self.distill_weight <= 1.0, f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        _check(self.eval_every >= 0, f"--eval-every must be >= 0 epochs (0: never), got {self.eval_every}")
        _check(self.keep in KEEP, f"unknown --keep {self.keep!r}: use last or best")
        _check(self.keep == "last" or self.eval_every > 0,
               "--keep best picks the epoch by its held-out accuracy: pass --eval-every N too")
        _check(self.amp in AMP_MODES, f"unknown --amp {self.amp!r}: use {', '.join(AMP_MODES)}")

    @property
    def trains(self) -> bool:
        return bool(self.steps) or (self.steps is None and bool(self.epochs))

    @property
    def needs_data(self) -> bool:
        """TRP training or a fine-tune: both read the training set."""
        return self.trains or self.finetune > 0
