"""What trp-edge reports, and how it is written: the compress report (report.json, a versioned dataclass every
reader goes through, and ranks.png) and the deploy reports (reports/<target>/*.json, their Markdown and plots,
and `trp-edge report`'s summary across devices). Every file is written atomically."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from .contracts import DEPLOY_REPORT, CompressReport, claim, precision_entry, read_json, write_json, write_text  # noqa: F401 - where 0.1 code imported them from
from .errors import InputError

log = logging.getLogger(__name__)

def plot_ranks(report: CompressReport, path: Path) -> None:
    """Left: each layer's rank over the TSVD iterations (the paper's Fig. 2). Right: MACs per layer,
    dense against low-rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    traj = report.trajectory or []
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
        ax1.set_title(f"TRP rank trajectory ({report.scheme}, e={report.energy:.3g})")
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
    ax2.set_title(f"MACs per conv: {report.mac_speedup:.2f}x fewer for the whole model")
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
        label = f"{r['target']}/{_runtime(r)}" + (" (emulated)" if r.get("emulated") else "")
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


# ---- deploy reports ----------------------------------------------------------------------------------


def read_report(path: Path) -> dict[str, Any]:
    """A deploy report (reports/<target>/*.json), checked: another format or a newer version is refused."""
    return read_json(path, DEPLOY_REPORT)


def write_report(rep: dict[str, Any], root: Path) -> Path:
    d = root / rep["target"]
    d.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = "-".join([rep["runtime"]] + [v for v in (rep.get("device_api", "cpu"), rep.get("precision", "fp32"))
                                        if v not in ("cpu", "fp32")])
    stem = d / f"{rep['name']}-{kind}-{stamp}"
    n = 1
    while not claim(stem.with_suffix(".json")):  # created exclusively: two deploys never pick one name
        n += 1
        stem = d / f"{rep['name']}-{kind}-{stamp}-{n}"
    rep["files"] = {"json": stem.name + ".json", "markdown": stem.name + ".md", "plot": stem.name + ".png"}
    write_json(stem.with_suffix(".json"), DEPLOY_REPORT.stamp(rep))
    write_text(stem.with_suffix(".md"), markdown(rep))
    plot_latency([rep], stem.with_suffix(".png"))
    return stem.with_suffix(".json")


def markdown(rep: dict[str, Any]) -> str:
    d, c = rep["dense"], rep["compressed"]
    em = " — **EMULATED, not device latency**" if rep["emulated"] else ""
    lines = [f"# {rep['name']} on {rep['target']} ({_runtime(rep)}, {rep['threads']} thread"
             f"{'s' if rep['threads'] > 1 else ''}){em}", "",
             f"**{rep['latency_speedup']:.2f}x faster for {rep['mac_speedup']:.2f}x fewer MACs: realization "
             f"efficiency {rep['efficiency']:.2f}.**", "",
             "| | median ms | p10 | p90 | runs | MACs |", "|---|---|---|---|---|---|",
             f"| dense | {d['median_ms']:.3f} | {d['p10_ms']:.3f} | {d['p90_ms']:.3f} | {d['runs']} | "
             f"{d['macs'] / 1e6:.1f}M |",
             f"| compressed | {c['median_ms']:.3f} | {c['p10_ms']:.3f} | {c['p90_ms']:.3f} | {c['runs']} | "
             f"{c['macs'] / 1e6:.1f}M |", "",
             f"Device: {rep['device'].get('cpu')} ({rep['device'].get('cores')} cores, governor "
             f"{rep['device'].get('governor')}); transport {rep['transport']}; outputs match the reference to "
             f"{max(d['max_abs_diff'] or 0, c['max_abs_diff'] or 0):.2g}."]
    if rep.get("fp32_dense"):
        fd = rep["fp32_dense"]
        lines += ["", f"Against the fp32 dense model timed in the same run ({fd['median_ms']:.3f} ms): "
                  f"{fd['speedup']:.2f}x."]
    acc = rep.get("accuracy")
    if acc:
        stages = [f"trained {_pct(acc['trained'])}", f"decomposed {_pct(acc['decomposed'])}"]
        stages += [f"{_runtime(rep)} {k} {_pct(v)}" for k, v in acc.get("quantized", {}).items()]
        lines += ["", f"Top-1 on {acc['data']}: " + ", ".join(stages)
                  + (f" (quantized: on {acc['images']} test images)" if acc.get("images") else "") + "."]
    if rep.get("note"):
        lines += ["", rep["note"]]
    if tvm_line(rep):
        lines += ["", tvm_line(rep)]
    pr = rep.get("prediction")
    if pr:
        what = "the convs" if pr.get("convs_only") else "the whole net"
        lines += ["", f"Latency table for {pr['deployment']}: predicted {pr['compressed_ms']:.3f} ms for {what} "
                  f"(dense {pr['dense_ms']:.3f} ms, {pr['latency_speedup']:.2f}x); measured {c['median_ms']:.3f} ms "
                  f"({100 * pr['error']:+.1f}% against the prediction; dense {100 * pr['dense_error']:+.1f}%"
                  + (f"; {100 * pr['anchored_error']:+.1f}% against the prediction anchored on the dense net measured "
                     "now" if "anchored_error" in pr else "") + ")."]
    if rep.get("comparison"):
        lines += ["", "Timed side by side in the same run (alternating blocks):", ""]
        lines += comparison_markdown(rep["comparison"])
    slower = [la for la in rep["layers"] if la.get("slower")]
    if rep["layers"]:
        lines += ["", f"Per layer ({len(rep['layers'])} convs; {len(slower)} decomposed layer(s) slower than dense):",
                  "", "| layer | scheme | rank (energy rank) | MAC speedup | dense ms | compressed ms | predicted ms | "
                  "latency speedup | |", "|---|---|---|---|---|---|---|---|---|"]
        for la in rep["layers"]:
            ls = la.get("latency_speedup")
            er = la.get("energy_rank")
            lines.append(f"| {la['name']} | {la.get('scheme') or ''} | {la.get('rank') or 'dense'}"
                         f"{f' ({er})' if er and er != la.get('rank') else ''} | {la['mac_speedup']:.2f}x | "
                         f"{_ms(la.get('dense_ms'))} | {_ms(la.get('compressed_ms'))} | "
                         f"{_ms(la.get('predicted_ms'))} | "
                         f"{f'{ls:.2f}x' if ls else 'n/a'} | {'**slower**' if la.get('slower') else ''} |")
    if rep.get("layers_note"):
        lines += ["", f"Per-layer: {rep['layers_note']}."]
    return "\n".join(lines) + "\n"


def _runtime(rep: dict[str, Any]) -> str:
    """ort, ort int8, tvm opencl, ...: the runtime, the TVM device API when not the CPU, and the precision when
    not fp32."""
    prec, api = rep.get("precision", "fp32"), rep.get("device_api", "cpu")
    return rep["runtime"] + ("" if api == "cpu" else f" {api}") + ("" if prec == "fp32" else f" {prec}")


def tvm_line(rep: dict[str, Any]) -> str | None:
    """A TVM report's compressed model against its untuned module and ONNX Runtime, timed in the same run."""
    t = rep.get("tvm")
    if not t:
        return None
    what = f"tuned ({t['trials']} trials)" if t["tuned"] else "untuned (default schedule)"
    parts = [f"TVM {what} {t['ms']:.3f} ms"]
    for label, name in (("untuned", "TVM untuned"), ("ort", "ONNX Runtime")):
        ref = t.get(label)
        if ref and "median_ms" in ref:
            parts.append(f"{name} {ref['median_ms']:.3f} ms ({ref['ratio']:.2f}x that)")
        elif ref:
            parts.append(f"{name}: {ref['error']}")
    return "Compressed model in the same run: " + "; ".join(parts) + "."


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def comparison_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | scheme | latency table | MAC speedup | dense ms | compressed ms | latency speedup | "
             "efficiency | layers slower than dense | predicted conv ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sl = "n/a" if r["slower_layers"] is None else str(r["slower_layers"])
        lines.append(f"| {r['name']} | {r['scheme']} | {Path(r['latency_table']).name if r['latency_table'] else '-'} "
                     f"| {r['mac_speedup']:.2f}x | {r['dense_ms']:.3f} | {r['compressed_ms']:.3f} | "
                     f"{r['latency_speedup']:.2f}x | {r['efficiency']:.2f} | {sl} | {_ms(r['predicted_ms'])} |")
    return lines


def aggregate(root: Path) -> tuple[str, Path | None, list[dict[str, Any]]]:
    """`trp-edge report`: every report under ROOT in one table (the latest per device, runtime and model)
    and one plot."""
    latest: dict[tuple[str, str, str, bool], dict[str, Any]] = {}
    for f in sorted(Path(root).glob("*/*.json"), key=lambda p: p.stat().st_mtime):
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict) or (r.get("format") is None and not {"target", "runtime", "dense", "compressed",
                                                                        "latency_speedup"} <= r.keys()):
            continue  # another file beside the reports (a report from before 0.2 has no format: read by its keys)
        if r.get("format") is not None and r["format"] != DEPLOY_REPORT.format:
            continue
        DEPLOY_REPORT.check(r, str(f))  # a newer report than this trp-edge reads is refused, not misread
        key = (r["target"], r["runtime"], r.get("precision", "fp32"), r.get("model_dir", r["model"]), r["threads"],
               r["emulated"])
        latest[key] = r
    rows = sorted(latest.values(), key=lambda r: (r["target"], r.get("name", r["model"]), r["runtime"],
                                                  r.get("precision", "fp32"), r["threads"]))
    if not rows:
        raise InputError(f"{root}: no trp-edge deploy reports found")
    lines = ["| device | model | scheme | runtime | precision | threads | dense ms | compressed ms | latency speedup | "
             "MAC speedup | efficiency |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dev = r["target"] + (" (emulated)" if r["emulated"] else "")
        lines.append(f"| {dev} | {r.get('name', r['model'])} | {r.get('scheme')} | {r['runtime']} | "
                     f"{r.get('precision', 'fp32')} | {r['threads']} | "
                     f"{r['dense']['median_ms']:.3f} | "
                     f"{r['compressed']['median_ms']:.3f} | {r['latency_speedup']:.2f}x | {r['mac_speedup']:.2f}x | "
                     f"{r['efficiency']:.2f} |")
    table = "\n".join(lines) + "\n"
    write_text(Path(root) / "summary.md", table)
    png = Path(root) / "summary.png"
    plot_latency(rows, png, per_layer=False)
    return table, png, rows

