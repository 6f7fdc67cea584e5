"""`trp-edge deploy` and `trp-edge profile`: build (or reuse) the dense and compressed artifacts for a target,
run them on the device, and write the latency report. Orchestration only: how a job reaches the device is
trp_edge.transport, how the device runs it trp_edge.device.bench, how a report is written trp_edge.report."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import capabilities
from ..config import BuildConfig, DeployConfig
from ..errors import ConfigError, DeviceError, InputError
from ..report import CompressReport, write_report
from ..targets import Target, load_target
from ..transport import open_session, resolve, run_local
from .build import build, load_manifest, parse_runtimes, resolve_source, source_digests

log = logging.getLogger(__name__)

def latest_model(root: Path = Path("trp-edge-out")) -> Path:
    found = sorted(root.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"no trp-edge compress output under {root}/: run trp-edge compress first or pass --model")
    return found[-1].parent


# ---------------------------------------------------------------------------------------------- build


def ensure_built(model: Path, target: Target, runtime: str, cfg: DeployConfig, int8: bool = False) -> Path:
    """The runtime folder of MODEL/build/<target>/, reused when it was built from the same ONNX files with
    the same tuning budget (and INT8 artifacts when `int8`), else built now."""
    folder = model / "build" / target.name / runtime
    try:
        m = load_manifest(folder)
        same = (m["source_sha256"] == source_digests(resolve_source(model), runtime)
                and m["config"]["tune_trials"] == cfg.tune_trials
                and m["config"].get("tune_minutes", 0.0) == cfg.tune_minutes and (m["config"]["int8"] or not int8))
        if same and all((folder / a["file"]).is_file() for a in m["artifacts"]):
            log.info("%s/%s: reusing the build in %s", target.name, runtime, folder)
            return folder
    except (InputError, KeyError, json.JSONDecodeError):
        pass
    # INT8 accuracy on the whole test set the model was compressed with (capped by its size)
    build(BuildConfig(model=str(model), target=target.name, runtimes=runtime, tune_trials=cfg.tune_trials,
                      tune_minutes=cfg.tune_minutes, tuning_db=cfg.tuning_db, int8=int8, eval_images=10000,
                      emulate=cfg.emulate or target.native, host=cfg.host, port=cfg.port, tracker=cfg.tracker,
                      key=cfg.key, tune_emulated=cfg.emulate))
    return folder


def precisions(cfg: DeployConfig, runtime: str) -> tuple[str, ...]:
    """The precisions deploy times with `runtime`: INT8 only where the runtime builds it (its capabilities)."""
    return tuple(p for p in cfg.precision.split(",") if p and capabilities(runtime).built_at(p))


def stage(precision: str, api: str = "cpu") -> str:
    """The key of one report's artifacts in a deploy run: the precision, and the TVM device API when not cpu
    ("fp32", "int8", "fp32@opencl")."""
    return precision if api == "cpu" else f"{precision}@{api}"


def split_stage(key: str) -> tuple[str, str]:
    precision, _, api = key.partition("@")
    return precision, api or "cpu"


@dataclass
class Part:
    """One compress output in a deploy run: where its build is and which job variants time it."""

    model: Path
    folder: Path
    label: str  # "" for the deployed model, a name for each --compare model
    variants: dict[str, dict[str, str]]  # stage -> "dense" / "compressed" -> the job variant that times it
    references: dict[str, str] = field(default_factory=dict)  # "untuned" / "ort" -> the job variant timing it


def plan_job(builds: list[tuple[Path, Path]], threads: int, cfg: DeployConfig,
             precs: tuple[str, ...] = ("fp32",), references: dict[str, tuple[Path, str]] | None = None,
             ) -> tuple[dict[str, Any], dict[str, Path], list[Part]]:
    """One job timing the artifacts of every (model, build folder) at each precision in alternating blocks,
    so models and precisions are compared side by side in one run: the CPU ones, and the GPU ones of a TVM
    build (which a device without that TVM device API skips). An artifact file shared by two models (the
    dense model both were compressed from) is timed once. `references` (label -> (file, runtime)) are other
    builds of the deployed model's compressed network timed in the same run (TVM: untuned, ORT). Returns the
    job, the files it names (name -> local path) and the parts."""
    files: dict[str, Path] = {}
    arts: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    parts: list[Part] = []
    labels: set[str] = set()
    runtime = None
    for i, (model, folder) in enumerate(builds):
        m = load_manifest(folder)
        runtime = runtime or m["runtime"]
        label = ""
        if i:
            label = model.resolve().name
            while label in labels or not label:
                label += f"-{i}"
        labels.add(label)
        ref = f"{i}-reference.npz" if i else "reference.npz"
        files[ref] = folder.parent / "reference.npz"
        variants: dict[str, dict[str, str]] = {}
        for prec in precs:
            apis = sorted({a["device"] for a in m["artifacts"] if a["precision"] == prec}, key=lambda d: d != "cpu")
            for api in apis or ["cpu"]:
                chosen = [a for a in m["artifacts"] if a["precision"] == prec and a["device"] == api]
                if {a["variant"] for a in chosen} != {"dense", "compressed"}:
                    if api != "cpu":
                        continue
                    raise InputError(f"{folder}: needs {prec} CPU artifacts of both the dense and the compressed "
                                     "model")
                for a in chosen:
                    same = _sameness(m, a["variant"], prec, api)
                    if same not in seen:
                        base = a["variant"] if prec == "fp32" else f"{prec}:{a['variant']}"
                        base = base if api == "cpu" else f"{api}:{base}"
                        name, fname = (f"{label}:{base}", f"{i}-{a['file']}") if i else (base, a["file"])
                        files[fname] = folder / a["file"]
                        arts.append({"variant": name, "file": fname, "device": api, "reference": ref,
                                     "key": a["variant"], "precision": prec})
                        seen[same] = name
                    variants.setdefault(stage(prec, api), {})[a["variant"]] = seen[same]
        parts.append(Part(model, folder, label, variants))
    for lab, (path, rt) in (references or {}).items():
        fname = f"ref-{lab}-{path.name}"
        files[fname] = path
        arts.append({"variant": f"ref:{lab}", "file": fname, "device": "cpu", "reference": "reference.npz",
                     "key": "compressed", "precision": "fp32", "runtime": rt, "timing_only": True})
        parts[0].references[lab] = f"ref:{lab}"
    job = {"runtime": runtime, "threads": threads, "protocol": {**cfg.protocol.to_dict(), "threads": threads},
           "layers": cfg.layers, "artifacts": arts}
    return job, files, parts


def _sameness(m: dict[str, Any], variant: str, prec: str, api: str) -> tuple:
    """When two builds' artifacts are one: runtimes do not write byte-identical files from one source (ORT's
    optimized graphs differ), so sameness is the source file's hash (an INT8 artifact's may be a model of its
    own), the precision, the device and the build settings."""
    digest = m["source_sha256"]
    return (digest.get(f"{variant}/{prec}", digest[variant]), prec, api, m["target"], m["runtime"],
            m["config"].get("tune_trials"), m["config"].get("tune_minutes"))


def references(model: Path, runtime: str, target: Target, folder: Path,
               cfg: DeployConfig) -> dict[str, tuple[Path, str]] | None:
    """What a deploy of a runtime with a reference (its capabilities: TVM's is ONNX Runtime) times its compressed
    model against, in the same run: the untuned module (kept by a tuned build) and the reference runtime's build
    (made now where the target has it), for the report's untuned / tuned / reference line. None for the others."""
    ref = capabilities(runtime).reference
    if ref is None:
        return None
    refs: dict[str, tuple[Path, str]] = {}
    untuned = (load_manifest(folder).get("tuning") or {}).get("untuned_reference")
    if untuned and (folder / untuned["file"]).is_file():
        refs["untuned"] = (folder / untuned["file"], runtime)
    if ref in target.runtimes:
        try:
            built = ensure_built(model, target, ref, cfg)
            (a,) = [a for a in load_manifest(built)["artifacts"]
                    if (a["variant"], a["precision"], a["device"]) == ("compressed", "fp32", "cpu")]
            refs[ref] = (built / a["file"], ref)
        except (ConfigError, InputError) as e:  # the reference runtime not installed here: the line says so
            log.warning("%s/%s: no %s reference (%s)", target.name, runtime, ref, e)
    return {k: v for k, v in refs.items() if v[0].is_file()}


# ----------------------------------------------------------------------------------------------- deploy


def _model_dir(path: str | Path) -> Path:
    model = Path(path)
    if not (model / "report.json").is_file():
        raise InputError(f"{model}: not a trp-edge compress output (no report.json)")
    return model


@dataclass(frozen=True)
class DeployResult:
    """What a deploy wrote: the report files, the deployed model's first for each runtime and precision."""

    reports: tuple[Path, ...]

    def __iter__(self):  # `for path in deploy(cfg)`, as when deploy returned the list
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)


def deploy(cfg: DeployConfig | None = None, /, **options: Any) -> DeployResult:
    """Deploy the model (and each --compare model, timed in the same alternating run) with every runtime;
    `cfg` a DeployConfig, or its options as keywords. Returns the report files written."""
    cfg = DeployConfig.of(cfg, **options)
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
        precs = precisions(cfg, rt)
        folders = [(m, ensure_built(m, target, rt, cfg, "int8" in precs)) for m in models]
        refs = references(folders[0][0], rt, target, folders[0][1], cfg)
        job, files, parts = plan_job(folders, threads, cfg, precs, refs)
        # one session per runtime: --timeout bounds each runtime's run
        with open_session(target, local=cfg.local, emulate=cfg.emulate, conn=conn, timeout=cfg.timeout) as s:
            result = s.call("bench", job, files)
        for key in parts[0].variants:
            prec, api = split_stage(key)
            skipped = {result.get("artifacts", {}).get(v, {}).get("skipped") for v in parts[0].variants[key].values()}
            if skipped - {None}:
                log.warning("%s/%s: the %s artifacts were not run: %s", target.name, rt, api, skipped.pop())
                continue
            reps = [make_report(p, target, result, transport=s.transport, emulated=s.emulated, precision=prec,
                                api=api) for p in parts if key in p.variants]
            if len(reps) > 1:
                comparison = [summary_row(r) for r in reps]
                for r in reps:
                    r["comparison"] = comparison
            written += [write_report(r, Path(cfg.reports)) for r in reps]
    return DeployResult(tuple(written))


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
    variants = part.variants[stage(precision, api)]
    _checked(result, target, variants)
    fp32_dense = result["timing"].get(part.variants.get("fp32", {}).get("dense", ""))
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
    if api == "cpu":  # latency tables are measured on the CPU
        _add_prediction(rep, src, d, c)
    if capabilities(result["runtime"]).reference:  # the tuned / untuned / reference line (report: "tvm")
        rep["tvm"] = _tvm_line(part, full, manifest, c["median_ms"], api)
    return rep


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
    """Top-1 per stage, when the model's data is known: trained (the dense model), decomposed, and "quantized":
    per variant (dense, compressed), the artifact of this precision as built for this runtime (on the build's
    evaluation images from the test set)."""
    out: dict[str, Any] = {"data": src.data, "trained": src.dense.get("accuracy"),
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


