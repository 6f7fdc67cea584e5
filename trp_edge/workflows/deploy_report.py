"""The deploy report of one compress output at one precision: the device's answer to the job, read against the
compress report and the build manifest (trp_edge.contracts), with the per-layer breakdown, the accuracy per stage
and what the latency table predicted. Written by trp_edge.report.write_report."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import capabilities
from ..contracts import CompressReport
from ..errors import DeviceError
from ..targets import Target
from .build import load_manifest

Stage = tuple[str, str]  # one report's artifacts in a deploy run: (precision, TVM device API), e.g. ("fp32", "cpu")


@dataclass
class Part:
    """One compress output in a deploy run: where its build is and which job variants time it."""

    model: Path
    folder: Path
    label: str  # "" for the deployed model, a name for each --compare model
    variants: dict[Stage, dict[str, str]]  # stage -> "dense" / "compressed" -> the job variant that times it
    references: dict[str, str] = field(default_factory=dict)  # "untuned" / "ort" -> the job variant timing it


def _checked(result: dict[str, Any], target: Target, variants: dict[str, str]) -> None:
    """Raise on a failed job or on a failed artifact among `variants` (those of one report)."""
    if result.get("error"):
        raise DeviceError(f"{target.name}/{result.get('runtime')}: {result['error']}")
    failed = {v: result["artifacts"][v]["error"] for v in variants.values() if "error" in result["artifacts"][v]}
    if failed:
        raise DeviceError(f"{target.name}/{result['runtime']}: " + "; ".join(f"{v}: {e}" for v, e in failed.items()))


def make_report(part: Part, target: Target, result: dict[str, Any], *, transport: str, emulated: bool,
                precision: str = "fp32", api: str = "cpu") -> dict[str, Any]:
    """The deploy report of one compress output at one precision, on one TVM device API for a GPU build, from
    the device's answer to the job (an INT8 report also gives the fp32 dense model timed in the same run, the
    reference line; a TVM report the untuned module and ONNX Runtime timed alongside)."""
    model, folder = part.model, part.folder
    variants = part.variants[(precision, api)]
    _checked(result, target, variants)
    fp32_dense = result["timing"].get(part.variants.get(("fp32", "cpu"), {}).get("dense", ""))
    full = result
    result = {**result, "artifacts": {k: result["artifacts"][v] for k, v in variants.items()},
              "timing": {k: result["timing"][v] for k, v in variants.items()}}
    src = CompressReport.read(model / "report.json")
    manifest = load_manifest(folder)
    d, c = result["timing"]["dense"], result["timing"]["compressed"]
    speedup = d["median_ms"] / c["median_ms"]
    at = src.at_precision(precision, result["runtime"])  # INT8 builds may keep pairs dense that are slower there
    rep: dict[str, Any] = {
        "target": target.name, "runtime": result["runtime"], "precision": precision, "model": src.model,
        "name": model.resolve().name, "model_dir": str(model), "scheme": src.scheme,
        "created": dt.datetime.now().isoformat(timespec="seconds"), "device": result["device"],
        "emulated": emulated, "transport": transport, "threads": result["threads"],
        "mac_speedup": at["mac_speedup"],
        "dense": {**d, "macs": src.dense["macs"], "max_abs_diff": result["artifacts"]["dense"]["max_abs_diff"]},
        "compressed": {**c, "macs": at["macs"], "max_abs_diff": result["artifacts"]["compressed"]["max_abs_diff"]},
        "latency_speedup": speedup, "efficiency": speedup / at["mac_speedup"],
        "kept_dense_at_precision": at["dense_layers"],
        "layers": [], "protocol": result.get("protocol"), "build": str(folder),
        "artifacts": {a["variant"]: {"file": a["file"], "sha256": a["sha256"]} for a in manifest["artifacts"]
                      if a["precision"] == precision and a["device"] == api},
        "device_api": api,
        "accuracy": _accuracy(src, manifest, precision),
    }
    if precision != "fp32" and fp32_dense is not None:
        rep["fp32_dense"] = {"median_ms": fp32_dense["median_ms"],
                             "speedup": fp32_dense["median_ms"] / c["median_ms"]}
    if emulated:
        rep["note"] = ("EMULATED: timings come from qemu-user on this x86 machine and say nothing about device "
                       "latency; this run checks correctness on the target's CPU architecture")
    if precision == "fp32":
        _add_layers(rep, model, src, result)
    else:
        rep["layers_note"] = "per-layer breakdown for fp32 only (the quantized graphs fuse and requantize ops)"
    if rep["efficiency"] > WEAK_BASELINE:
        rep["weak_dense_baseline"] = weak_baseline(rep)
    if api == "cpu":  # latency tables are measured on the CPU
        _add_prediction(rep, src, d, c)
    if capabilities(result["runtime"]).reference:  # the tuned / untuned / reference line (report: "tvm")
        rep["tvm"] = _tvm_line(part, full, manifest, c["median_ms"], api)
    return rep


WEAK_BASELINE = 1.1  # an efficiency above this: the dense model ran slower than its MACs say, not the pairs faster


def weak_baseline(rep: dict[str, Any]) -> dict[str, Any]:
    """Why a report's efficiency is above WEAK_BASELINE: the layers whose dense conv took most beyond what the MAC
    ratio gives their pair (dense ms - compressed ms x MAC speedup, top 3), and the other ops' time in each model.
    Compare such a report with the fastest dense deployment of the run (deploy's "fastest"), not with its own
    dense model."""
    excess = sorted(((la["dense_ms"] - la["compressed_ms"] * la["mac_speedup"], la["name"]) for la in rep["layers"]
                     if la.get("dense_ms") is not None and la.get("compressed_ms") is not None), reverse=True)
    out: dict[str, Any] = {"efficiency": rep["efficiency"], "threshold": WEAK_BASELINE,
                           "layers": [{"name": n, "excess_ms": ms} for ms, n in excess[:3] if ms > 0],
                           "other_ms": rep.get("layers_other_ms")}
    out["explained_by"] = ("the dense model's layers " + ", ".join(la["name"] for la in out["layers"])
                           if out["layers"] else "no per-layer rows here (see the runtime's layers_note)")
    return out


def _tvm_line(part: Part, result: dict[str, Any], manifest: dict[str, Any], ms: float, api: str) -> dict[str, Any]:
    """The TVM build's compressed model against its untuned module and ONNX Runtime, timed in the same run:
    median ms and each as a multiple of this build's."""
    t = manifest.get("tuning") or {}
    per = t.get("per_model") or {}
    out: dict[str, Any] = {"tuned": bool(per) and api == "cpu", "device_api": api, "ms": ms,
                           "trials": sum(v.get("trials", 0) for v in per.values()) if per else 0,
                           "runner": t.get("runner")}
    for label, variant in part.references.items():
        r = result["artifacts"].get(variant, {})
        timing = result["timing"].get(variant)
        if timing:
            out[label] = {"median_ms": timing["median_ms"], "ratio": timing["median_ms"] / ms,
                          "max_abs_diff": r.get("max_abs_diff")}
        elif r.get("error"):
            out[label] = {"error": r["error"]}
    return out


def _accuracy(src: CompressReport, manifest: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """Top-1 per stage, when the model's data is known: input (the model compress was given, when it trained it),
    trained (the dense model), decomposed, and "quantized":
    per variant (dense, compressed), the artifact of this precision as built for this runtime (on the build's
    evaluation images from the test set)."""
    out: dict[str, Any] = {"data": src.data, "input": src.initial_accuracy, "trained": src.dense.get("accuracy"),
                           "decomposed": src.compressed.get("accuracy"), "quantized": {}}
    for a in manifest["artifacts"]:
        acc = a.get("accuracy") or {}
        if a["precision"] == precision != "fp32" and acc.get("quantized_top1") is not None:
            out["quantized"][a["variant"]] = acc["quantized_top1"]
            out["images"] = acc["images"]
    return out if out["trained"] is not None else None


def _add_layers(rep: dict[str, Any], model: Path, src: CompressReport, result: dict[str, Any]) -> None:
    from ..layers import per_layer

    if result.get("ops_note"):
        rep["layers_note"] = result["ops_note"]
    ops = {v: a.get("ops") for v, a in result["artifacts"].items()}
    if ops.get("dense") and ops.get("compressed"):
        rep.update(per_layer(model, src, ops["dense"], ops["compressed"]))
    elif not rep.get("layers_note"):
        rep["layers_note"] = "; ".join(f"{v}: {a['ops_error']}" for v, a in result["artifacts"].items()
                                       if a.get("ops_error")) or "no per-op timings"


def _add_prediction(rep: dict[str, Any], src: CompressReport, d: dict[str, Any], c: dict[str, Any]) -> None:
    """What the latency table of this deployment (target, runtime, precision, threads) predicted for the whole
    net, against what was measured: as predicted ("error"), and anchored on the dense net measured now
    ("anchored_error": the measured dense times the predicted speedup; a machine that runs faster or slower
    than when the table was made moves both nets, which the table's own error should not include)."""
    rep["latency_table"] = src.latency_table
    # layers the calibration guard kept dense (their fastest pair was not faster than the dense conv)
    rep["kept_dense_by_guard"] = [la["name"] for la in src.layers if (la.get("reason") or "").startswith("calibrated")]
    rep["kept_dense_by_guard"] += rep["kept_dense_at_precision"]
    key = (rep["target"], rep["runtime"], rep["precision"], rep["threads"])
    for pr in src.predictions or []:
        if (pr["target"], pr["runtime"], pr["precision"], pr["threads"]) == key:
            anchored = d["median_ms"] * pr["compressed_ms"] / pr["dense_ms"]
            rep["prediction"] = {**pr, "measured_compressed_ms": c["median_ms"], "measured_dense_ms": d["median_ms"],
                                 "error": c["median_ms"] / pr["compressed_ms"] - 1.0,
                                 "dense_error": d["median_ms"] / pr["dense_ms"] - 1.0,
                                 "anchored_compressed_ms": anchored, "anchored_error": c["median_ms"] / anchored - 1.0}


def summary_row(rep: dict[str, Any]) -> dict[str, Any]:
    """One model's line in a side-by-side comparison."""
    return {"name": rep["name"], "model_dir": rep["model_dir"], "scheme": rep["scheme"],
            "latency_table": rep.get("latency_table"), "mac_speedup": rep["mac_speedup"],
            "dense_ms": rep["dense"]["median_ms"], "compressed_ms": rep["compressed"]["median_ms"],
            "latency_speedup": rep["latency_speedup"], "efficiency": rep["efficiency"],
            "slower_layers": sum(1 for la in rep["layers"] if la.get("slower")) if rep["layers"] else None,
            "kept_dense_by_guard": len(rep.get("kept_dense_by_guard") or []),
            "predicted_ms": (rep.get("prediction") or {}).get("compressed_ms")}


