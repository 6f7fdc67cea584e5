"""Ranks allocated across layers for latency: one choice per layer (dense, or a measured pair), all layers
together, with the lowest summed latency at a MAC budget and an energy budget.

One energy e for every layer (the paper's rule) keeps the same share of each layer's singular-value energy,
whatever its pairs cost on the device. At the same MACs and the same energy dropped in all (summed over
layers, each layer's dropped share of its own energy), a layer whose pairs are fast per MAC saved can give
up more and one whose pairs are slow less. This is a multiple-choice knapsack: dynamic programming over MAC
bins, with a Lagrange multiplier on the dropped energy found by bisection. Pure numbers (numpy): the
choices come from planning.allocate_plans."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BINS = 4000  # MAC resolution: the budget in this many steps (each choice's MACs rounded up)
BISECTIONS = 24


@dataclass(frozen=True)
class Choice:
    macs: int
    ms: float  # the latency table's time of this choice
    dropped: float  # the share of the layer's singular-value energy it drops (0 for dense)


def knapsack(options: list[list[Choice]], budget: float, lam: float, floor: float = 0.0) -> list[int] | None:
    """Per layer the index of its choice minimizing sum(ms) + lam * sum(dropped) with floor <= sum(MACs) <=
    budget (MACs rounded up to budget / BINS, so the result never exceeds the budget); None when nothing fits."""
    if budget <= 0:
        return None
    q = budget / BINS
    best = np.full(BINS + 1, np.inf)
    best[0] = 0.0
    picks = []
    for opts in options:
        bins = [math.ceil(c.macs / q - 1e-9) for c in opts]
        cand = np.full((len(opts), BINS + 1), np.inf)
        for j, (b, c) in enumerate(zip(bins, opts)):
            if b <= BINS:
                cand[j, b:] = best[:BINS + 1 - b] + c.ms + lam * c.dropped
        pick = cand.argmin(axis=0)
        best = cand[pick, np.arange(BINS + 1)]
        picks.append((pick, bins))
    low = min(math.ceil(floor / q - 1e-9), BINS)
    b = low + int(best[low:].argmin())
    if not np.isfinite(best[b]):
        return None
    chosen = []
    for pick, bins in reversed(picks):
        j = int(pick[b])
        chosen.append(j)
        b -= bins[j]
    return chosen[::-1]


def allocate(options: list[list[Choice]], budget: float, dropped: float, floor: float = 0.0) -> list[int] | None:
    """The fastest choice found with floor <= sum(MACs) <= budget and sum(dropped) <= `dropped`: the knapsack at
    the smallest multiplier whose choice drops no more than that (bisection; a larger multiplier drops less).
    None when no choice fits both budgets."""

    def drops(chosen: list[int]) -> float:
        return sum(options[i][j].dropped for i, j in enumerate(chosen))

    chosen = knapsack(options, budget, 0.0, floor)
    if chosen is None or drops(chosen) <= dropped:
        return chosen
    lo, hi = 0.0, 1.0
    fit = knapsack(options, budget, hi, floor)
    while fit is not None and drops(fit) > dropped and hi < 1e9:
        lo, hi = hi, hi * 8
        fit = knapsack(options, budget, hi, floor)
    if fit is None or drops(fit) > dropped:
        return None
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        chosen = knapsack(options, budget, mid, floor)
        if chosen is not None and drops(chosen) <= dropped:
            hi, fit = mid, chosen
        else:
            lo = mid
    return fit
