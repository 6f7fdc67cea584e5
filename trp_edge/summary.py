"""What the CLI prints after each workflow, read from the contracts the workflow wrote (the compress report, the
build manifest, the deploy report): text only, no I/O but reading."""

from __future__ import annotations

from pathlib import Path

from .config import SCHEME_NAMES
from .report import read_report, tvm_line


def compress_lines(result) -> list[str]:
    """What `trp-edge compress` prints: the compress report read back, line by line."""
    out: list[str] = []
    r = result.report

    def acc(v):
        return "n/a" if v is None else f"{v:.2f}%"

    left = sum(1 for la in r.layers if la["rank"] is None)
    scheme = r.scheme
    if scheme == "auto":
        chosen = [la["scheme"] if la["rank"] is not None else "dense" for la in r.layers]
        scheme += " (" + ", ".join(f"{n} {chosen.count(n)}" for n in (*SCHEME_NAMES, "dense") if n in chosen) + ")"
    out.append(f"{r.model}: {scheme} scheme, e={r.energy:.4g}: {r.mac_speedup:.2f}x fewer MACs "
               f"({r.dense['macs'] / 1e6:.1f}M -> {r.compressed['macs'] / 1e6:.1f}M), "
               f"{len(r.layers) - left}/{len(r.layers)} convs decomposed")
    start = f"input model {acc(r.initial_accuracy)}, " if r.initial_accuracy is not None else ""
    after = "after TRP " if r.training and r.training.get("steps") else ""
    out.append(f"accuracy: {start}dense {after}{acc(r.dense['accuracy'])}, decomposed {acc(r.compressed['accuracy'])}; "
               f"ONNX max abs diff {r.onnx['max_abs_diff']:.2g}")
    if ft := (r.training or {}).get("finetune"):
        out.append(f"fine-tuned {ft['epochs']:g} epoch{'s' if ft['epochs'] != 1 else ''} at fixed ranks: top-1 "
                   f"{acc(ft['accuracy_before'])} -> {acc(ft['accuracy_after'])} ({ft['seconds']:.0f} s)")
    tables = r.latency_tables
    spread = " (spread over layers for latency at the MAC target)" if r.allocate == "latency" else ""
    out.append(f"ranks from latency table{'s' if len(tables) > 1 else ''} {', '.join(tables)}{spread}" if tables else
               "ranks are MAC-based (no latency table): a pair may be slower than its dense conv")
    for key, p in (r.precisions or {}).items():
        prec, _, rt = key.partition("/")  # "int8", or "int8/ort": one runtime's model
        up, where = prec.upper(), f" {rt}" if rt else ""
        out.append(f"{up}{where} builds keep {len(p['dense_layers'])} of the {len(r.layers) - left} pairs dense (not "
                   f"faster than the dense conv in{where} {up} on this table's device): {p['mac_speedup']:.2f}x fewer "
                   f"MACs at {up}, from {p['onnx']}")
    for pr in r.predictions or []:
        out.append(f"predicted for {pr['deployment']}: dense {pr['dense_ms']:.3f} ms, compressed "
                   f"{pr['compressed_ms']:.3f} ms ({pr['latency_speedup']:.2f}x)")
    if r.latency:
        lat = r.latency
        out.append(f"latency here (onnxruntime, {lat['threads']} thread{'s' if lat['threads'] > 1 else ''}, batch 1): "
                   f"dense {lat['dense']['median_ms']:.2f} ms, compressed {lat['compressed']['median_ms']:.2f} ms: "
                   f"{lat['latency_speedup']:.2f}x for {r.mac_speedup:.2f}x fewer MACs "
                   f"(efficiency {lat['efficiency']:.2f})")
        for rt, q in (lat.get("int8") or {}).items():
            out.append(f"{rt} INT8 here, whole net ({q['threads']} thread{'s' if q['threads'] > 1 else ''}): dense "
                       f"{q['dense']['median_ms']:.3f} ms, compressed {q['compressed']['median_ms']:.3f} ms: "
                       f"{q['latency_speedup']:.2f}x" + (": its INT8 builds keep every pair dense" if q["kept_dense"]
                                                        else ""))
    out.append(f"artifacts in {result.out}/ ({', '.join(result.artifacts)})")
    return out


def artifact_status(a: dict) -> str:
    """One build artifact's validation and accuracy, as `trp-edge build` prints it."""
    v = a["validation"]
    what = v["status"]
    if "max_abs_diff" in v:
        what += f" ({v['where']}, max abs diff {v['max_abs_diff']:.2g})"
    elif v.get("reason"):
        what += f" ({v['reason']})"
    acc = a.get("accuracy")
    if acc and "quantized_top1" in acc:
        what += f"; top-1 {acc['fp32_top1']:.2f}% fp32 -> {acc['quantized_top1']:.2f}% {a['precision']}"
    elif acc:
        what += f"; agrees with fp32 on {acc['agreement'] * 100:.1f}% of {acc['images']} inputs"
    return what


def deploy_lines(path: Path) -> list[str]:
    """What `trp-edge deploy` prints for one deploy report."""
    out: list[str] = []
    r = read_report(path)
    em = " [EMULATED: not device latency]" if r["emulated"] else ""
    slower = sum(1 for la in r["layers"] if la.get("slower"))
    prec = r.get("precision", "fp32")
    api = "" if r.get("device_api", "cpu") == "cpu" else f" {r['device_api']}"
    out.append(f"{r['target']}/{r['runtime']}{api} {prec} ({r['threads']} thread{'s' if r['threads'] > 1 else ''}): "
               f"dense {r['dense']['median_ms']:.3f} ms, compressed {r['compressed']['median_ms']:.3f} ms: "
               f"{r['latency_speedup']:.2f}x for {r['mac_speedup']:.2f}x fewer MACs (efficiency {r['efficiency']:.2f})"
               + (f"; {slower} layer(s) slower than dense" if slower else "")
               + (f"; {len(kept)} pair(s) kept dense at {prec}" if (kept := r.get("kept_dense_at_precision")) else "")
               + (f"; {r['fp32_dense']['speedup']:.2f}x against fp32 dense" if r.get("fp32_dense") else "") + em)
    acc = r.get("accuracy")
    if acc:
        start = f"input model {acc['input']:.2f}%, " if acc.get("input") not in (None, acc["trained"]) else ""
        out.append(f"  top-1: {start}trained {acc['trained']:.2f}%, decomposed {acc['decomposed']:.2f}%"
                   + "".join(f", {prec} {k} {v:.2f}%" for k, v in acc.get("quantized", {}).items()))
    if w := r.get("weak_dense_baseline"):
        out.append(f"  weak dense baseline: efficiency {w['efficiency']:.2f} > {w['threshold']}: the dense model ran "
                   f"slower than its MACs say ({w['explained_by']})")
    if tvm_line(r):
        out.append(f"  {tvm_line(r)}")
    out.append(f"  report: {path} (+ .md, .png)")
    return out
