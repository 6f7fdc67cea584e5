"""`trp-edge calibrate`: measured latency of every eligible conv of a model, dense and as low-rank pairs over
a grid of ranks and schemes, at the layer's real input shape, with the runtime and threads the deployment
will use. Latency is stepwise in the rank (vector widths, channel blocks: ONNX Runtime's NCHWc layout pads
a rank-2 conv to 16 output channels), which the energy rule cannot see.

Writes calibration/<target>/<runtime>/<model>.csv (layer, scheme, rank, shape, median_ms, p10_ms, p90_ms,
runs; rank 0 = the dense conv) and <model>.json (device identity, runtime versions, date, threads, input
shape, the layers' shapes). `load_table` refuses a table made for another target, runtime or shape.

This version measures with ONNX Runtime on this machine (`--local`)."""

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

from .config import DecomposeConfig, ProfileConfig
from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

FORMAT = "trp-edge/calibration"
COLUMNS = ["layer", "scheme", "rank", "shape", "median_ms", "p10_ms", "p90_ms", "runs"]


def rank_grid(full: int, break_even: int) -> list[int]:
    """1, 2, 4, then multiples of 8 on a roughly geometric ladder, up to the break-even rank."""
    ladder = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024]
    top = min(full, break_even)
    out = [k for k in ladder if k <= top]
    return out or [1]


def layer_shape(layer, in_c: int) -> str:
    m = layer.module
    return (f"{in_c}x{layer.in_hw[0]}x{layer.in_hw[1]}->{m.out_channels}x{layer.out_hw[0]}x{layer.out_hw[1]}"
            f"/k{m.kernel_size[0]}x{m.kernel_size[1]}s{m.stride[0]}x{m.stride[1]}")


def _onnx_bytes(module, example) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buf, input_names=["input"], dynamo=False)
    return buf.getvalue()


def _ort_runner(model_bytes: bytes, x, threads: int):
    from .device.runner import load_ort

    run = load_ort(model_bytes, threads)
    return lambda: run(x)


@dataclass
class CalibrationResult:
    csv: Path
    header: Path
    rows: int
    seconds: float


def calibrate(model: str, target_name: str = "host", *, schemes: tuple[str, ...] = ("channel", "spatial"),
              runtime: str = "ort", threads: int | None = None, local: bool = True, out: str = "calibration",
              input_size: int | None = None, data: str | None = None,
              protocol: ProfileConfig | None = None) -> CalibrationResult:
    import time

    import torch

    from .lowrank import conv_layers, get_scheme, make_pair
    from .models import default_input_size, load_model
    from .profile import time_alternating
    from .targets import load_target

    target = load_target(target_name)
    if not local:
        raise ConfigError("calibrate measures on this machine in this version: pass --local (over RPC is planned)")
    if not target.native:
        raise ConfigError(f"--local measures this machine, which is not {target.name}: use --target host")
    if runtime != "ort":
        raise ConfigError(f"calibration runtime {runtime!r} is not supported yet: use ort")
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
    in_ch: dict[str, int] = {}
    for scheme in schemes:
        for layer in conv_layers(net, example, DecomposeConfig(scheme=scheme)):
            m = layer.module
            in_ch[layer.name] = m.in_channels
            shape = layer_shape(layer, m.in_channels)
            layers_meta[layer.name] = shape
            if layer.reason is not None:
                continue
            x = torch.randn(1, m.in_channels, *layer.in_hw)
            sch = get_scheme(scheme)
            full = min(sch.to_matrix(m.weight.detach()).shape)
            dense_macs = layer.macs_dense
            ks = [k for k in rank_grid(full, full) if sch.pair_macs(m, layer.in_hw, layer.out_hw, k) < dense_macs]
            runners = {"0": _ort_runner(_onnx_bytes(m, x), x.numpy(), threads)}
            for k in ks:
                runners[str(k)] = _ort_runner(_onnx_bytes(make_pair(m, scheme, k, init=False), x), x.numpy(), threads)
            timings = time_alternating(runners, cfg)
            for k, t in timings.items():
                if scheme != schemes[0] and k == "0":
                    continue  # the dense conv is measured once per layer
                rows.append({"layer": layer.name, "scheme": "dense" if k == "0" else scheme, "rank": int(k),
                             "shape": shape, "median_ms": round(t.median_ms, 5), "p10_ms": round(t.p10_ms, 5),
                             "p90_ms": round(t.p90_ms, 5), "runs": t.runs})
            log.info("calibrate: %s %s: dense %.3f ms, %d ranks", layer.name, scheme, timings["0"].median_ms, len(ks))
    import onnxruntime

    from .profile import host_identity

    d = Path(out) / target.name / runtime
    d.mkdir(parents=True, exist_ok=True)
    stem = d / loaded.name
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    stem.with_suffix(".csv").write_text(buf.getvalue())
    header = {"format": FORMAT, "version": 1, "target": target.name, "runtime": runtime, "threads": threads,
              "model": loaded.name, "input_shape": list(example.shape), "layers": layers_meta,
              "schemes": list(schemes), "device": {**host_identity(), "onnxruntime": onnxruntime.__version__},
              "date": dt.datetime.now().isoformat(timespec="seconds"), "protocol": cfg.to_dict()}
    stem.with_suffix(".json").write_text(json.dumps(header, indent=2))
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
