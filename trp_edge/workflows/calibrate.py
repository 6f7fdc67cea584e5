"""`trp-edge calibrate`: measured latency of every eligible conv of a model, dense and as low-rank pairs over
a grid of ranks and schemes, at the layer's real input shape, with the runtime, precision and threads the
deployment will use. Latency is stepwise in the rank (vector widths, channel blocks: ONNX Runtime's NCHWc
layout pads a rank-2 conv to 16 output channels), which the energy rule cannot see.

Writes calibration/<target>/<runtime>/<stem>.csv and its .json header (trp_edge.latency_table: the table's
format, its key, and `load_table`, which refuses a table made for another deployment or shape).

Measured on this machine (`--local`) or on the device over the same transport as deploy (`trp-edge serve`
runs trp_edge.device.bench.calibrate there: numpy and the runtime, no torch). Each runtime's backend lowers the
models (its lower_calibration):
- ort: each variant a small ONNX model; INT8 is static QDQ (as build quantizes), on random activations;
- tflite: each layer's whole grid is one .tflite with a signature per variant, written directly
  (backends.tflite_grid: no conversion per grid point); INT8 is full-integer. The whole net is converted
  with litert-torch, as build converts it.
Layers of the same shape are measured once. Each layer also times a near-empty model on its input (the
per-call overhead, scheme "call"), and the whole dense net is timed (header "net_ms"), so a whole-net
latency can be predicted from the table: net_ms - sum(dense convs) + sum(chosen pairs).

ONNX Runtime's rows (a runtime whose capabilities say in_net) are then timed again in place (header "in_net";
workflows.in_net): a layer alone is not the layer in the net (at 2 threads a pair alone took 1.30x its time in the
net, a dense conv 1.18x: ResNet-18's 2-thread predictions missed by +20-31 %). The dense net, and per scheme and
grid position j the net with every layer at its j-th measured rank (net_grid: about 20 nets per scheme for
ResNet-18), are each timed and profiled (device job in_net; kernels summed per layer by the tags
backends.ort.tag_layers puts in the node names), and every dense conv and pair gets its in-net time, scaled by its
net's timed over profiled latency. Where the nets cannot be matched to the layers (a conv called twice) or do not
run, the rows stay as timed alone.

Stages: load the model and its input -> per layer shape, lower the dense conv and every pair of the grid ->
time them on the device, one call per shape -> write the table."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import capabilities, get, int8_runtimes
from ..config import SCHEME_NAMES, CalibrateConfig, CompressConfig, DecomposeConfig, calibration_root
from ..deployment import Deployment, deployments
from ..errors import ConfigError, DeviceError, InputError
from ..latency_table import (
    CALL,
    DENSE,
    NET,
    LatencyTable,
    layer_shape,
    load_table,
    machine_path,
    stale,
    table_path,
)
from ..targets import Target, load_target, resolve_threads
from ..transport import Session, open_session, resolve
from .in_net import fan_out, net_grid, place, time_net, written

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


def calibrate(cfg: CalibrateConfig | str | None = None, /, *, progress: bool = False, boards: int | None = None,
              **options: Any) -> CalibrationResult:
    """Measure every eligible conv of cfg.model on the target (here with `local`, else over RPC on the target's
    `trp-edge serve`) and write the table and its header; returns where. `cfg` a CalibrateConfig, or its options
    as keywords. `boards`: spread the calls over that many boards of the tracker (0: every free one;
    trp_edge.transport_fleet); the time of a call does not depend on which board of one CPU ran it."""
    cfg = CalibrateConfig.of(cfg, **options)
    name, net, example = calibration_model(cfg)
    return calibrate_model(cfg, name, net, example, progress=progress, boards=boards)


def calibrate_model(cfg: CalibrateConfig, name: str, net, example, *, progress: bool = False,
                    path: Path | None = None, boards: int | None = None) -> CalibrationResult:
    """`calibrate` for a model already loaded (`net` in eval mode, `example` its batch-1 input), as compress
    calls it; cfg.model is not read. `path`: where the table goes instead of the deployment's (table_path, or
    beside another machine's table there: machine_path)."""
    if not capabilities(cfg.runtime).built_at(cfg.precision):
        raise ConfigError(f"{cfg.runtime} is built at fp32 only (INT8: {', '.join(int8_runtimes())}): calibrate it "
                          "at fp32")
    target = load_target(cfg.target)
    if cfg.local and not target.native:
        raise ConfigError(f"--local measures this machine, which is not {target.name}: use --target host, or reach "
                          f"{target.name} over RPC (--host/--tracker, as for deploy)")
    conn = None if cfg.local else resolve(target, **cfg.reach)
    threads = resolve_threads(cfg.threads, target)
    t0 = time.perf_counter()
    journal = (path or table_path(calibration_root(cfg.out), target.name, cfg.runtime, cfg.precision, threads,
                                  name)).with_suffix(".partial.jsonl")  # answers so far: a killed run resumes
    try:
        with _session(target, cfg, conn, boards, journal) as session:
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
    journal.unlink(missing_ok=True)
    return CalibrationResult(csv_path, json_path, len(rows), time.perf_counter() - t0)


@contextmanager
def _session(target: Target, cfg: CalibrateConfig, conn, boards: int | None, journal: Path) -> Iterator[Session]:
    """One session (local or one board), or a fleet of boards; every answer journaled as it comes."""
    from ..transport_fleet import Journal, open_fleet

    if boards is not None:
        if conn is None:
            raise ConfigError("--boards spreads the jobs over the boards of a tracker: drop --local, pass --tracker")
        with open_fleet(conn, boards, cfg.timeout, journal) as session:
            yield session
        return
    with open_session(target, local=cfg.local, conn=conn, timeout=cfg.timeout) as session:
        yield dataclasses.replace(session, call=Journal(journal).wrap(session.call))


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
    if capabilities(cfg.runtime).in_net:
        groups[NET]["grid"] = net_grid(groups, members)
    return groups, shapes, members


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
        lower = get(cfg.runtime).lower_calibration
        lowered = lower(groups, cfg, Path(tmp))
        bar = tqdm(lowered.items(), desc=f"calibrate {cfg.runtime} {cfg.precision}", unit="shape",
                   disable=not progress)
        in_net: dict[tuple[str, str, int], dict[str, Any]] = {}

        def one(item):
            key, (arts, files) = item
            job = {"runtime": cfg.runtime, "threads": threads, "protocol": cfg.protocol.to_dict(),
                   "input_shape": groups[key]["input_shape"], "artifacts": arts}
            if key == NET:
                return key, time_net(session, job, files, groups[NET], target)
            with written(files) as paths:
                return key, session.call("calibrate", job, paths)

        for key, res in fan_out(session.workers, one, bar):
            if key == NET:
                net_ms, in_net, device = res
                continue
            if res.get("error"):
                raise DeviceError(f"{target.name}/{cfg.runtime}: {res['error']}")
            device = res["device"]
            for name in members[key]:
                rows += layer_rows(name, key, res)
    placed = place(rows, in_net)
    return placed, shapes, device, net_ms, placed is not rows


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
    why = stale(table.header, here, capabilities(dep.runtime)) if here is not None else None
    if why is None and set(table.header.get("schemes", [])) < set(SCHEME_NAMES):
        why = f"measured {', '.join(table.header.get('schemes', []))} only"
    return path, why


def _only(values: tuple[str, ...] | None) -> str | None:
    """The one value of a list option, None when it has several (or none)."""
    return values[0] if values and len(values) == 1 else None


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
            load_table(p, target=cfg.target, runtime=_only(cfg.runtime), precision=_only(cfg.precision),
                       threads=cfg.threads, layers=shapes)
        return paths
    here = None
    found = []
    for dep in deployments(cfg.target, cfg.runtime, cfg.precision, cfg.threads):
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
