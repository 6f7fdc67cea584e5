"""The compress report: report.json and ranks.png."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_ranks(report: dict[str, Any], path: Path) -> None:
    """Left: each layer's rank over the TSVD iterations (the paper's Fig. 2). Right: MACs per layer,
    dense against low-rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    traj = report.get("trajectory") or []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4.5, 0.22 * len(layers) + 1.5)))
    if traj:
        steps = [t["step"] for t in traj]
        names = list(traj[-1]["ranks"])
        cmap = plt.get_cmap("viridis", max(len(names), 2))
        for i, name in enumerate(names):
            ax1.plot(steps, [t["ranks"].get(name) for t in traj], color=cmap(i), lw=1.2,
                     label=name if len(names) <= 12 else None)
        ax1.set_xlabel("training step")
        ax1.set_ylabel("rank after TSVD")
        ax1.set_title(f"TRP rank trajectory ({report['scheme']}, e={report['energy']:.3g})")
        if len(names) <= 12:
            ax1.legend(fontsize=7)
    else:
        ranked = [la for la in layers if la["rank"] is not None]
        ax1.barh([la["name"] for la in ranked], [la["full_rank"] for la in ranked], color="#ccc", label="full rank")
        ax1.barh([la["name"] for la in ranked], [la["rank"] for la in ranked], color="#2a7", label="kept rank")
        ax1.invert_yaxis()
        ax1.tick_params(axis="y", labelsize=7)
        ax1.legend(fontsize=8)
        ax1.set_title("ranks (no TRP training: direct decomposition)")
    names = [la["name"] for la in layers]
    dense = [la["macs_dense"] / 1e6 for la in layers]
    low = [(la["macs_lowrank"] if la["rank"] is not None else la["macs_dense"]) / 1e6 for la in layers]
    y = range(len(layers))
    ax2.barh([i - 0.2 for i in y], dense, height=0.4, color="#999", label="dense")
    ax2.barh([i + 0.2 for i in y], low, height=0.4, color="#2a7", label="compressed")
    ax2.set_yticks(list(y), names, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("MMACs")
    ax2.set_title(f"MACs per conv: {report['mac_speedup']:.2f}x fewer for the whole model")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
