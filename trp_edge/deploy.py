"""`trp-edge deploy` and `trp-edge profile`: build (or reuse) the dense and compressed artifacts for a target,
run them on the device, and write the latency report.

Transports, one job format (trp_edge.device.bench): in this process (`--local`), the emulated aarch64
python (`--emulate`: correctness only, every timing labelled emulated), or a `trp-edge serve` reached
over TVM RPC, directly (host:port) or through a tracker (key). The connection comes from the flags, else
from the target file, else from $TRP_EDGE_TRACKER (HOST:PORT, with $TRP_EDGE_KEY or the target's key) or
$TRP_EDGE_RPC (HOST:PORT)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .build import build, load_manifest, sha256
from .config import BuildConfig, DeployConfig
from .errors import ConfigError, InputError, TrpEdgeError
from .targets import Target, load_target

log = logging.getLogger(__name__)

SERVE_HINT = ("start it on the device with `trp-edge serve --host 0.0.0.0 --port {port}` (see README: "
              "serving from a Raspberry Pi)")


class DeviceError(TrpEdgeError):
    """The device could not be reached, refused the session, or did not answer in time."""


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


def localized(job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """The job with absolute paths, for a run on this machine's file system (in-process or under qemu)."""
    arts = [{**a, **{k: str(files[a[k]].resolve()) for k in ("file", "reference") if k in a}}
            for a in job["artifacts"]]
    return {**job, "artifacts": arts}


# -------------------------------------------------------------------------------------------- transports


def run_local(job: dict[str, Any], files: dict[str, Path], kind: str = "bench") -> dict[str, Any]:
    from .device.bench import JOBS

    return JOBS[kind](localized(job, files), Path.cwd())


def run_emulated(job: dict[str, Any], files: dict[str, Path], target: Target, timeout: float,
                 kind: str = "bench") -> dict[str, Any]:
    from .emulate import can_emulate, run_module

    why = can_emulate(target)
    if why:
        raise ConfigError(f"--emulate: cannot run {target.name} artifacts here ({why})")
    folder = files[job["artifacts"][0]["file"]].parent
    return run_module("trp_edge.device.bench", localized(job, files), folder, target, timeout, args=(kind,))


@dataclass
class Connection:
    host: str | None = None
    port: int | None = None
    tracker: str | None = None
    key: str = ""

    def describe(self) -> str:
        return f"tracker {self.tracker} key {self.key!r}" if self.tracker else f"{self.host}:{self.port}"


def connection(cfg: DeployConfig, target: Target) -> Connection:
    """Flags, else the target file, else $TRP_EDGE_TRACKER / $TRP_EDGE_RPC."""
    if cfg.tracker:
        return Connection(tracker=cfg.tracker, key=cfg.key or target.rpc.key or target.name)
    if cfg.host:
        return Connection(host=cfg.host, port=cfg.port or target.rpc.port, key=cfg.key or "")
    if target.rpc.tracker:
        return Connection(tracker=target.rpc.tracker, key=cfg.key or target.rpc.key or target.name)
    if target.rpc.host:
        return Connection(host=target.rpc.host, port=cfg.port or target.rpc.port, key=cfg.key or "")
    if os.environ.get("TRP_EDGE_TRACKER"):
        return Connection(tracker=os.environ["TRP_EDGE_TRACKER"],
                          key=cfg.key or os.environ.get("TRP_EDGE_KEY") or target.rpc.key or target.name)
    if os.environ.get("TRP_EDGE_RPC"):
        h, _, p = os.environ["TRP_EDGE_RPC"].rpartition(":")
        return Connection(host=h, port=int(p), key=cfg.key or "")
    raise ConfigError(f"no device connection for {target.name}: pass --host H --port P or --tracker H:P --key K, "
                      f"set [rpc] in {target.path}, or use --local / --emulate; "
                      + SERVE_HINT.format(port=target.rpc.port))


def _connect(conn: Connection, timeout: float, handshake: float = 60.0):
    """Open the session in a daemon thread so a server that accepts the socket but never answers (a wedged
    listener, a wrong port) becomes an error after `handshake` seconds instead of a hang."""
    import threading

    from tvm import rpc

    box: dict[str, Any] = {}

    def go():
        try:
            if conn.tracker:
                h, _, p = conn.tracker.rpartition(":")
                tracker = rpc.connect_tracker(h, int(p))
                box["sess"] = tracker.request(conn.key, priority=1, session_timeout=timeout, max_retry=2)
            else:
                box["sess"] = rpc.connect(conn.host, conn.port, key=conn.key, session_timeout=timeout)
        except Exception as e:  # noqa: BLE001 - socket errors, RPC errors and tracker errors alike
            box["error"] = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(handshake)
    if "sess" in box:
        return box["sess"]
    why = box.get("error", f"no answer within {handshake:.0f} s")
    raise DeviceError(f"cannot open a session on {conn.describe()} ({why}); "
                      + SERVE_HINT.format(port=conn.port or 9090))


@contextmanager
def rpc_session(conn: Connection, timeout: float):
    """A session on the device's `trp-edge serve`; yields call(kind, job, files) -> result, which uploads the
    files, runs trp_edge.<kind> on them there and removes them again."""
    sess = _connect(conn, timeout)

    def call(kind: str, job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
        try:
            try:
                for name, path in files.items():
                    sess.upload(str(path), name)
            except Exception as e:  # noqa: BLE001
                raise DeviceError(f"{conn.describe()} refused the upload "
                                  f"({str(e).strip().splitlines()[-1][:200]})") from None
            try:
                fn = sess.get_function(f"trp_edge.{kind}")
            except Exception:  # noqa: BLE001
                raise DeviceError(f"{conn.describe()} is a TVM RPC server without trp-edge's trp_edge.{kind}; run "
                                  "`trp-edge serve` (of this version) there instead of tvm.exec.rpc_server") from None
            try:
                return json.loads(fn(json.dumps(job)))
            except Exception as e:  # noqa: BLE001
                msg = str(e)
                if "Timeout" in msg or "timeout" in msg or "expired" in msg:
                    raise DeviceError(f"{conn.describe()}: the run took longer than --timeout {timeout:.0f} s") \
                        from None
                raise DeviceError(f"{conn.describe()}: the run failed ({msg.strip().splitlines()[-1][:200]})") \
                    from None
        finally:
            try:
                for name in files:
                    sess.remove(name)
            except Exception:  # noqa: BLE001 - the session may be gone already
                pass

    yield call


def run_rpc(job: dict[str, Any], files: dict[str, Path], conn: Connection, timeout: float) -> dict[str, Any]:
    with rpc_session(conn, timeout) as call:
        return call("bench", job, files)


# ----------------------------------------------------------------------------------------------- deploy


def _model_dir(path: str | Path) -> Path:
    model = Path(path)
    if not (model / "report.json").is_file():
        raise InputError(f"{model}: not a trp-edge compress output (no report.json)")
    return model


def deploy(cfg: DeployConfig) -> list[Path]:
    """Deploy the model (and each --compare model, timed in the same alternating run) with every runtime;
    returns the report files written, the deployed model's first for each runtime."""
    from .build import parse_runtimes

    target = load_target(cfg.target)
    if cfg.local and not target.native:
        raise ConfigError(f"--local runs on this machine, which is not {target.name} ({target.cpu.triple}): use "
                          "--target host, --emulate for a correctness run, or a device connection")
    models = [_model_dir(cfg.model) if cfg.model else latest_model()] + [_model_dir(c) for c in cfg.compare]
    runtimes = parse_runtimes(cfg.runtimes, target)
    conn = None if cfg.local or cfg.emulate else connection(cfg, target)
    threads = cfg.threads or target.run_threads
    written = []
    for rt in runtimes:
        job, files, parts = plan_job([(m, ensure_built(m, target, rt, cfg)) for m in models], threads, cfg)
        if cfg.local:
            result, transport = run_local(job, files), "local"
        elif cfg.emulate:
            result, transport = run_emulated(job, files, target, cfg.timeout), "emulated (qemu-user)"
        else:
            result, transport = run_rpc(job, files, conn, cfg.timeout), f"rpc ({conn.describe()})"
        reps = [make_report(p, target, result, transport=transport, emulated=cfg.emulate) for p in parts]
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


def make_report(part: Part, target: Target, result: dict[str, Any], *, transport: str,
                emulated: bool) -> dict[str, Any]:
    from .layers import per_layer

    if result.get("error"):
        raise DeviceError(f"{target.name}/{result.get('runtime')}: {result['error']}")
    failed = {v: a["error"] for v, a in result["artifacts"].items() if "error" in a}
    if failed:
        raise DeviceError(f"{target.name}/{result['runtime']}: " + "; ".join(f"{v}: {e}" for v, e in failed.items()))
    model, folder = part.model, part.folder
    result = {**result, "artifacts": {k: result["artifacts"][v] for k, v in part.variants.items()},
              "timing": {k: result["timing"][v] for k, v in part.variants.items()}}
    src = json.loads((model / "report.json").read_text())
    manifest = load_manifest(folder)
    d, c = result["timing"]["dense"], result["timing"]["compressed"]
    speedup = d["median_ms"] / c["median_ms"]
    rep: dict[str, Any] = {
        "target": target.name, "runtime": result["runtime"], "model": src["model"], "name": model.resolve().name,
        "model_dir": str(model), "scheme": src.get("scheme"),
        "created": dt.datetime.now().isoformat(timespec="seconds"), "device": result["device"],
        "emulated": emulated, "transport": transport, "threads": result["threads"],
        "mac_speedup": src["mac_speedup"],
        "dense": {**d, "macs": src["dense"]["macs"], "max_abs_diff": result["artifacts"]["dense"]["max_abs_diff"]},
        "compressed": {**c, "macs": src["compressed"]["macs"],
                       "max_abs_diff": result["artifacts"]["compressed"]["max_abs_diff"]},
        "latency_speedup": speedup, "efficiency": speedup / src["mac_speedup"],
        "layers": [], "protocol": result.get("protocol"), "build": str(folder),
        "artifacts": {a["variant"]: {"file": a["file"], "sha256": a["sha256"]} for a in manifest["artifacts"]
                      if a["precision"] == "fp32" and a["device"] == "cpu"},
    }
    if emulated:
        rep["note"] = ("EMULATED: timings come from qemu-user on this x86 machine and say nothing about device "
                       "latency; this run checks correctness on the target's CPU architecture")
    if result.get("ops_note"):
        rep["layers_note"] = result["ops_note"]
    ops = {v: a.get("ops") for v, a in result["artifacts"].items()}
    if ops.get("dense") and ops.get("compressed"):
        rep.update(per_layer(model, src, ops["dense"], ops["compressed"]))
    elif not rep.get("layers_note"):
        rep["layers_note"] = "; ".join(f"{v}: {a['ops_error']}" for v, a in result["artifacts"].items()
                                       if a.get("ops_error")) or "no per-op timings"
    rep["latency_table"] = ((src.get("config") or {}).get("decompose") or {}).get("latency_table")
    # layers the calibration guard kept dense (their fastest pair was not faster than the dense conv)
    rep["kept_dense_by_guard"] = [la["name"] for la in src["layers"]
                                  if (la.get("reason") or "").startswith("calibrated")]
    pred = [la.get("predicted_ms") for la in src["layers"]]
    if rep["latency_table"] and pred and all(p is not None for p in pred):
        dense_pred = sum(la.get("dense_ms") or 0.0 for la in src["layers"])
        rep["prediction"] = {"compressed_conv_ms": sum(pred), "dense_conv_ms": dense_pred,
                             "latency_speedup": dense_pred / sum(pred),
                             # the table times each conv alone; the net adds pooling, the classifier and adds
                             "measured_compressed_ms": c["median_ms"], "measured_dense_ms": d["median_ms"],
                             "error": c["median_ms"] / sum(pred) - 1.0}
    return rep


def summary_row(rep: dict[str, Any]) -> dict[str, Any]:
    """One model's line in a side-by-side comparison."""
    return {"name": rep["name"], "model_dir": rep["model_dir"], "scheme": rep["scheme"],
            "latency_table": rep.get("latency_table"), "mac_speedup": rep["mac_speedup"],
            "dense_ms": rep["dense"]["median_ms"], "compressed_ms": rep["compressed"]["median_ms"],
            "latency_speedup": rep["latency_speedup"], "efficiency": rep["efficiency"],
            "slower_layers": sum(1 for la in rep["layers"] if la.get("slower")) if rep["layers"] else None,
            "kept_dense_by_guard": len(rep.get("kept_dense_by_guard") or []),
            "predicted_ms": (rep.get("prediction") or {}).get("compressed_conv_ms")}


def comparison_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | scheme | latency table | MAC speedup | dense ms | compressed ms | latency speedup | "
             "efficiency | layers slower than dense | predicted conv ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sl = "n/a" if r["slower_layers"] is None else str(r["slower_layers"])
        lines.append(f"| {r['name']} | {r['scheme']} | {Path(r['latency_table']).name if r['latency_table'] else '-'} "
                     f"| {r['mac_speedup']:.2f}x | {r['dense_ms']:.3f} | {r['compressed_ms']:.3f} | "
                     f"{r['latency_speedup']:.2f}x | {r['efficiency']:.2f} | {sl} | {_ms(r['predicted_ms'])} |")
    return lines


def write_report(rep: dict[str, Any], root: Path) -> Path:
    from .report import plot_latency, write_json

    d = root / rep["target"]
    d.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = d / f"{rep['name']}-{rep['runtime']}-{stamp}"
    n = 1
    while stem.with_suffix(".json").exists():
        n += 1
        stem = d / f"{rep['name']}-{rep['runtime']}-{stamp}-{n}"
    rep["files"] = {"json": stem.name + ".json", "markdown": stem.name + ".md", "plot": stem.name + ".png"}
    write_json(stem.with_suffix(".json"), rep)
    stem.with_suffix(".md").write_text(markdown(rep))
    plot_latency([rep], stem.with_suffix(".png"))
    return stem.with_suffix(".json")


def markdown(rep: dict[str, Any]) -> str:
    d, c = rep["dense"], rep["compressed"]
    em = " — **EMULATED, not device latency**" if rep["emulated"] else ""
    lines = [f"# {rep['name']} on {rep['target']} ({rep['runtime']}, {rep['threads']} thread"
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
    if rep.get("note"):
        lines += ["", rep["note"]]
    pr = rep.get("prediction")
    if pr:
        lines += ["", f"Latency table {rep['latency_table']}: predicted {pr['compressed_conv_ms']:.3f} ms for the "
                  f"convs (dense {pr['dense_conv_ms']:.3f} ms, {pr['latency_speedup']:.2f}x); measured whole net "
                  f"{c['median_ms']:.3f} ms ({100 * pr['error']:+.1f}% against the prediction)."]
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


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def aggregate(root: Path) -> tuple[str, Path | None, list[dict[str, Any]]]:
    """`trp-edge report`: every report under ROOT in one table (the latest per device, runtime and model)
    and one plot."""
    from .report import plot_latency

    latest: dict[tuple[str, str, str, bool], dict[str, Any]] = {}
    for f in sorted(Path(root).glob("*/*.json"), key=lambda p: p.stat().st_mtime):
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if not {"target", "runtime", "dense", "compressed", "latency_speedup"} <= r.keys():
            continue
        key = (r["target"], r["runtime"], r.get("model_dir", r["model"]), r["threads"], r["emulated"])
        latest[key] = r
    rows = sorted(latest.values(), key=lambda r: (r["target"], r.get("name", r["model"]), r["runtime"], r["threads"]))
    if not rows:
        raise InputError(f"{root}: no trp-edge deploy reports found")
    lines = ["| device | model | scheme | runtime | threads | dense ms | compressed ms | latency speedup | "
             "MAC speedup | efficiency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dev = r["target"] + (" (emulated)" if r["emulated"] else "")
        lines.append(f"| {dev} | {r.get('name', r['model'])} | {r.get('scheme')} | {r['runtime']} | {r['threads']} | "
                     f"{r['dense']['median_ms']:.3f} | "
                     f"{r['compressed']['median_ms']:.3f} | {r['latency_speedup']:.2f}x | {r['mac_speedup']:.2f}x | "
                     f"{r['efficiency']:.2f} |")
    table = "\n".join(lines) + "\n"
    (Path(root) / "summary.md").write_text(table)
    png = Path(root) / "summary.png"
    plot_latency(rows, png, per_layer=False)
    return table, png, rows

