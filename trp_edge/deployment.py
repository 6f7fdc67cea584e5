"""Where a model runs: a Deployment (target, runtime, precision, threads) is the key of a latency table, of a
compress plan and of a deploy report. The deployments compress plans for are resolved here, and a thread count is
resolved in one place (targets.resolve_threads: the option, else the target's)."""

from __future__ import annotations

from dataclasses import dataclass

from .backends import capabilities
from .config import names
from .targets import load_target, resolve_threads


@dataclass(frozen=True)
class Deployment:
    """Where a model will run: the key of its latency table."""

    target: str
    runtime: str
    precision: str
    threads: int

    def __str__(self) -> str:
        return f"{self.target}/{self.runtime} {self.precision}, {self.threads} thread(s)"


def deployments(target: str | None, runtimes: tuple[str, ...] | str | None, precisions: tuple[str, ...] | str | None,
                threads: int | None) -> list[Deployment]:
    """Every deployment a model is compressed for: target x runtimes x precisions (default host, ort, fp32) at
    `threads` resolved against the target, a precision only where its runtime is built at it."""
    t = load_target(target or "host")
    n = resolve_threads(threads, t)
    return [Deployment(t.name, rt, prec, n) for rt in names(runtimes) or ("ort",)
            for prec in names(precisions) or ("fp32",) if capabilities(rt).built_at(prec)]
