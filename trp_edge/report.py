"""The compress report: report.json and ranks.png."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_text(path: Path, text: str) -> None:
    """Atomic: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


def plot_latency(reports: list[dict[str, Any]], path: Path, per_layer: bool = True) -> None:
    """MAC speedup (x) against latency speedup (y) with the ideal line: per layer and for the whole net of
    one report, or one point per report (device x runtime) for `trp-edge report`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    pts = []
    for r in reports:
        if per_layer:
            lay = [la for la in r.get("layers", []) if la.get("latency_speedup")]
            if lay:
                xs = [la["mac_speedup"] for la in lay]
                ys = [la["latency_speedup"] for la in lay]
                colors = ["tab:red" if la["slower"] else "tab:blue" for la in lay]
                ax.scatter(xs, ys, c=colors, s=22, alpha=0.8, label="layers (red: slower than dense)")
                pts += list(zip(xs, ys))
        label = f"{r['target']}/{r['runtime']}" + (" (emulated)" if r.get("emulated") else "")
        ax.scatter([r["mac_speedup"]], [r["latency_speedup"]], marker="*", s=180, zorder=3,
                   label=f"whole net {label}" if per_layer else label)
        pts.append((r["mac_speedup"], r["latency_speedup"]))
    hi = max([1.5] + [max(x, y) for x, y in pts]) * 1.1
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="ideal (latency = MAC speedup)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("MAC speedup (dense / compressed)")
    ax.set_ylabel("latency speedup (dense / compressed)")
    title = reports[0]["model"] if len({r["model"] for r in reports}) == 1 else "trp-edge"
    ax.set_title(f"{title}: what fewer MACs bought")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
