"""Training on several processes, as torchrun starts them: `torchrun --nproc-per-node N -m trp_edge compress ...`.

`launched()` sees torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), starts the process group (NCCL on CUDA,
gloo on CPU) and ends it; `current()` is the `Dist` the trainer asks: rank, world size, which rank writes, and
`spread`, which runs a list of batched jobs (the TSVD's per-shape SVDs, the nuclear term's polar factors) one
share per rank and broadcasts every result, so every rank ends with the same tensors at a fraction of the cost.
In one process (no torchrun, or one worker) `Dist` is a no-op and nothing changes.

Test hooks (environment): TRP_EDGE_DEBUG_DIR makes every rank write the hash of its weights after each TSVD
projection to DIR/weights-rank<R>.jsonl; TRP_EDGE_TEST_KILL_RANK=R with TRP_EDGE_TEST_KILL_STEP=N ends rank R
abruptly (os._exit) at the first projection at or after step N.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, TrpEdgeError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "TRP_EDGE_DIST_TIMEOUT"  # seconds a collective may wait for a rank before it fails (default 30 min)


class DistributedError(TrpEdgeError):
    """A rank of a torchrun job failed or stopped answering; the others end with this."""


@dataclass(frozen=True)
class Chunk:
    """Layers lo:hi of job `job`, computed on `rank`."""

    job: int
    lo: int
    hi: int
    rank: int


def plan_chunks(sizes: Sequence[int], costs: Sequence[float], world: int) -> list[Chunk]:
    """Split jobs (each a batch of `sizes[i]` equal matrices costing `costs[i]` each) into chunks over `world`
    ranks: a job worth more than a rank's fair share is cut along its batch, then the chunks go, largest first,
    to the least loaded rank. Deterministic, so every rank computes the same plan."""
    total = sum(n * c for n, c in zip(sizes, costs))
    fair = total / world if total > 0 else 1.0
    pieces = []
    for j, (n, c) in enumerate(zip(sizes, costs)):
        parts = max(1, min(n, math.ceil(n * c / fair - 1e-9)))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        pieces += [(j, lo, hi, (hi - lo) * c) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    load = [0.0] * world
    out = []
    for j, lo, hi, cost in sorted(pieces, key=lambda p: (-p[3], p[0], p[1])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += cost
        out.append(Chunk(j, lo, hi, r))
    return sorted(out, key=lambda c: (c.job, c.lo))


class Dist:
    """One process, or one rank of a torchrun job (`launched` makes it; `current` returns it)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None):
        self.rank, self.world, self.local_rank, self.backend = rank, world, local_rank, backend
        self.comm_seconds = 0.0  # in spread's broadcasts (metrics.jsonl comm_ms; DDP's all-reduce is in backward)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world): this rank takes every world-th item of each global batch, from item `rank`."""
        return self.rank, self.world

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU (LOCAL_RANK) where the job trains on CUDA."""
        if self.world > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def check_batch(self, batch: int) -> None:
        if batch % self.world:
            raise ConfigError(f"--batch {batch} is the global batch and must divide evenly over the {self.world} "
                              f"ranks (each takes batch / {self.world})")

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel around `model` (whose parameters stay the ones the trainer holds) on several
        ranks; the model itself in one process."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may write, e.g. measure latency tables), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def spread(self, sizes: Sequence[int], costs: Sequence[float],
               run: Callable[[list[Chunk]], list[tuple[torch.Tensor, ...]]],
               shapes: Callable[[Chunk], Sequence[tuple[int, ...]]], device: torch.device,
               dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """For every job (a batch of sizes[j] matrices), the tuple of tensors `run` returns for it, batched along
        dim 0. `run(chunks)` computes the chunks given to this rank (batched as it likes); `shapes(chunk)` gives
        the shapes of its results, so every rank knows what it receives. In one process: run on every job."""
        if self.world == 1:
            return run([Chunk(j, 0, n, 0) for j, n in enumerate(sizes)])
        chunks = plan_chunks(sizes, costs, self.world)
        mine = [c for c in chunks if c.rank == self.rank]
        got = dict(zip(mine, run(mine)))
        comm = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        t0 = time.perf_counter()
        for src in range(self.world):
            theirs = [c for c in chunks if c.rank == src]
            dims = [tuple(s) for c in theirs for s in shapes(c)]
            numel = sum(math.prod(s) for s in dims)
            if numel == 0:
                continue
            if src == self.rank:
                buf = torch.cat([t.reshape(-1) for c in theirs for t in got[c]]).to(comm, dtype)
            else:
                buf = torch.empty(numel, device=comm, dtype=dtype)
            torch.distributed.broadcast(buf, src=src)
            if src != self.rank:
                flat = iter(buf.to(device).split([math.prod(s) for s in dims]))
                for c in theirs:
                    got[c] = tuple(next(flat).view(s) for s in shapes(c))
        self.comm_seconds += time.perf_counter() - t0
        out = []
        for j in range(len(sizes)):
            parts = [got[c] for c in chunks if c.job == j]
            out.append(parts[0] if len(parts) == 1 else tuple(torch.cat(ts) for ts in zip(*parts)))
        return out

    def after_projection(self, step: int, params: Iterator[torch.Tensor]) -> None:
        """The test hooks (module docstring): each rank's weight hash, and a rank that dies."""
        kill, at = os.environ.get("TRP_EDGE_TEST_KILL_RANK"), os.environ.get("TRP_EDGE_TEST_KILL_STEP")
        if kill is not None and int(kill) == self.rank and step >= int(at or 0):
            os._exit(1)
        folder = os.environ.get("TRP_EDGE_DEBUG_DIR")
        if folder:
            h = hashlib.sha256()
            for p in params:
                h.update(p.detach().cpu().contiguous().numpy().tobytes())
            with open(Path(folder) / f"weights-rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "world": self.world, "sha256": h.hexdigest()}) + "\n")


_CURRENT = Dist()


def current() -> Dist:
    """This process's Dist: a torchrun job's rank inside `launched`, else one process."""
    return _CURRENT


def _torchrun_env() -> tuple[int, int, int] | None:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def launched(device: str = "auto") -> Iterator[Dist]:
    """Inside a torchrun job of 2+ workers: the process group for the job (NCCL when it trains on CUDA, gloo
    otherwise), ended on the way out; only rank 0 logs below WARNING. A collective that fails (a rank died or
    stopped answering for TRP_EDGE_DIST_TIMEOUT seconds), or torchrun ending this worker because another failed,
    becomes one DistributedError naming this rank. Outside torchrun: a one-process Dist, nothing started."""
    global _CURRENT
    env = _torchrun_env()
    if env is None:
        yield _CURRENT
        return
    import torch.distributed as td

    rank, world, local = env
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    timeout = dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
    td.init_process_group(backend, timeout=timeout)
    _CURRENT = Dist(rank, world, local, backend)
    if rank != 0:
        logging.getLogger("trp_edge").setLevel(max(logging.getLogger("trp_edge").level, logging.WARNING))

    def stopped(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise DistributedError(f"rank {rank}: stopped by torchrun (another rank failed)")

    prev = signal.signal(signal.SIGTERM, stopped)
    try:
        yield _CURRENT
    except DistributedError:
        raise
    except (RuntimeError, TimeoutError) as e:  # DistBackendError and gloo's peer errors are RuntimeErrors
        if not isinstance(e, td.DistError) and "gloo" not in str(e).lower() and "nccl" not in str(e).lower():
            raise
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())  # gloo's [source:line] prefix
        first = text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__
        raise DistributedError(f"rank {rank}: another rank failed or stopped answering ({first})") from e
    finally:
        signal.signal(signal.SIGTERM, prev)
        _CURRENT = Dist()
        td.destroy_process_group()
