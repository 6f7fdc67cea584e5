"""The latency table's data model: what `trp-edge calibrate` measures and what rank planning reads.

A table is two files side by side: <model>.csv (layer, scheme, rank, shape, median_ms, p10_ms, p90_ms, runs;
scheme "dense" with rank 0 is the dense conv) and <model>.json (format, version, target, runtime, threads,
input shape, each layer's shape key, device identity, date, protocol). `load_table` refuses a table made for
another target or runtime, or for layers whose shapes differ from the model's.

A leaf module: no torch, nothing of trp_edge but errors and report's atomic writer, so lowrank and trp import
it and `calibrate` (which measures) sits on top."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .report import write_json, write_text

FORMAT = "trp-edge/calibration"
VERSION = 1
COLUMNS = ["layer", "scheme", "rank", "shape", "median_ms", "p10_ms", "p90_ms", "runs"]
DENSE = "dense"  # the scheme name of a dense conv's row (rank 0)


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

    def write(self, stem: Path) -> tuple[Path, Path]:
        """<stem>.csv and <stem>.json, each written atomically."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(self.rows)
        write_text(stem.with_suffix(".csv"), buf.getvalue())
        write_json(stem.with_suffix(".json"), {"format": FORMAT, "version": VERSION, **self.header})
        return stem.with_suffix(".csv"), stem.with_suffix(".json")


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
