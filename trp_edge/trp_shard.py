"""The TRP trainer's SVD work, one batched call per weight shape, spread over the ranks of a torchrun job
(trp_distributed.Dist.spread): the TSVD projection's factors and the nuclear term's U_tru V_tru^T. Every rank
computes its share of the shapes (a shape with many layers is cut along its batch) and receives the others', so
every rank holds the same factors and the cost falls with the rank count. In one process: every shape here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .trp_distributed import Chunk, Dist
from .trp_nuclear import polar_factors


def _matrix(g, c: Chunk | None = None) -> torch.Tensor:
    """The group's weights (layers c.lo:c.hi) in its scheme's matrix form, batched."""
    layers = g.layers if c is None else g.layers[c.lo:c.hi]
    return g.scheme.to_matrix(torch.stack([la.weight.detach() for la in layers]))


def _dims(g) -> tuple[int, int]:
    """(rows, cols) of the group's matrix form, without touching the weights."""
    return tuple(g.scheme.to_matrix(torch.empty(1, *g.shape, device="meta")).shape[-2:])


def _costs(groups: Sequence) -> list[float]:
    return [float(p * q * min(p, q)) for p, q in map(_dims, groups)]


def group_svds(dist: Dist, groups: Sequence, svd_device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """(U, S, Vh) of every group's matrices (thin SVD, on `svd_device`), identical on every rank."""
    def run(chunks: list[Chunk]):
        return [torch.linalg.svd(_matrix(groups[c.job], c).to(svd_device), full_matrices=False) for c in chunks]

    def shapes(c: Chunk):
        (p, q), n = _dims(groups[c.job]), c.hi - c.lo
        k = min(p, q)
        return (n, p, k), (n, k), (n, k, q)

    dtype = groups[0].layers[0].weight.dtype if groups else torch.float32
    return dist.spread([len(g.layers) for g in groups], _costs(groups), run, shapes, svd_device, dtype)


def group_subgradients(dist: Dist, groups: Sequence, solver: str, svd_device: torch.device,
                       device: torch.device) -> list[torch.Tensor]:
    """U_tru V_tru^T of every group's matrices (the nuclear norm's sub-gradient), identical on every rank: by SVD
    on `svd_device` (the singular vectors of the singular values above the rank tolerance), or as the polar factor
    by Newton-Schulz on `device`, this rank's shapes in one batch."""
    def run(chunks: list[Chunk]):
        if solver == "newton-schulz":
            return [(m,) for m in polar_factors([_matrix(groups[c.job], c) for c in chunks])]
        out = []
        for c in chunks:
            u, s, vh = torch.linalg.svd(_matrix(groups[c.job], c).to(svd_device), full_matrices=False)
            tol = s[:, :1] * max(u.shape[-2], vh.shape[-1]) * torch.finfo(s.dtype).eps
            out.append(((u * (s > tol).to(s.dtype)[:, None, :]) @ vh,))
        return out

    where = device if solver == "newton-schulz" else svd_device
    dtype = groups[0].layers[0].weight.dtype if groups else torch.float32
    subs = dist.spread([len(g.layers) for g in groups], _costs(groups), run,
                       lambda c: [(c.hi - c.lo, *_dims(groups[c.job]))], where, dtype)
    return [m for (m,) in subs]
