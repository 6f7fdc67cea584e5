"""`trp-edge calibrate`: measured latency of every eligible conv of a model, dense and as low-rank pairs over
a grid of ranks and schemes, at the layer's real input shape, with the runtime and threads the deployment
will use. Latency is stepwise in the rank (vector widths, channel blocks: ONNX Runtime's NCHWc layout pads
a rank-2 conv to 16 output channels), which the energy rule cannot see.

Writes calibration/<target>/<runtime>/<model>.csv and its .json header (trp_edge.latency_table: the table's
format, and `load_table`, which refuses a table made for another target, runtime or shape).

Measured with ONNX Runtime, on this machine (`--local`) or on the device over the same transport as deploy
(`trp-edge serve` runs trp_edge.device.bench.calibrate there: numpy and onnxruntime, no torch).

Stages: load the model and its input -> per layer, write the dense conv and every pair of the grid as small
ONNX models and time them on the device in one job -> write the table."""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CalibrateConfig, DecomposeConfig
from .errors import ConfigError, DeviceError
from .latency_table import DENSE, LatencyTable, layer_shape
from .targets import Target, load_target
from .transport import Session, open_session, resolve

log = logging.getLogger(__name__)


def rank_grid(full: int, break_even: int) -> list[int]:
    """1, 2, 4, then multiples of 8 on a roughly geometric ladder, up to the break-even rank (the largest rank
    whose pair has fewer MACs than the dense conv), which is measured too: so every rank a plan can keep has a
    measured rank at or above it."""
    ladder = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024]
    top = max(min(full, break_even), 1)
    return sorted({k for k in ladder if k <= top} | {top})


@dataclass
class CalibrationResult:
    csv: Path
    header: Path
    rows: int
    seconds: float


def calibrate(cfg: CalibrateConfig) -> CalibrationResult:
    """Measure every eligible conv of cfg.model on the target, one layer per device call (its dense conv and
    every pair, as small ONNX models timed in alternating blocks), here with `local`, else over RPC on the
    target's `trp-edge serve`. Writes the table and its header; returns where."""
    target = load_target(cfg.target)
    if cfg.local and not target.native:
        raise ConfigError(f"--local measures this machine, which is not {target.name}: use --target host, or reach "
                          f"{target.name} over RPC (--host/--tracker, as for deploy)")
    conn = None if cfg.local else resolve(target, host=cfg.host, port=cfg.port, tracker=cfg.tracker, key=cfg.key)
    threads = cfg.threads or target.run_threads
    name, net, example = calibration_model(cfg)
    t0 = time.perf_counter()
    try:
        with open_session(target, local=cfg.local, conn=conn, timeout=cfg.timeout) as session:
            rows, shapes, device = measure_layers(net, example, cfg, session, target, threads)
    except DeviceError as e:
        if target.native and conn is not None:
            raise type(e)(f"{e}; or measure this machine with --local") from e
        raise
    header = {"target": target.name, "runtime": cfg.runtime, "threads": threads, "model": name,
              "input_shape": list(example.shape), "layers": shapes, "schemes": list(cfg.schemes), "device": device,
              "transport": session.transport, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "protocol": cfg.protocol.to_dict()}
    d = Path(cfg.out) / target.name / cfg.runtime
    d.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = LatencyTable(header, rows).write(d / name)
    return CalibrationResult(csv_path, json_path, len(rows), time.perf_counter() - t0)


def calibration_model(cfg: CalibrateConfig):
    """(name, model in eval mode, a zero input of the size the deployment feeds it)."""
    import torch

    from .data import free_size, load_data
    from .models import default_input_size, load_model

    ds = load_data(cfg.data) if cfg.data else None
    sized = ds is not None and not free_size(cfg.data)  # else the size is the model's, as compress makes it
    loaded = load_model(cfg.model, trust_pickle=cfg.trust_pickle, in_channels=ds.in_channels if ds else None,
                        num_classes=ds.num_classes if ds else None,
                        input_size=cfg.input_size or (ds.image_size if sized else None))
    size = ds.image_size if sized else cfg.input_size or default_input_size(loaded.spec)
    example = torch.zeros(1, loaded.spec["in_channels"], size, size)
    return loaded.name, loaded.model.eval(), example


def measure_layers(net, example, cfg: CalibrateConfig, session: Session, target: Target,
                   threads: int) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any]]:
    """Every conv's rows (one per measured variant), every conv's shape key, and the device's identity."""
    from .lowrank import conv_layers

    rows: list[dict[str, Any]] = []
    shapes: dict[str, str] = {}
    device: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trp-edge-cal-") as tmp:
        for layer in conv_layers(net, example, DecomposeConfig(scheme=cfg.schemes[0])):
            shapes[layer.name] = layer_shape(layer)
            job, files = layer_job(layer, cfg, threads, Path(tmp))
            if job is None:
                continue
            res = session.call("calibrate", job, files)
            for f in files.values():
                f.unlink()
            if res.get("error"):
                raise DeviceError(f"{target.name}/{cfg.runtime}: {res['error']}")
            device = res["device"]
            rows += layer_rows(layer.name, shapes[layer.name], res)
    return rows, shapes, device


def _write_onnx(module, example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["input"], dynamo=False)


def layer_job(layer, cfg: CalibrateConfig, threads: int, tmp: Path):
    """The device job timing one conv: its dense conv and, per scheme that can take it, a pair at every rank
    of the grid (past the break-even rank a pair is never chosen). (None, {}) when no scheme takes it."""
    import torch

    from .lowrank import get_scheme, make_pair

    m = layer.module
    ok = [s for s in cfg.schemes if get_scheme(s).ineligible(m) is None]
    if not ok:
        return None, {}
    x = torch.randn(1, m.in_channels, *layer.in_hw)
    files = {"dense.onnx": tmp / "dense.onnx"}
    _write_onnx(m, x, files["dense.onnx"])
    arts = [{"variant": DENSE, "file": "dense.onnx"}]
    for scheme in ok:
        sch = get_scheme(scheme)
        full = min(sch.to_matrix(m.weight.detach()).shape)
        cheaper = [k for k in range(1, full + 1) if sch.pair_macs(m, layer.in_hw, layer.out_hw, k) < layer.macs_dense]
        for k in rank_grid(full, max(cheaper)) if cheaper else []:
            name = f"{scheme}-{k}.onnx"
            files[name] = tmp / name
            _write_onnx(make_pair(m, scheme, k, init=False), x, files[name])
            arts.append({"variant": f"{scheme}:{k}", "file": name})
    job = {"runtime": cfg.runtime, "threads": threads, "protocol": cfg.protocol.to_dict(),
           "input_shape": list(x.shape), "artifacts": arts}
    return job, files


def layer_rows(name: str, shape: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    """The table rows of one layer from the device's answer; failed variants are left out with a warning."""
    for v, err in res["errors"].items():
        log.warning("calibrate: %s %s failed on the device (%s); left out of the table", name, v, err)
    rows = []
    for v, t in res["timing"].items():
        scheme, _, k = v.partition(":")
        rows.append({"layer": name, "scheme": scheme, "rank": int(k or 0), "shape": shape,
                     "median_ms": round(t["median_ms"], 5), "p10_ms": round(t["p10_ms"], 5),
                     "p90_ms": round(t["p90_ms"], 5), "runs": t["runs"]})
    dense = res["timing"].get(DENSE)
    log.info("calibrate: %s: dense %s ms, %d pairs", name, f"{dense['median_ms']:.3f}" if dense else "n/a",
             len(res["timing"]) - (dense is not None))
    return rows
