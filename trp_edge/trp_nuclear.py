"""The nuclear norm's sub-gradient U V^T without an SVD: the polar factor by Newton-Schulz, every shape in one
batch (TRPTrainer.add_nuclear_grad_ with nuclear_solver newton-schulz)."""

from __future__ import annotations

import torch
from torch import nn

NEWTON_SCHULZ_STEPS = 40


def polar_factors(mats: list[torch.Tensor], steps: int = NEWTON_SCHULZ_STEPS) -> list[torch.Tensor]:
    """U V^T of every matrix in `mats` (batches of (p, q) matrices, any shapes): the nuclear norm's sub-gradient,
    by the cubic Newton-Schulz iteration X <- 1.5 X - 0.5 X X^T X from X = M / ||M||_F, with all matrices
    zero-padded into one batch (zero rows and columns stay zero), so one call is a few dozen batched matrix
    products however many shapes there are. Each singular value s maps to g(s) in [0, 1]: 1 to float precision
    for s >= 1e-4 of the largest (40 steps), 0 for s = 0, and between for the near-zero ones that the SVD
    route's rank tolerance cuts at about 2e-5; any value in [0, 1] there is still a sub-gradient."""
    wide = [m if m.shape[-2] <= m.shape[-1] else m.mT for m in mats]
    p, q = max(m.shape[-2] for m in wide), max(m.shape[-1] for m in wide)
    x = torch.cat([nn.functional.pad(m, (0, q - m.shape[-1], 0, p - m.shape[-2])) for m in wide])
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    for _ in range(steps):
        x = torch.baddbmm(x, x @ x.mT, x, beta=1.5, alpha=-0.5)
    out, i = [], 0
    for m, w in zip(mats, wide):
        part = x[i:i + len(w), :w.shape[-2], :w.shape[-1]]
        out.append(part if w is m else part.mT)
        i += len(w)
    return out
