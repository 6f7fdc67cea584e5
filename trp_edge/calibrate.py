"""`trp-edge calibrate`: measured latency of every eligible conv of a model, dense and as low-rank pairs over
a grid of ranks and schemes, at the layer's real input shape, with the runtime and threads the deployment
will use. Latency is stepwise in the rank (vector widths, channel blocks: ONNX Runtime's NCHWc layout pads
a rank-2 conv to 16 output channels), which the energy rule cannot see.

Writes calibration/<target>/<runtime>/<model>.csv (layer, scheme, rank, shape, median_ms, p10_ms, p90_ms,
runs; rank 0 = the dense conv) and <model>.json (device identity, runtime versions, date, threads, input
shape, the layers' shapes). `load_table` refuses a table made for another target, runtime or shape.

Measured with ONNX Runtime, on this machine (`--local`) or on the device over the same RPC path as deploy
(`trp-edge serve` runs trp_edge.device.bench.calibrate there: numpy and onnxruntime, no torch)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DecomposeConfig, DeployConfig, ProfileConfig
from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

FORMAT = "trp-edge/calibration"
COLUMNS = ["layer", "scheme", "rank", "shape", "median_ms", "p10_ms", "p90_ms", "runs"]


def rank_grid(full: int, break_even: int) -> list[int]:
    """1, 2, 4, then multiples of 8 on a roughly geometric ladder, up to the break-even rank (the largest rank
    whose pair has fewer MACs than the dense conv), which is measured too: so every rank a plan can keep has a
    measured rank at or above it."""
    ladder = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024]
    top = max(min(full, break_even), 1)
    return sorted({k for k in ladder if k <= top} | {top})


def layer_shape(layer, in_c: int) -> str:
    m = layer.module
    return (f"{in_c}x{layer.in_hw[0]}x{layer.in_hw[1]}->{m.out_channels}x{layer.out_hw[0]}x{layer.out_hw[1]}"
            f"/k{m.kernel_size[0]}x{m.kernel_size[1]}s{m.stride[0]}x{m.stride[1]}")


def _write_onnx(module, example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["input"], dynamo=False)


@dataclass
class CalibrationResult:
    csv: Path
    header: Path
    rows: int
    seconds: float


def calibrate(model: str, target_name: str = "host", *, schemes: tuple[str, ...] = ("channel", "spatial"),
              runtime: str = "ort", threads: int | None = None, local: bool = False, out: str = "calibration",
              input_size: int | None = None, data: str | None = None, protocol: ProfileConfig | None = None,
              host: str | None = None, port: int | None = None, tracker: str | None = None, key: str | None = None,
              timeout: float = 1800.0) -> CalibrationResult:
    """Measure every eligible conv of MODEL on the target, one layer per device call (its dense conv and every
    pair, as small ONNX models timed in alternating blocks), here with `local`, else over RPC on the target's
    `trp-edge serve` (connection as for deploy). Writes the table and its header; returns where."""
    import contextlib
    import tempfile
    import time

    import torch

    from .deploy import DeviceError, connection, rpc_session, run_local
    from .lowrank import conv_layers, get_scheme, make_pair
    from .models import default_input_size, load_model
    from .report import write_json, write_text
    from .targets import load_target

    target = load_target(target_name)
    if runtime != "ort":
        raise ConfigError(f"calibration runtime {runtime!r} is not supported yet: use ort")
    for s in schemes:
        get_scheme(s)
    if not schemes:
        raise ConfigError("--schemes: name at least one of channel, spatial")
    if local and (host or tracker):
        raise ConfigError("--local measures here; drop --host/--tracker")
    if local and not target.native:
        raise ConfigError(f"--local measures this machine, which is not {target.name}: use --target host, or reach "
                          f"{target.name} over RPC (--host/--tracker, as for deploy)")
    conn = None
    if not local:
        conn = connection(DeployConfig(target=target.name, host=host, port=port, tracker=tracker, key=key,
                                       timeout=timeout), target)
    threads = threads or target.run_threads
    cfg = protocol or ProfileConfig(warmup=2, block=3, min_runs=9, min_seconds=0.05, max_seconds=10)
    ds = None
    if data:
        from .data import load_data

        ds = load_data(data)
    loaded = load_model(model, in_channels=ds.in_channels if ds else None, num_classes=ds.num_classes if ds else None)
    net, spec = loaded.model.eval(), loaded.spec
    if ds is not None:
        example = torch.zeros_like(ds.example[:1])
    else:
        size = input_size or default_input_size(spec)
        example = torch.zeros(1, spec["in_channels"], size, size)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    layers_meta: dict[str, Any] = {}
    device: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if conn is not None:
            try:
                call = stack.enter_context(rpc_session(conn, timeout))
            except DeviceError as e:
                raise DeviceError(f"{e}; or measure this machine with --local") if target.native else e from None
            where = f"rpc ({conn.describe()})"
        else:
            def call(kind, job, files):
                return run_local(job, files, kind)
            where = "local"
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trp-edge-cal-")))
        for layer in conv_layers(net, example, DecomposeConfig(scheme=schemes[0])):
            m = layer.module
            shape = layers_meta[layer.name] = layer_shape(layer, m.in_channels)
            ok = [s for s in schemes if get_scheme(s).ineligible(m) is None]
            if not ok:
                continue
            x = torch.randn(1, m.in_channels, *layer.in_hw)
            files = {"dense.onnx": tmp / "dense.onnx"}
            _write_onnx(m, x, files["dense.onnx"])
            arts = [{"variant": "dense", "file": "dense.onnx"}]
            for scheme in ok:
                sch = get_scheme(scheme)
                full = min(sch.to_matrix(m.weight.detach()).shape)
                cheaper = [k for k in range(1, full + 1) if sch.pair_macs(m, layer.in_hw, layer.out_hw, k)
                           < layer.macs_dense]  # past the break-even rank a pair is never chosen
                for k in rank_grid(full, max(cheaper)) if cheaper else []:
                    name = f"{scheme}-{k}.onnx"
                    files[name] = tmp / name
                    _write_onnx(make_pair(m, scheme, k, init=False), x, files[name])
                    arts.append({"variant": f"{scheme}:{k}", "file": name})
            job = {"runtime": runtime, "threads": threads, "protocol": cfg.to_dict(), "input_shape": list(x.shape),
                   "artifacts": arts}
            res = call("calibrate", job, files)
            if res.get("error"):
                raise DeviceError(f"{target.name}/{runtime}: {res['error']}")
            for v, err in res["errors"].items():
                log.warning("calibrate: %s %s failed on the device (%s); left out of the table", layer.name, v, err)
            device = res["device"]
            for v, t in res["timing"].items():
                scheme, _, k = v.partition(":")
                rows.append({"layer": layer.name, "scheme": scheme, "rank": int(k or 0), "shape": shape,
                             "median_ms": round(t["median_ms"], 5), "p10_ms": round(t["p10_ms"], 5),
                             "p90_ms": round(t["p90_ms"], 5), "runs": t["runs"]})
            log.info("calibrate: %s: dense %s ms, %d pairs", layer.name,
                     f"{res['timing']['dense']['median_ms']:.3f}" if "dense" in res["timing"] else "n/a",
                     len(res["timing"]) - ("dense" in res["timing"]))
            for f in files.values():
                f.unlink()
    d = Path(out) / target.name / runtime
    d.mkdir(parents=True, exist_ok=True)
    stem = d / loaded.name
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    header = {"format": FORMAT, "version": 1, "target": target.name, "runtime": runtime, "threads": threads,
              "model": loaded.name, "input_shape": list(example.shape), "layers": layers_meta,
              "schemes": list(schemes), "device": device, "transport": where,
              "date": dt.datetime.now().isoformat(timespec="seconds"), "protocol": cfg.to_dict()}
    write_text(stem.with_suffix(".csv"), buf.getvalue())
    write_json(stem.with_suffix(".json"), header)
    return CalibrationResult(stem.with_suffix(".csv"), stem.with_suffix(".json"), len(rows),
                             time.perf_counter() - t0)


@dataclass
class LatencyTable:
    header: dict[str, Any]
    rows: list[dict[str, Any]]

    def ranks(self, layer: str, scheme: str) -> dict[int, float]:
        """rank -> median ms of the layer's measured pairs in `scheme`."""
        return {r["rank"]: r["median_ms"] for r in self.rows if r["layer"] == layer and r["scheme"] == scheme}

    def latency(self, layer: str, scheme: str, rank: int) -> float | None:
        """Median ms of a layer as a pair at `rank` (scheme 'dense', rank 0: the dense conv)."""
        for r in self.rows:
            if r["layer"] == layer and r["scheme"] == scheme and r["rank"] == rank:
                return r["median_ms"]
        return None


def load_table(path: str | Path, *, target: str | None = None, runtime: str | None = None,
               layers: dict[str, str] | None = None) -> LatencyTable:
    """Read a calibration table (the .csv or its .json header) and refuse one that does not fit: another
    target or runtime, or layers whose shapes differ from the model's (`layers`: name -> layer_shape)."""
    p = Path(path)
    csv_path, json_path = p.with_suffix(".csv"), p.with_suffix(".json")
    if not csv_path.is_file() or not json_path.is_file():
        raise InputError(f"{p}: a calibration table needs both {csv_path.name} and {json_path.name} "
                         "(made by trp-edge calibrate)")
    header = json.loads(json_path.read_text())
    if header.get("format") != FORMAT:
        raise InputError(f"{json_path}: not a trp-edge calibration header")
    if target and header["target"] != target:
        raise InputError(f"{p}: measured on target {header['target']}, not {target}: calibrate on {target}")
    if runtime and header["runtime"] != runtime:
        raise InputError(f"{p}: measured with {header['runtime']}, not {runtime}: calibrate with that runtime")
    if layers is not None:
        bad = [n for n, s in layers.items() if header["layers"].get(n) != s]
        if bad:
            raise InputError(f"{p}: stale or for another model: layer {bad[0]} is {layers[bad[0]]} here but "
                             f"{header['layers'].get(bad[0], 'absent')} in the table; calibrate again")
    with open(csv_path, newline="") as f:
        rows = [{**r, "rank": int(r["rank"]), "median_ms": float(r["median_ms"]), "runs": int(r["runs"])}
                for r in csv.DictReader(f)]
    return LatencyTable(header, rows)
