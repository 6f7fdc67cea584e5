"""The training log people read: metrics.jsonl (one JSON line per epoch and phase), the same scalars in
TensorBoard where it is installed, and training.png (accuracy and MAC speedup against epoch)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .contracts import METRICS

log = logging.getLogger(__name__)

SCALARS = ("loss", "train_accuracy", "test_accuracy", "total_rank", "mac_speedup", "lr", "images_per_s",
           "forward_backward_ms", "svd_ms", "comm_ms")


class MetricsLog:
    """Appends one line per epoch to `path` (flushed at once, so a crash keeps every finished epoch) and, with
    `tensorboard`, the same scalars to that folder. `enabled` False writes nothing (a process other than the
    first of a distributed run)."""

    def __init__(self, path: Path, *, fresh: bool, tensorboard: Path | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._tb_dir, self._tb = tensorboard, None
        if fresh and enabled:
            self.path.unlink(missing_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(METRICS.stamp(row)) + "\n")
            f.flush()
        writer = self._writer()
        if writer is not None:
            for k in SCALARS:
                v = row.get(k)
                if isinstance(v, int | float) and math.isfinite(v):
                    writer.add_scalar(f"{row['phase']}/{k}", v, row["epoch"])
            writer.flush()

    def _writer(self):
        if self._tb is None and self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional extra `tensorboard` is not installed
                log.debug("tensorboard is not installed: metrics go to %s only", self.path)
                self._tb_dir = None
                return None
            self._tb = SummaryWriter(str(self._tb_dir))
        return self._tb

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            if line.strip():
                rows.append(json.loads(line))
                METRICS.check(rows[-1], f"{self.path}:{i}")  # a newer trp-edge's line is refused, not misread
        return rows

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_training(rows: list[dict[str, Any]], path: Path) -> bool:
    """Top-1 (train, held-out) and MAC speedup against epoch, the phases one after the other; False (nothing
    drawn) without rows or without matplotlib."""
    if not rows:
        return False
    try:
        import matplotlib
    except ImportError:
        log.debug("matplotlib is not installed: no %s", path)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, offset, last = [], 0, {}
    for r in rows:  # the fine-tune's epochs go on after TRP's
        if r["phase"] != last.get("phase") and last:
            offset += last["epoch"]
        x.append(offset + r["epoch"])
        last = r
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train_accuracy", "-"), ("test_accuracy", "o-")):
        pts = [(xi, r[key]) for xi, r in zip(x, rows) if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), style, label=key.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("top-1 (%)")
    ax1.legend(fontsize=8)
    pts = [(xi, r["mac_speedup"]) for xi, r in zip(x, rows) if r.get("mac_speedup") is not None]
    if pts:
        ax2.plot(*zip(*pts), "o-", color="#2a7")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("MAC speedup (dense / current ranks)")
    for xi, r, prev in zip(x[1:], rows[1:], rows):
        if r["phase"] != prev["phase"]:
            for ax in (ax1, ax2):
                ax.axvline(xi - 0.5, color="#999", ls="--", lw=1)
    fig.suptitle(" then ".join(dict.fromkeys(r["phase"] for r in rows)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
