"""The latency table's data model: what `trp-edge calibrate` measures and what rank planning reads.

A table is two files side by side: <stem>.csv (layer, scheme, rank, shape, median_ms, p10_ms, p90_ms, runs;
scheme "dense" with rank 0 is the dense conv) and <stem>.json (format, version, target, runtime, precision,
threads, input shape, each layer's shape key, device identity, per-call overhead, date, protocol). A table is
keyed by target, runtime, precision and threads: it lives at calibration/<target>/<runtime>/<stem>, the stem
being the model's name with -int8 and -<N>t added when not fp32 or 1 thread (`table_path`); when that path
holds another kind of machine's table, this machine's lives beside it in <runtime>/<cpu slug>/ (`machine_path`).
`load_table` refuses a table made for another deployment or for layers whose shapes differ from the model's;
`stale` says why a table no longer describes this device (another CPU or runtime version).

A leaf module: no torch, nothing of trp_edge but errors and the contracts' atomic writer, so the workflows load tables
with it and `calibrate` (which measures) sits on top. A LatencyTable is a planning_latency.LatencyModel: rank
planning reads it through that interface (several read as one there: planning_latency.worst_case). It knows no
runtime: what it needs of one (its package name in a device identity, whether its layers are timed in place) its
callers pass in, from the runtime's backend (trp_edge.backends.capabilities)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .contracts import CALIBRATION, read_json, write_json, write_text
from .errors import ConfigError, InputError

COLUMNS = ["layer", "scheme", "rank", "shape", "median_ms", "p10_ms", "p90_ms", "runs"]
DENSE = "dense"  # the scheme name of a dense conv's row (rank 0)
CALL = "call"  # the scheme name of a layer's per-call overhead row (rank 0): a near-empty model on its input
NET = "__net__"  # the calibration group timing the whole dense net (its "grid": the nets that time layers in place)
MACHINE_KEYS = ("cpu", "machine", "cores")  # what makes a device identity another kind of machine


def table_path(root: str | Path, target: str, runtime: str, precision: str, threads: int, model: str) -> Path:
    """Where the table of one deployment lives (the .csv; its .json header beside it)."""
    stem = model + ("" if precision == "fp32" else f"-{precision}") + ("" if threads == 1 else f"-{threads}t")
    return Path(root) / target / runtime / f"{stem}.csv"


def cpu_slug(device: dict[str, Any]) -> str:
    """A folder name for one kind of machine (a device identity's CPU name and core count)."""
    name = re.sub(r"[^a-z0-9]+", "-", str(device.get("cpu") or device.get("machine") or "cpu").lower()).strip("-")
    return f"{name}-{device.get('cores')}c"


def layer_shape(layer, in_c: int | None = None) -> str:
    """The key a layer is measured under: input and output size, kernel and stride (`layer`: a ConvLayer)."""
    m = layer.module
    in_c = m.in_channels if in_c is None else in_c
    return (f"{in_c}x{layer.in_hw[0]}x{layer.in_hw[1]}->{m.out_channels}x{layer.out_hw[0]}x{layer.out_hw[1]}"
            f"/k{m.kernel_size[0]}x{m.kernel_size[1]}s{m.stride[0]}x{m.stride[1]}")


@dataclass
class LatencyTable:
    """Measured per-layer latency, indexed by (layer, scheme) -> {rank: median ms}."""

    header: dict[str, Any]
    rows: list[dict[str, Any]]
    _index: dict[tuple[str, str], dict[int, float]] = field(init=False, repr=False)

    def __post_init__(self):
        self._index = {}
        for r in self.rows:
            self._index.setdefault((r["layer"], r["scheme"]), {})[r["rank"]] = r["median_ms"]

    def ranks(self, layer: str, scheme: str) -> dict[int, float]:
        """rank -> median ms of the layer's measured pairs in `scheme`."""
        return dict(self._index.get((layer, scheme), {}))

    def latency(self, layer: str, scheme: str, rank: int) -> float | None:
        """Median ms of a layer as a pair at `rank` (scheme 'dense', rank 0: the dense conv)."""
        return self._index.get((layer, scheme), {}).get(rank)

    def dense(self, layer: str) -> float | None:
        return self.latency(layer, DENSE, 0)

    @property
    def precision(self) -> str:
        return self.header.get("precision", "fp32")

    @property
    def runtime(self) -> str:
        return self.header["runtime"]

    @property
    def deployment(self) -> str:
        """target/runtime precision, N threads: the configuration the table was measured in."""
        h = self.header
        return f"{h['target']}/{h['runtime']} {h.get('precision', 'fp32')}, {h['threads']} thread(s)"

    def write(self, stem: Path) -> tuple[Path, Path]:
        """<stem>.csv and <stem>.json, each written atomically."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(self.rows)
        write_text(stem.with_suffix(".csv"), buf.getvalue())
        write_json(stem.with_suffix(".json"), CALIBRATION.stamp(self.header))
        return stem.with_suffix(".csv"), stem.with_suffix(".json")


def load_table(path: str | Path, *, target: str | None = None, runtime: str | None = None,
               precision: str | None = None, threads: int | None = None,
               layers: dict[str, str] | None = None) -> LatencyTable:
    """Read a calibration table (the .csv or its .json header) and refuse one that does not fit: another
    target, runtime, precision or thread count, or layers whose shapes differ from the model's (`layers`:
    name -> layer_shape). A header from before precision was recorded is fp32."""
    p = Path(path)
    csv_path, json_path = p.with_suffix(".csv"), p.with_suffix(".json")
    if not csv_path.is_file() or not json_path.is_file():
        raise InputError(f"{p}: a calibration table needs both {csv_path.name} and {json_path.name} "
                         "(made by trp-edge calibrate)")
    header = read_json(json_path, CALIBRATION, legacy=False)
    if target and header["target"] != target:
        raise InputError(f"{p}: measured on target {header['target']}, not {target}: calibrate on {target}")
    if runtime and header["runtime"] != runtime:
        raise InputError(f"{p}: measured with {header['runtime']}, not {runtime}: calibrate with that runtime")
    header.setdefault("precision", "fp32")
    if precision and header["precision"] != precision:
        raise InputError(f"{p}: measured at {header['precision']}, not {precision}: calibrate with --precision "
                         f"{precision}")
    if threads and header["threads"] != threads:
        raise InputError(f"{p}: measured at {header['threads']} thread(s), not {threads}: calibrate with --threads "
                         f"{threads}")
    if layers is not None:
        bad = [n for n, s in layers.items() if header["layers"].get(n) != s]
        if bad:
            raise InputError(f"{p}: stale or for another model: layer {bad[0]} is {layers[bad[0]]} here but "
                             f"{header['layers'].get(bad[0], 'absent')} in the table; calibrate again")
    with open(csv_path, newline="") as f:
        rows = [{**r, "rank": int(r["rank"]), "median_ms": float(r["median_ms"]), "runs": int(r["runs"])}
                for r in csv.DictReader(f)]
    return LatencyTable(header, rows)


def load_tables(paths: str | Sequence[str] | None, *, layers: dict[str, str] | None = None,
                schemes: Sequence[str] = ()) -> tuple[LatencyTable, ...]:
    """The tables a DecomposeConfig.latency_table names (one path, several, or None: none), each checked against
    the model's conv shapes (`layers`, as load_table) and refused when it did not measure every one of `schemes`
    (the config's: lowrank.scheme_names). Rank planning takes what this returns (planning_latency.LatencyModel)."""
    tables = []
    for path in [paths] if isinstance(paths, str | Path) else paths or []:
        table = load_table(path, layers=layers)
        measured = table.header.get("schemes", [])
        missing = [s for s in schemes if s not in measured]
        if missing:
            raise ConfigError(f"{path}: measured {', '.join(measured)} only, not {', '.join(missing)} (scheme "
                              f"{schemes[0] if len(schemes) == 1 else 'auto'}): calibrate with --schemes "
                              f"{','.join(schemes)}")
        tables.append(table)
    return tuple(tables)


def machine_path(path: Path, device: dict[str, Any]) -> tuple[Path, str | None]:
    """Where `device`'s table of a deployment lives: `path` (its table_path), or, when `path` holds a table of
    another kind of machine (CPU, architecture or cores), <runtime>/<cpu slug>/ beside it, so that one checkout
    keeps the tables of several machines (a host target is whichever machine runs trp-edge); with why the table
    at `path` is not this machine's (None when `path` is returned)."""
    try:
        header = load_table(path).header
    except InputError:  # none there, or unreadable: this machine's goes there
        return path, None
    why = _other_machine(header.get("device") or {}, device)
    if why is None:
        return path, None
    return path.parent / cpu_slug(device) / path.name, why


def _other_machine(was: dict[str, Any], device: dict[str, Any]) -> str | None:
    """How device identity `was` is another kind of machine than `device` (CPU, architecture or cores), or None."""
    for key in MACHINE_KEYS:
        if was.get(key) != device.get(key):
            return f"measured on {key} {was.get(key)!r}, this device has {device.get(key)!r}"
    return None


class RuntimeFacts(Protocol):
    """What `stale` needs to know of a table's runtime (trp_edge.backends.Capabilities has it)."""

    version_key: str  # the runtime's package in a device identity's "runtimes" and "sessions"
    in_net: bool  # whether calibration times its layers in place, in whole nets


def stale(header: dict[str, Any], device: dict[str, Any], caps: RuntimeFacts) -> str | None:
    """Why a table no longer describes `device` (an identity as trp_edge.device.bench reports it): another CPU,
    core count or runtime version, layers of a runtime timed in place (caps.in_net) never timed in the net (a
    table from before that: header without "in_net"), or at several threads another way of running the runtime's
    workers (the identity's "sessions"). None when it still does. `caps`: the table's runtime's capabilities
    (trp_edge.backends.capabilities(header["runtime"]): version_key, in_net)."""
    was = header.get("device") or {}
    other = _other_machine(was, device)
    if other:
        return other
    rkey = caps.version_key
    old, new = (was.get("runtimes") or {}).get(rkey), (device.get("runtimes") or {}).get(rkey)
    if rkey and old != new:
        return f"measured with {rkey} {old}, this device has {new}"
    if caps.in_net and "in_net" not in header:
        return "its layers were timed alone only, not in the net"
    old, new = (was.get("sessions") or {}).get(rkey), (device.get("sessions") or {}).get(rkey)
    if rkey and header.get("threads", 1) > 1 and old != new:  # one thread has no workers to run another way
        return f"measured with {rkey}'s workers run {old or 'asleep between ops'!r}, this device runs them {new!r}"
    return None


def predict(table: LatencyTable, chosen: list[tuple[str, str, int | None]]) -> dict[str, Any] | None:
    """Whole-net latency the table predicts for a model whose convs are `chosen` (name, scheme, rank; rank None:
    dense): the dense net as calibrated (net_ms), less each decomposed conv's dense time, plus its pair's. The
    per-call overhead cancels (both times are one call on the same input). Without net_ms (a table from before
    it was measured) only the convs are summed ("convs_only"). None when a chosen pair was not measured, or when
    the prediction is not a positive time: the layers, each timed alone, then cost more than in the net (TVM's
    untuned convs alone change layout at both ends), and the difference says nothing about the net."""
    dense_sum = pair_sum = 0.0
    for name, scheme, rank in chosen:
        dense = table.dense(name)
        if dense is None:
            continue
        ms = dense if rank is None else table.latency(name, scheme, rank)
        if ms is None:
            return None
        dense_sum, pair_sum = dense_sum + dense, pair_sum + ms
    net = table.header.get("net_ms")
    dense_ms, comp_ms = (net, net - dense_sum + pair_sum) if net else (dense_sum, pair_sum)
    if comp_ms <= 0:
        return None
    h = table.header
    return {"deployment": table.deployment, "target": h["target"], "runtime": h["runtime"],
            "precision": h.get("precision", "fp32"), "threads": h["threads"], "dense_ms": dense_ms,
            "compressed_ms": comp_ms, "latency_speedup": dense_ms / comp_ms, "convs_only": not net}
