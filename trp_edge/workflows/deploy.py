"""`trp-edge deploy` and `trp-edge profile`: build (or reuse) the dense and compressed artifacts for a target,
run them on the device, and write the latency report. Orchestration only: how a job reaches the device is
trp_edge.transport, how the device runs it trp_edge.device.bench, how a report is written trp_edge.report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import capabilities
from ..config import BuildConfig, DeployConfig
from ..contracts import CompressReport
from ..errors import ConfigError, ContractError, InputError, MissingTool
from ..report import write_report
from ..targets import Target, load_target, resolve_threads
from ..transport import open_session, resolve, run_local
from .build import build, load_manifest, parse_runtimes, resolve_source, source_digests
from .deploy_report import Part, make_report, summary_row

log = logging.getLogger(__name__)

def latest_model(root: Path = Path("trp-edge-out")) -> Path:
    found = sorted(root.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"no trp-edge compress output under {root}/: run trp-edge compress first or pass --model")
    return found[-1].parent


# ---------------------------------------------------------------------------------------------- build


def ensure_built(model: Path, target: Target, runtime: str, cfg: DeployConfig, int8: bool = False,
                 threads: int | None = None) -> Path:
    """The runtime folder of MODEL/build/<target>/, reused when it was built from the same ONNX files with
    the same tuning budget (and INT8 artifacts when `int8`) and, when tuned, tuned at the `threads` deploy runs
    at (default: cfg's, resolved); else built now, tuning at `threads`."""
    threads = resolve_threads(cfg.threads, target) if threads is None else threads
    folder = model / "build" / target.name / runtime
    if _reusable(folder, model, runtime, cfg, int8, threads):
        log.info("%s/%s: reusing the build in %s", target.name, runtime, folder)
        return folder
    # INT8 accuracy on the whole test set the model was compressed with (capped by its size)
    build(BuildConfig(model=str(model), target=target.name, runtimes=runtime, tune_trials=cfg.tune_trials,
                      tune_minutes=cfg.tune_minutes, tuning_db=cfg.tuning_db, int8=int8, eval_images=10000,
                      emulate=cfg.emulate or target.native, **cfg.reach, tune_emulated=cfg.emulate, threads=threads))
    return folder


def _reusable(folder: Path, model: Path, runtime: str, cfg: DeployConfig, int8: bool, threads: int) -> bool:
    """Whether the build in `folder` was made from the same ONNX files with the same tuning budget, tuned at
    `threads` when tuned (reusable), and with INT8 artifacts when `int8`. A folder with no build, or an
    incomplete one, is built again; a manifest of a newer trp-edge is refused (ContractError), not built over."""
    if not (folder / "manifest.json").is_file():
        return False
    try:
        m = load_manifest(folder)
    except ContractError:
        raise
    except InputError:
        return False
    c = m.config
    same = (m.source_sha256 == source_digests(resolve_source(model), runtime)
            and reusable(c, cfg, threads) and (c.get("int8") or not int8))
    return bool(same) and all((folder / a["file"]).is_file() for a in m.artifacts)


def reusable(built: dict[str, Any], cfg: DeployConfig, threads: int) -> bool:
    """Whether a build made with config `built` (its manifest's) serves a deploy at `threads`: the same tuning
    budget, and a tuned build tuned at those threads (an untuned one runs at any)."""
    trials, minutes = built.get("tune_trials"), built.get("tune_minutes", 0.0)
    if (trials, minutes) != (cfg.tune_trials, cfg.tune_minutes):
        return False
    return (trials == 0 and minutes == 0) or built.get("threads") == threads


def precisions(cfg: DeployConfig, runtime: str, planned: tuple[str, ...]) -> tuple[str, ...]:
    """The precisions deploy times with `runtime`: --precision, else those compress chose the ranks for (`planned`,
    from report.json), so stages agree by default; INT8 only where the runtime builds it (ORT, TFLite)."""
    return tuple(p for p in cfg.precision or planned if capabilities(runtime).built_at(p))


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
                    variants.setdefault((prec, api), {})[a["variant"]] = seen[same]
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


def references(model: Path, runtime: str, target: Target, folder: Path, cfg: DeployConfig,
               threads: int) -> dict[str, tuple[Path, str]] | None:
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
            built = ensure_built(model, target, ref, cfg, threads=threads)
            (a,) = [a for a in load_manifest(built)["artifacts"]
                    if (a["variant"], a["precision"], a["device"]) == ("compressed", "fp32", "cpu")]
            refs[ref] = (built / a["file"], ref)
        except (ConfigError, InputError, MissingTool) as e:  # the reference runtime is not installed here
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
    # the fastest compressed deployment against the fastest dense one of this run (`fastest`), or None
    fastest: dict[str, Any] | None = None

    def __iter__(self):  # `for path in deploy(cfg)`, as when deploy returned the list
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)


def deploy(cfg: DeployConfig | None = None, /, *, boards: int | None = None, **options: Any) -> DeployResult:
    """Deploy the model (and each --compare model, timed in the same alternating run) with every runtime;
    `cfg` a DeployConfig, or its options as keywords. Returns the report files written. `boards`: the runtimes'
    runs spread over that many boards of the tracker (0: every free one; trp_edge.transport_fleet), each runtime's
    dense and compressed models still timed side by side on one board, in one job."""
    cfg = DeployConfig.of(cfg, **options)
    target = load_target(cfg.target)
    if cfg.local and not target.native:
        raise ConfigError(f"--local runs on this machine, which is not {target.name} ({target.cpu.triple}): use "
                          "--target host, --emulate for a correctness run, or a device connection")
    models = [_model_dir(cfg.model) if cfg.model else latest_model()] + [_model_dir(c) for c in cfg.compare]
    runtimes = parse_runtimes(cfg.runtimes, target)
    conn = None if cfg.local or cfg.emulate else resolve(target, **cfg.reach)
    threads = resolve_threads(cfg.threads, target)
    planned = CompressReport.read(models[0] / "report.json").planned_precisions

    def plan(rt: str):
        precs = precisions(cfg, rt, planned)
        if cfg.precision is None:
            log.info("%s/%s: timing %s: %s was compressed for %s (compress --precision); pass --precision to time "
                     "others", target.name, rt, ", ".join(precs), models[0].name, ", ".join(planned))
        folders = [(m, ensure_built(m, target, rt, cfg, "int8" in precs, threads)) for m in models]
        refs = references(folders[0][0], rt, target, folders[0][1], cfg, threads)
        return plan_job(folders, threads, cfg, precs, refs)

    written: list[Path] = []
    mine: list[tuple[Path, dict[str, Any]]] = []  # the deployed model's report per runtime and precision
    if boards is not None and conn is None:
        raise ConfigError("--boards spreads the runs over the boards of a tracker: drop --local/--emulate, pass "
                          "--tracker")
    if boards is not None and conn is not None:
        from ..transport_fleet import open_fleet
        from .in_net import fan_out

        plans = [plan(rt) for rt in runtimes]  # built here first, then timed on the boards at once
        with open_fleet(conn, boards, cfg.timeout) as s:
            results = list(fan_out(s.workers, lambda p: s.call("bench", p[0], p[1]), plans))
        for rt, (_, _, parts), result in zip(runtimes, plans, results, strict=True):
            written += _write_reports(rt, parts, result, s, target, cfg, mine)
        return DeployResult(tuple(written), fastest(mine))
    for rt in runtimes:
        job, files, parts = plan(rt)
        # one session per runtime: --timeout bounds each runtime's run
        with open_session(target, local=cfg.local, emulate=cfg.emulate, conn=conn, timeout=cfg.timeout) as s:
            result = s.call("bench", job, files)
        written += _write_reports(rt, parts, result, s, target, cfg, mine)
    return DeployResult(tuple(written), fastest(mine))


def _write_reports(rt: str, parts, result: dict[str, Any], s, target: Target, cfg: DeployConfig,
                   mine: list[tuple[Path, dict[str, Any]]]) -> list[Path]:
    """The reports of one runtime's run; the deployed model's (parts[0]) also go to `mine` (fastest)."""
    written = []
    for key in parts[0].variants:
        prec, api = key
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
        mine.append((written[-len(reps)], reps[0]))
    return written


def fastest(mine: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any] | None:
    """What a user asks of a deploy run: how much faster the fastest compressed deployment measured on this device
    is than the fastest dense one (each named by runtime, precision and threads). Written into each of the run's
    reports of the deployed model as "fastest" and returned; None when the run timed fewer than two deployments."""
    if len(mine) < 2:
        return None
    from ..contracts import DEPLOY_REPORT, write_json

    def best(variant: str) -> dict[str, Any]:
        r = min((r for _, r in mine), key=lambda r: r[variant]["median_ms"])
        return {"runtime": r["runtime"], "precision": r.get("precision", "fp32"), "threads": r["threads"],
                "median_ms": r[variant]["median_ms"]}

    out = {"compressed": best("compressed"), "dense": best("dense"), "deployments": len(mine),
           "note": "each runtime timed in its own alternating run on this device"}
    out["speedup"] = out["dense"]["median_ms"] / out["compressed"]["median_ms"]
    for path, rep in mine:
        rep["fastest"] = out
        write_json(path, DEPLOY_REPORT.stamp(rep))
    return out


def fastest_line(f: dict[str, Any]) -> str:
    c, d = f["compressed"], f["dense"]
    return (f"fastest compressed {c['runtime']} {c['precision']} ({c['threads']} thread(s)) {c['median_ms']:.3f} ms "
            f"against fastest dense {d['runtime']} {d['precision']} {d['median_ms']:.3f} ms: {f['speedup']:.2f}x "
            f"({f['deployments']} deployments timed)")


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
    job, files, parts = plan_job([(Path(m["source"]), folder)], resolve_threads(cfg.threads, target), cfg)
    return write_report(make_report(parts[0], target, run_local(job, files), transport="local", emulated=False),
                        Path(cfg.reports))
