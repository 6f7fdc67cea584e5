"""`trp-edge deploy` and `trp-edge profile`: build (or reuse) the dense and compressed artifacts for a target,
run them on the device, and write the latency report. Orchestration only: how a job reaches the device is
trp_edge.transport, how the device runs it trp_edge.device.bench, how a report is written trp_edge.report."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.base import sha256
from .build import build, load_manifest, parse_runtimes
from .config import BuildConfig, DeployConfig
from .errors import ConfigError, DeviceError, InputError
from .report import CompressReport, write_report
from .targets import Target, load_target
from .transport import open_session, resolve, run_local

log = logging.getLogger(__name__)

def latest_model(root: Path = Path("trp-edge-out")) -> Path:
    found = sorted(root.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"no trp-edge compress output under {root}/: run trp-edge compress first or pass --model")
    return found[-1].parent


# ---------------------------------------------------------------------------------------------- build


def ensure_built(model: Path, target: Target, runtime: str, cfg: DeployConfig) -> Path:
    """The runtime folder of MODEL/build/<target>/, reused when it was built from the same ONNX files with
    the same tuning budget, else built now."""
    folder = model / "build" / target.name / runtime
    try:
        m = load_manifest(folder)
        same = (m["source_sha256"] == {"dense": sha256(model / "dense.onnx"),
                                       "compressed": sha256(model / "model.onnx")}
                and m["config"]["tune_trials"] == cfg.tune_trials)
        if same and all((folder / a["file"]).is_file() for a in m["artifacts"]):
            log.info("%s/%s: reusing the build in %s", target.name, runtime, folder)
            return folder
    except (InputError, KeyError, json.JSONDecodeError):
        pass
    build(BuildConfig(model=str(model), target=target.name, runtimes=runtime, tune_trials=cfg.tune_trials,
                      tuning_db=cfg.tuning_db, int8=False, emulate=cfg.emulate or target.native))
    return folder


@dataclass
class Part:
    """One compress output in a deploy run: where its build is and which job variants time it."""

    model: Path
    folder: Path
    label: str  # "" for the deployed model, a name for each --compare model
    variants: dict[str, str]  # "dense" / "compressed" -> the job variant that times it


def plan_job(builds: list[tuple[Path, Path]], threads: int, cfg: DeployConfig) -> tuple[dict[str, Any], dict[str, Path],
                                                                                       list[Part]]:
    """One job timing the fp32 CPU artifacts of every (model, build folder) in alternating blocks, so the models
    are compared side by side in one run. An artifact file shared by two models (the dense model both were
    compressed from) is timed once. Returns the job, the files it names (name -> local path) and the parts."""
    files: dict[str, Path] = {}
    arts: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    parts: list[Part] = []
    labels: set[str] = set()
    runtime = None
    for i, (model, folder) in enumerate(builds):
        m = load_manifest(folder)
        runtime = runtime or m["runtime"]
        fp32 = [a for a in m["artifacts"] if a["precision"] == "fp32" and a["device"] == "cpu"]
        if {a["variant"] for a in fp32} != {"dense", "compressed"}:
            raise InputError(f"{folder}: needs fp32 CPU artifacts of both the dense and the compressed model")
        label = ""
        if i:
            label = model.resolve().name
            while label in labels or not label:
                label += f"-{i}"
        labels.add(label)
        ref = f"{i}-reference.npz" if i else "reference.npz"
        files[ref] = folder.parent / "reference.npz"
        variants = {}
        for a in fp32:
            # runtimes do not write byte-identical files from one source (ORT's optimized graphs differ), so
            # sameness is the source file's hash and the build settings
            same = (m["source_sha256"][a["variant"]], m["target"], m["runtime"], m["config"].get("tune_trials"))
            if same not in seen:
                name, fname = (f"{label}:{a['variant']}", f"{i}-{a['file']}") if i else (a["variant"], a["file"])
                files[fname] = folder / a["file"]
                arts.append({"variant": name, "file": fname, "device": a["device"], "reference": ref,
                             "key": a["variant"]})
                seen[same] = name
            variants[a["variant"]] = seen[same]
        parts.append(Part(model, folder, label, variants))
    job = {"runtime": runtime, "threads": threads, "protocol": {**cfg.protocol.to_dict(), "threads": threads},
           "layers": cfg.layers, "artifacts": arts}
    return job, files, parts


# ----------------------------------------------------------------------------------------------- deploy


def _model_dir(path: str | Path) -> Path:
    model = Path(path)
    if not (model / "report.json").is_file():
        raise InputError(f"{model}: not a trp-edge compress output (no report.json)")
    return model


def deploy(cfg: DeployConfig) -> list[Path]:
    """Deploy the model (and each --compare model, timed in the same alternating run) with every runtime;
    returns the report files written, the deployed model's first for each runtime."""
    target = load_target(cfg.target)
    if cfg.local and not target.native:
        raise ConfigError(f"--local runs on this machine, which is not {target.name} ({target.cpu.triple}): use "
                          "--target host, --emulate for a correctness run, or a device connection")
    models = [_model_dir(cfg.model) if cfg.model else latest_model()] + [_model_dir(c) for c in cfg.compare]
    runtimes = parse_runtimes(cfg.runtimes, target)
    conn = None if cfg.local or cfg.emulate else resolve(target, host=cfg.host, port=cfg.port, tracker=cfg.tracker,
                                                         key=cfg.key)
    threads = cfg.threads or target.run_threads
    written = []
    for rt in runtimes:
        job, files, parts = plan_job([(m, ensure_built(m, target, rt, cfg)) for m in models], threads, cfg)
        # one session per runtime: --timeout bounds each runtime's run
        with open_session(target, local=cfg.local, emulate=cfg.emulate, conn=conn, timeout=cfg.timeout) as s:
            result = s.call("bench", job, files)
        reps = [make_report(p, target, result, transport=s.transport, emulated=s.emulated) for p in parts]
        if len(reps) > 1:
            comparison = [summary_row(r) for r in reps]
            for r in reps:
                r["comparison"] = comparison
        written += [write_report(r, Path(cfg.reports)) for r in reps]
    return written


def profile_build(folder: Path, target_name: str = "host", cfg: DeployConfig | None = None) -> Path:
    """`trp-edge profile ARTIFACT_DIR`: time an existing build folder (OUT/<target>/<runtime>) here."""
    folder = Path(folder)
    m = load_manifest(folder)
    target = load_target(target_name)
    if not target.native:
        raise ConfigError(f"trp-edge profile times artifacts on this machine; {target.name} is not this machine")
    if m["target_spec"]["cpu"]["triple"] != target.cpu.triple:
        raise ConfigError(f"{folder}: built for {m['target']} ({m['target_spec']['cpu']['triple']}), which this "
                          "machine cannot run natively: use trp-edge deploy --target "
                          f"{m['target']} with a device, or --emulate")
    cfg = cfg or DeployConfig(target=target_name, local=True)
    job, files, parts = plan_job([(Path(m["source"]), folder)], cfg.threads or target.run_threads, cfg)
    return write_report(make_report(parts[0], target, run_local(job, files), transport="local", emulated=False),
                        Path(cfg.reports))


# ----------------------------------------------------------------------------------------------- report


def _checked(result: dict[str, Any], target: Target) -> None:
    if result.get("error"):
        raise DeviceError(f"{target.name}/{result.get('runtime')}: {result['error']}")
    failed = {v: a["error"] for v, a in result["artifacts"].items() if "error" in a}
    if failed:
        raise DeviceError(f"{target.name}/{result['runtime']}: " + "; ".join(f"{v}: {e}" for v, e in failed.items()))


def make_report(part: Part, target: Target, result: dict[str, Any], *, transport: str,
                emulated: bool) -> dict[str, Any]:
    """The deploy report of one compress output from the device's answer to the job."""
    _checked(result, target)
    model, folder = part.model, part.folder
    result = {**result, "artifacts": {k: result["artifacts"][v] for k, v in part.variants.items()},
              "timing": {k: result["timing"][v] for k, v in part.variants.items()}}
    src = CompressReport.read(model / "report.json")
    manifest = load_manifest(folder)
    d, c = result["timing"]["dense"], result["timing"]["compressed"]
    speedup = d["median_ms"] / c["median_ms"]
    rep: dict[str, Any] = {
        "target": target.name, "runtime": result["runtime"], "model": src.model, "name": model.resolve().name,
        "model_dir": str(model), "scheme": src.scheme,
        "created": dt.datetime.now().isoformat(timespec="seconds"), "device": result["device"],
        "emulated": emulated, "transport": transport, "threads": result["threads"],
        "mac_speedup": src.mac_speedup,
        "dense": {**d, "macs": src.dense["macs"], "max_abs_diff": result["artifacts"]["dense"]["max_abs_diff"]},
        "compressed": {**c, "macs": src.compressed["macs"],
                       "max_abs_diff": result["artifacts"]["compressed"]["max_abs_diff"]},
        "latency_speedup": speedup, "efficiency": speedup / src.mac_speedup,
        "layers": [], "protocol": result.get("protocol"), "build": str(folder),
        "artifacts": {a["variant"]: {"file": a["file"], "sha256": a["sha256"]} for a in manifest["artifacts"]
                      if a["precision"] == "fp32" and a["device"] == "cpu"},
    }
    if emulated:
        rep["note"] = ("EMULATED: timings come from qemu-user on this x86 machine and say nothing about device "
                       "latency; this run checks correctness on the target's CPU architecture")
    _add_layers(rep, model, src, result)
    _add_prediction(rep, src, d, c)
    return rep


def _add_layers(rep: dict[str, Any], model: Path, src: CompressReport, result: dict[str, Any]) -> None:
    from .layers import per_layer

    if result.get("ops_note"):
        rep["layers_note"] = result["ops_note"]
    ops = {v: a.get("ops") for v, a in result["artifacts"].items()}
    if ops.get("dense") and ops.get("compressed"):
        rep.update(per_layer(model, src, ops["dense"], ops["compressed"]))
    elif not rep.get("layers_note"):
        rep["layers_note"] = "; ".join(f"{v}: {a['ops_error']}" for v, a in result["artifacts"].items()
                                       if a.get("ops_error")) or "no per-op timings"


def _add_prediction(rep: dict[str, Any], src: CompressReport, d: dict[str, Any], c: dict[str, Any]) -> None:
    """What the latency table predicted for the convs, against the measured whole net."""
    rep["latency_table"] = src.latency_table
    # layers the calibration guard kept dense (their fastest pair was not faster than the dense conv)
    rep["kept_dense_by_guard"] = [la["name"] for la in src.layers if (la.get("reason") or "").startswith("calibrated")]
    pred = [la.get("predicted_ms") for la in src.layers]
    if rep["latency_table"] and pred and all(p is not None for p in pred):
        dense_pred = sum(la.get("dense_ms") or 0.0 for la in src.layers)
        rep["prediction"] = {"compressed_conv_ms": sum(pred), "dense_conv_ms": dense_pred,
                             "latency_speedup": dense_pred / sum(pred),
                             # the table times each conv alone; the net adds pooling, the classifier and adds
                             "measured_compressed_ms": c["median_ms"], "measured_dense_ms": d["median_ms"],
                             "error": c["median_ms"] / sum(pred) - 1.0}


def summary_row(rep: dict[str, Any]) -> dict[str, Any]:
    """One model's line in a side-by-side comparison."""
    return {"name": rep["name"], "model_dir": rep["model_dir"], "scheme": rep["scheme"],
            "latency_table": rep.get("latency_table"), "mac_speedup": rep["mac_speedup"],
            "dense_ms": rep["dense"]["median_ms"], "compressed_ms": rep["compressed"]["median_ms"],
            "latency_speedup": rep["latency_speedup"], "efficiency": rep["efficiency"],
            "slower_layers": sum(1 for la in rep["layers"] if la.get("slower")) if rep["layers"] else None,
            "kept_dense_by_guard": len(rep.get("kept_dense_by_guard") or []),
            "predicted_ms": (rep.get("prediction") or {}).get("compressed_conv_ms")}


