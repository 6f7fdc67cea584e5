"""`trp-edge calibrate`: measured latency of every eligible conv of a model, dense and as low-rank pairs over
a grid of ranks and schemes, at the layer's real input shape, with the runtime, precision and threads the
deployment will use. Latency is stepwise in the rank (vector widths, channel blocks: ONNX Runtime's NCHWc
layout pads a rank-2 conv to 16 output channels), which the energy rule cannot see.

Writes calibration/<target>/<runtime>/<stem>.csv and its .json header (trp_edge.latency_table: the table's
format, its key, and `load_table`, which refuses a table made for another deployment or shape).

Measured on this machine (`--local`) or on the device over the same transport as deploy (`trp-edge serve`
runs trp_edge.device.bench.calibrate there: numpy and the runtime, no torch):
- ort: each variant a small ONNX model; INT8 is static QDQ (as build quantizes), on random activations;
- tflite: each layer's whole grid is one .tflite with a signature per variant, written directly
  (backends.tflite_grid: no conversion per grid point); INT8 is full-integer. The whole net is converted
  with litert-torch, as build converts it.
Layers of the same shape are measured once. Each layer also times a near-empty model on its input (the
per-call overhead, scheme "call"), and the whole dense net is timed (header "net_ms"), so a whole-net
latency can be predicted from the table: net_ms - sum(dense convs) + sum(chosen pairs).

ONNX Runtime's rows are then timed again in place (header "in_net"): a layer alone is not the layer in the
net (at 2 threads a pair alone took 1.30x its time in the net, a dense conv 1.18x: ResNet-18's 2-thread
predictions missed by +20-31 %). The dense net, and per scheme and grid position j the net with every layer
at its j-th measured rank (net_grid: about 20 nets per scheme for ResNet-18), are each timed and profiled
(device job in_net; kernels summed per layer by the tags backends.ort.tag_layers puts in the node names),
and every dense conv and pair gets its in-net time, scaled by its net's timed over profiled latency. Where
the nets cannot be matched to the layers (a conv called twice) or do not run, the rows stay as timed alone.

Stages: load the model and its input -> per layer shape, lower the dense conv and every pair of the grid ->
time them on the device, one call per shape -> write the table."""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.tvm import lower_calibration
from ..config import SCHEME_NAMES, CalibrateConfig, CompressConfig, DecomposeConfig, calibration_root
from ..deployment import Deployment
from ..deployment import deployments as resolve_deployments
from ..errors import ConfigError, ConversionError, DeviceError, InputError
from ..latency_table import (
    CALL,
    DENSE,
    IN_NET_RUNTIMES,
    LatencyTable,
    layer_shape,
    load_table,
    machine_path,
    stale,
    table_path,
)
from ..targets import Target, load_target, resolve_threads
from ..transport import Session, open_session, resolve

log = logging.getLogger(__name__)

NET = "__net__"  # the group timing the whole dense net


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


def calibrate(cfg: CalibrateConfig | str | None = None, /, *, progress: bool = False,
              **options: Any) -> CalibrationResult:
    """Measure every eligible conv of cfg.model on the target (here with `local`, else over RPC on the target's
    `trp-edge serve`) and write the table and its header; returns where. `cfg` a CalibrateConfig, or its options
    as keywords."""
    cfg = CalibrateConfig.of(cfg, **options)
    name, net, example = calibration_model(cfg)
    return calibrate_model(cfg, name, net, example, progress=progress)


def calibrate_model(cfg: CalibrateConfig, name: str, net, example, *, progress: bool = False,
                    path: Path | None = None) -> CalibrationResult:
    """`calibrate` for a model already loaded (`net` in eval mode, `example` its batch-1 input), as compress
    calls it; cfg.model is not read. `path`: where the table goes instead of the deployment's (table_path, or
    beside another machine's table there: machine_path)."""
    target = load_target(cfg.target)
    if cfg.local and not target.native:
        raise ConfigError(f"--local measures this machine, which is not {target.name}: use --target host, or reach "
                          f"{target.name} over RPC (--host/--tracker, as for deploy)")
    conn = None if cfg.local else resolve(target, host=cfg.host, port=cfg.port, tracker=cfg.tracker, key=cfg.key)
    threads = resolve_threads(cfg.threads, target)
    t0 = time.perf_counter()
    try:
        with open_session(target, local=cfg.local, conn=conn, timeout=cfg.timeout) as session:
            rows, shapes, device, net_ms, in_net = measure_layers(net, example, cfg, session, target, threads,
                                                                  progress)
    except DeviceError as e:
        if target.native and conn is not None:
            raise type(e)(f"{e}; or measure this machine with --local") from e
        raise
    header = {"target": target.name, "runtime": cfg.runtime, "precision": cfg.precision, "threads": threads,
              "model": name, "input_shape": list(example.shape), "layers": shapes, "schemes": list(cfg.schemes),
              "net_ms": net_ms, "in_net": in_net, "device": device, "transport": session.transport,
              "date": dt.datetime.now().isoformat(timespec="seconds"), "protocol": cfg.protocol.to_dict()}
    if path is None:
        path = table_path(calibration_root(cfg.out), target.name, cfg.runtime, cfg.precision, threads, name)
        if target.native:  # another machine's table there is kept: this one's goes beside it
            path = machine_path(path, device)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = LatencyTable(header, rows).write(path.with_suffix(""))
    return CalibrationResult(csv_path, json_path, len(rows), time.perf_counter() - t0)


def calibration_model(cfg: CalibrateConfig):
    """(name, model in eval mode, a zero input of the size the deployment feeds it)."""
    import torch

    from ..data import free_size, load_data
    from ..models import default_input_size, load_model

    ds = load_data(cfg.data) if cfg.data else None
    sized = ds is not None and not free_size(cfg.data)  # else the size is the model's, as compress makes it
    loaded = load_model(cfg.model, trust_pickle=cfg.trust_pickle, in_channels=ds.in_channels if ds else None,
                        num_classes=ds.num_classes if ds else None,
                        input_size=cfg.input_size or (ds.image_size if sized else None))
    size = ds.image_size if sized else cfg.input_size or default_input_size(loaded.spec)
    example = torch.zeros(1, loaded.spec["in_channels"], size, size)
    return loaded.name, loaded.model.eval(), example


def _call_module():
    """A near-empty model on a layer's input: what one call of the runtime costs with that input."""
    from torch import nn

    class Call(nn.Module):
        def forward(self, x):
            return x[:, :1, :1, :1] * 1.0

    return Call()


def layer_grids(net, example, cfg: CalibrateConfig) -> tuple[dict[str, dict[str, Any]], dict[str, str],
                                                              dict[str, list[str]]]:
    """The modules to time, grouped per layer shape: {shape: {"input_shape", "variants": {variant: module}}}
    (variant "dense", "<scheme>:<rank>", "call"), plus the group NET (the whole dense net); every conv's shape
    key; and the layers of each shape."""
    from ..lowrank import conv_layers, get_scheme, make_pair

    groups: dict[str, dict[str, Any]] = {}
    shapes: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for layer in conv_layers(net, example, DecomposeConfig(scheme=cfg.schemes[0])):
        key = shapes[layer.name] = layer_shape(layer)
        m = layer.module
        ok = [s for s in cfg.schemes if get_scheme(s).ineligible(m) is None]
        if not ok:
            continue
        members.setdefault(key, []).append(layer.name)
        if key in groups:
            continue
        variants: dict[str, Any] = {DENSE: m, CALL: _call_module()}
        for scheme in ok:
            sch = get_scheme(scheme)
            full = min(sch.to_matrix(m.weight.detach()).shape)
            cheaper = [k for k in range(1, full + 1)
                       if sch.pair_macs(m, layer.in_hw, layer.out_hw, k) < layer.macs_dense]
            for k in rank_grid(full, max(cheaper)) if cheaper else []:
                variants[f"{scheme}:{k}"] = make_pair(m, scheme, k, init=False)
        groups[key] = {"input_shape": [1, m.in_channels, *layer.in_hw], "variants": variants}
    groups[NET] = {"input_shape": list(example.shape), "variants": {DENSE: net}, "order": list(shapes)}
    if cfg.runtime in IN_NET_RUNTIMES:
        groups[NET]["grid"] = net_grid(groups, members)
    return groups, shapes, members


def net_grid(groups: dict[str, dict[str, Any]], members: dict[str, list[str]]) -> dict[str, dict[str, tuple[str, int]]]:
    """The whole nets that time every measured pair in place: the dense net, then per scheme and grid position j
    the net with every layer that has a j-th measured rank in that scheme as its pair at that rank (the others
    dense). {variant: {layer: (scheme, rank)}}, "dense" first with no pairs."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for key, names in members.items():
        for variant in groups[key]["variants"]:
            scheme, _, k = variant.partition(":")
            for name in names if k else ():
                ranks.setdefault((name, scheme), []).append(int(k))
    grid: dict[str, dict[str, tuple[str, int]]] = {DENSE: {}}
    for scheme in dict.fromkeys(s for _, s in ranks):
        mine = {n: sorted(r) for (n, s), r in ranks.items() if s == scheme}
        for j in range(max(len(r) for r in mine.values())):
            grid[f"{scheme}@{j}"] = {n: (scheme, r[j]) for n, r in mine.items() if j < len(r)}
    return grid


def measure_layers(net, example, cfg: CalibrateConfig, session: Session, target: Target, threads: int,
                   progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any],
                                                    float | None, bool]:
    """Every conv's rows (one per measured variant), every conv's shape key, the device's identity, the
    whole dense net's latency, and whether the rows are as timed in place (in the whole nets of net_grid)."""
    from tqdm.auto import tqdm

    groups, shapes, members = layer_grids(net, example, cfg)
    rows: list[dict[str, Any]] = []
    device: dict[str, Any] = {}
    net_ms = None
    with tempfile.TemporaryDirectory(prefix="trp-edge-cal-") as tmp:
        lowered = LOWER[cfg.runtime](groups, cfg, Path(tmp))
        bar = tqdm(lowered.items(), desc=f"calibrate {cfg.runtime} {cfg.precision}", unit="shape",
                   disable=not progress)
        in_net: dict[tuple[str, str, int], dict[str, Any]] = {}
        for key, (arts, files) in bar:
            job = {"runtime": cfg.runtime, "threads": threads, "protocol": cfg.protocol.to_dict(),
                   "input_shape": groups[key]["input_shape"], "artifacts": arts}
            if key == NET:
                net_ms, in_net, device = _time_net(session, job, files, groups[NET], target)
                continue
            with _written(files) as paths:
                res = session.call("calibrate", job, paths)
            if res.get("error"):
                raise DeviceError(f"{target.name}/{cfg.runtime}: {res['error']}")
            device = res["device"]
            for name in members[key]:
                rows += layer_rows(name, key, res)
    placed = place(rows, in_net)
    return placed, shapes, device, net_ms, placed is not rows


Lowered = dict[str, Path | Callable[[], Path]]  # a file, or a function that writes it (_written)


@contextmanager
def _written(files: Lowered) -> Iterator[dict[str, Path]]:
    """The files of one call as paths: a file that lower_ort left as a function is written now and removed when
    the call is over, so the host holds one call's models at a time."""
    paths = {}
    try:
        for name, file in files.items():
            paths[name] = file() if callable(file) else file
        yield paths
    finally:
        for name, file in files.items():
            if callable(file) and name in paths:
                paths[name].unlink(missing_ok=True)


def _time_net(session: Session, job: dict[str, Any], files: Lowered, g: dict[str, Any],
              target: Target) -> tuple[float | None, dict[tuple[str, str, int], dict[str, Any]], dict[str, Any]]:
    """The whole dense net's latency, each layer as timed in place (in_net_rows; {} without the nets of
    net_grid, or when they did not run: a device whose trp-edge has no in_net job), and the device's identity.
    One net per call, so that a board holds one net's file at a time, and the host too (_written)."""
    dense = job["artifacts"][0]["file"]
    if len(job["artifacts"]) > 1:
        res: dict[str, Any] = {"nets": {}, "errors": {}}
        for a in job["artifacts"]:
            try:
                with _written({a["file"]: files[a["file"]]}) as paths:
                    one = session.call("in_net", {**job, "artifacts": [a]}, paths)
            except (DeviceError, ConversionError) as e:
                one = {"error": str(e)}
            res["nets"].update(one.get("nets") or {})
            res["errors"].update(one.get("errors") or {})
            res.setdefault("device", one.get("device"))
            if one.get("error"):
                res["error"] = one["error"]
                break
        in_net = in_net_rows(res, g)
        net = (res.get("nets") or {}).get(DENSE)
        if net is not None:
            return net["timing"]["median_ms"], in_net, res["device"]
        job = {**job, "artifacts": job["artifacts"][:1]}  # the dense net alone, as without the grid
    with _written({dense: files[dense]}) as paths:
        res = session.call("calibrate", job, paths)
    if res.get("error"):
        raise DeviceError(f"{target.name}/{job['runtime']}: {res['error']}")
    return res["timing"].get(DENSE, {}).get("median_ms"), {}, res["device"]


def in_net_rows(res: dict[str, Any], g: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(layer, scheme, rank) -> its row as timed in place: each net's per-layer profile, scaled by that net's
    timed latency over its profiled one (the profiler's own cost taken out). A dense conv from the dense net, a
    pair from its grid net. {} with a warning when a net failed: the table then keeps every layer as timed alone."""
    nets = res.get("nets") or {}
    failed = res.get("error") or "; ".join(f"{v}: {e}" for v, e in (res.get("errors") or {}).items())
    if failed or set(nets) != set(g["grid"]):
        log.warning("calibrate: the whole nets did not all run (%s): every layer is as timed alone",
                    str(failed or "missing").splitlines()[0][:200])
        return {}
    out = {}
    for variant, pairs in g["grid"].items():
        net = nets[variant]
        scale = net["timing"]["median_ms"] / net["total_ms"] if net["total_ms"] > 0 else 1.0
        for tag, t in net["layers"].items():
            name = g["order"][int(tag)]
            scheme, rank = pairs.get(name, (DENSE, 0))
            if (scheme == DENSE) == (variant == DENSE):
                out[(name, scheme, rank)] = {"median_ms": round(t["median_ms"] * scale, 5),
                                             "p10_ms": round(t["p10_ms"] * scale, 5),
                                             "p90_ms": round(t["p90_ms"] * scale, 5), "runs": t["runs"]}
    return out


def place(rows: list[dict[str, Any]], in_net: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with every dense conv and pair as timed in place (in_net_rows), when the nets timed them all; the
    per-call rows stay. Else the rows as timed alone, with a warning when there were nets."""
    timed = [r for r in rows if r["scheme"] != CALL]
    missing = [r for r in timed if (r["layer"], r["scheme"], r["rank"]) not in in_net]
    if not in_net or missing:
        if in_net:
            log.warning("calibrate: %s %s:%s was not found in its whole net: every layer is as timed alone",
                        missing[0]["layer"], missing[0]["scheme"], missing[0]["rank"])
        return rows
    return [r if r["scheme"] == CALL else {**r, **in_net[(r["layer"], r["scheme"], r["rank"])]} for r in rows]


def _write_onnx(module, shape, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), str(path), input_names=["input"], dynamo=False)


def _random_calib(shape, n: int = 8):
    import numpy as np

    return np.random.default_rng(0).standard_normal((n, *shape[1:])).astype(np.float32)


def lower_ort(groups: dict[str, dict[str, Any]], cfg: CalibrateConfig, tmp: Path) -> dict[str, tuple[list, Lowered]]:
    """Each variant one small ONNX model (INT8: quantized to QDQ as build does, on random activations: the
    latency of integer kernels does not depend on the values). {group: (artifacts, files)}, each file a function
    that writes it when its group's call comes (_written)."""
    from functools import partial

    out = {}
    for gi, (key, g) in enumerate(groups.items()):
        if key == NET and "grid" in g:
            out[key] = _lower_ort_nets(g, cfg, tmp)
            continue
        arts, files = [], {}
        for vi, (variant, module) in enumerate(g["variants"].items()):
            int8 = cfg.precision == "int8" and variant != CALL
            name = _onnx_name(f"{gi}-{vi}", int8)
            files[name] = partial(_lower_ort_model, module, g["input_shape"], tmp / name, int8)
            arts.append({"variant": variant, "file": name})
        out[key] = (arts, files)
    return out


def _onnx_name(stem: str, int8: bool) -> str:
    return f"{stem}{'.int8' if int8 else ''}.onnx"


def _lower_ort_model(module, shape, path: Path, int8: bool, tags: list[int] | None = None) -> Path:
    """`module` exported to `path` (named by _onnx_name); with `tags`, its nodes tagged by layer first
    (backends.ort.tag_layers); INT8: quantized to QDQ from the fp32 export, which goes."""
    from ..backends.ort import quantize_int8, tag_layers

    fp32 = path.with_name(path.name.replace(".int8", "")) if int8 else path
    _write_onnx(module, shape, fp32)
    if tags is not None:
        tag_layers(fp32, tags)
    if int8:
        quantize_int8(fp32, path, _random_calib(shape), path.parent)
        fp32.unlink()
    return path


def _lower_ort_nets(g: dict[str, Any], cfg: CalibrateConfig, tmp: Path):
    """The whole nets of net_grid as ONNX models whose nodes are tagged with their layer (backends.ort.tag_layers;
    INT8: quantized afterwards, as a layer's models are). The dense net is lowered now; every other net's file is a
    function that lowers it when its call comes (_time_net), so the host holds one net at a time (ResNet-18's 37
    nets took 0.8 GB of the host's disk at once). Only the dense net when the tags do not fit the export (a conv
    called twice, say): the table then has the layers as timed alone."""
    import copy
    from functools import partial

    from ..lowrank import make_pair

    net, order, int8 = g["variants"][DENSE], g["order"], cfg.precision == "int8"

    def lower(vi: int, pairs: dict[str, tuple[str, int]], tag: bool = True) -> Path:
        model = copy.deepcopy(net) if pairs else net
        for name, (scheme, k) in pairs.items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make_pair(model.get_submodule(name), scheme, k, init=False))
        tags = [i for i, n in enumerate(order) for _ in range(2 if n in pairs else 1)] if tag else None
        return _lower_ort_model(model, g["input_shape"], tmp / _onnx_name(f"net{vi}", int8), int8, tags)

    grid = list(g["grid"].items())
    try:
        dense = lower(0, grid[0][1])
    except ConversionError as e:
        log.warning("calibrate: cannot find the layers in the exported net (%s): every layer is timed alone", e)
        dense = lower(0, grid[0][1], tag=False)
        grid = grid[:1]
    arts = [{"variant": variant, "file": _onnx_name(f"net{vi}", int8)} for vi, (variant, _) in enumerate(grid)]
    files: Lowered = {arts[0]["file"]: dense}
    files.update({a["file"]: partial(lower, vi, pairs) for vi, (a, (_, pairs)) in enumerate(zip(arts, grid)) if vi})
    return arts, files


def _convs(module) -> list[dict[str, Any]]:
    """A dense conv or a low-rank pair as the conv chain grid_model writes ([] for the per-call model)."""
    from torch import nn

    chain = [module] if isinstance(module, nn.Conv2d) else [module.first, module.second] \
        if hasattr(module, "first") else []
    return [{"out": m.out_channels, "k": m.kernel_size, "s": m.stride, "p": m.padding, "d": m.dilation}
            for m in chain]


def lower_tflite(groups: dict[str, dict[str, Any]], cfg: CalibrateConfig, tmp: Path):
    """Each layer's grid one .tflite with a signature per variant, written directly (backends.tflite_grid:
    no conversion per grid point; INT8 full-integer). {group: (artifacts, files)}."""
    from ..backends.tflite_grid import grid_model

    out = {}
    for gi, (key, g) in enumerate(groups.items()):
        file = tmp / f"grid{gi}.tflite"
        if key == NET:  # the whole net goes through the converter, as build does
            arts = _tflite_net(g, cfg, tmp)
            if arts:
                out[key] = arts
            continue
        sigs = {f"v{vi}": _convs(m) for vi, m in enumerate(g["variants"].values())}
        file.write_bytes(grid_model(tuple(g["input_shape"]), sigs, int8=cfg.precision == "int8"))
        arts = [{"variant": variant, "file": file.name, "signature": f"v{vi}"}
                for vi, variant in enumerate(g["variants"])]
        out[key] = (arts, {file.name: file})
    return out


def _tflite_net(g: dict[str, Any], cfg: CalibrateConfig, tmp: Path):
    """The whole dense net converted with litert-torch (INT8: quantized as build does, on random images), or
    None with a warning when it does not convert: the table then predicts the convs only."""
    import torch

    from ..backends.tflite import convert
    from ..errors import TrpEdgeError

    pt, file = tmp / "net.pt2", tmp / "net.tflite"
    calib = _random_calib(g["input_shape"]) if cfg.precision == "int8" else None
    try:
        torch.export.save(torch.export.export(g["variants"][DENSE], (torch.zeros(g["input_shape"]),)), str(pt))
        convert(pt, file, tuple(g["input_shape"]), calib, tmp)
    except (TrpEdgeError, RuntimeError) as e:
        log.warning("calibrate: the whole net did not convert to TFLite (%s): the table predicts the convs only",
                    str(e).splitlines()[0][:200])
        return None
    if calib is not None:
        file = file.with_suffix(".int8.tflite")
    return [{"variant": DENSE, "file": file.name}], {file.name: file}


LOWER = {"ort": lower_ort, "tflite": lower_tflite, "tvm": lower_calibration}


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
    log.debug("calibrate: %s: dense %s ms, %d pairs", name, f"{dense['median_ms']:.3f}" if dense else "n/a",
             len(res["timing"]) - (dense is not None) - (CALL in res["timing"]))
    return rows


# ------------------------------------------------------------------------------- tables for a deployment


def deployments(cfg: CompressConfig) -> list[Deployment]:
    """Every deployment compress chooses ranks for (trp_edge.deployment.deployments of its options)."""
    return resolve_deployments(cfg.target, cfg.runtime, cfg.precision, cfg.threads)


def _deployment_table(path: Path, dep: Deployment, shapes: dict[str, str],
                      here: dict[str, Any] | None) -> tuple[Path, str | None]:
    """Where `dep`'s table is (`path`, or this machine's beside another machine's there: machine_path) and why it
    cannot be used (None: it can). `here`: this machine's identity when the target is this machine; a board's
    identity is known only once connected, so its table is trusted as calibrated."""
    theirs = None
    if here is not None:  # another machine's table at the path stays; this machine's lives beside it
        own, not_ours = machine_path(path, here)
        if own != path:
            theirs, path = f"{path}: {not_ours}", own
    try:
        table = load_table(path, target=dep.target, runtime=dep.runtime, precision=dep.precision,
                           threads=dep.threads, layers=shapes)
    except InputError as e:
        if not path.is_file():
            return path, f"none for this machine yet; {theirs}" if theirs else "no table yet"
        return path, str(e).split(": ", 1)[-1]
    why = stale(table.header, here) if here is not None else None
    if why is None and set(table.header.get("schemes", [])) < set(SCHEME_NAMES):
        why = f"measured {', '.join(table.header.get('schemes', []))} only"
    return path, why


def deployment_tables(cfg: CompressConfig, name: str, net, example, *, progress: bool = False) -> tuple[str, ...]:
    """The latency tables compress plans with, one per deployment: the one in cfg.calibration when it fits the
    model's layers and (on this machine) was measured on this CPU with this runtime version; else, with
    cfg.calibrate and a reachable target (host; a board over RPC), one measured now. Where the deployment's
    table was measured on another kind of machine, this machine's is looked for, and measured, in a folder of
    its own beside it (latency_table.machine_path): the other machine's table is kept. A deployment with neither
    is left out with a warning: its ranks are MAC-based. An explicit --latency-table is checked against the
    deployment flags that were given and used as it is."""
    from torch import nn

    from ..device.bench import device_identity
    from ..lowrank import conv_layers

    shapes = {la.name: layer_shape(la) for la in conv_layers(net, example, cfg.decompose)
              if isinstance(la.module, nn.Conv2d)}
    explicit = cfg.decompose.latency_table
    if explicit:
        paths = (explicit,) if isinstance(explicit, str) else tuple(explicit)
        for p in paths:
            load_table(p, target=cfg.target, runtime=cfg.runtime if cfg.runtime and "," not in cfg.runtime else None,
                       precision=cfg.precision if cfg.precision and "," not in cfg.precision else None,
                       threads=cfg.threads, layers=shapes)
        return paths
    here = None
    found = []
    for dep in deployments(cfg):
        target = load_target(dep.target)
        path = table_path(calibration_root(cfg.calibration), dep.target, dep.runtime, dep.precision, dep.threads,
                          name)
        if target.native:
            here = here or device_identity()
        path, why = _deployment_table(path, dep, shapes, here if target.native else None)
        if why is None:
            log.debug("%s: latency table %s", dep, path)
            found.append(str(path))
            continue
        if not cfg.calibrate:
            log.debug("%s: %s (%s) and --no-calibrate: ranks for it are MAC-based", dep, path, why)
            continue
        log.warning("%s: %s (%s): calibrating it first", dep, path, why)
        ccfg = CalibrateConfig(model=name, target=dep.target, runtime=dep.runtime, precision=dep.precision,
                               threads=dep.threads, local=target.native, out=calibration_root(cfg.calibration))
        try:
            found.append(str(calibrate_model(ccfg, name, net, example, progress=progress, path=path).csv))
        except DeviceError as e:
            if target.native:
                raise
            log.warning("%s: cannot reach the device (%s): ranks for it are MAC-based", dep, e)
    return tuple(found)
