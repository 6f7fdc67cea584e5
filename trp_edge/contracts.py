"""What one stage hands the next: every file and message that crosses a stage carries a format and a version,
is written from one dataclass and read through it. A reader refuses another format, or a version newer than it
reads, in one line naming the file; a file from before its contract had a version reads as version 0 where the
fields are the same.

    contract            file / message                          written by            read by
    COMPRESS_REPORT     OUT/report.json (CompressReport)         workflows.compress    build, deploy, report, models
    BUILD_MANIFEST      OUT/build/<target>/<rt>/manifest.json    workflows.build       deploy, profile, revalidate
    CALIBRATION         calibration/.../<stem>.json header       workflows.calibrate   latency_table.load_table
    DEPLOY_REPORT       reports/<target>/*.json                  workflows.deploy      report.aggregate, cli
    DEVICE_JOB          the job a Session sends the device       transport             device.bench (device side)
    DEVICE_RESULT       the device's answer to a job             device.bench          transport
    CHECKPOINT          OUT/checkpoint.pt, OUT/finetune.pt       trp                   trp (--resume)
    METRICS             each line of OUT/metrics.jsonl           trp_metrics           trp_metrics (training.png)
    COMPRESSED_MODEL    the spec inside compressed.pt / dense.pt models (save)         models (load)

A leaf: nothing of trp_edge but errors, no torch; atomic writers live here so every layer can use them."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ContractError, InputError


@dataclass(frozen=True)
class Contract:
    """One format: its name, the newest version this trp-edge writes and reads, and what a user calls it."""

    format: str
    version: int
    what: str

    def stamp(self, d: Mapping[str, Any]) -> dict[str, Any]:
        """`d` with this contract's format and version first."""
        rest = {k: v for k, v in d.items() if k not in ("format", "version")}
        return {"format": self.format, "version": self.version, **rest}

    def check(self, d: Any, where: str, *, legacy: bool = True) -> int:
        """The version of `d`; refuses, in one line naming `where`, anything but this format at a version this
        reads. `legacy`: a mapping with no format key is version 0 (written before the contract had one)."""
        if not isinstance(d, Mapping):
            raise ContractError(f"{where}: not a trp-edge {self.what}")
        fmt, version = d.get("format"), d.get("version", 0)
        if fmt is None and legacy:
            return 0
        if fmt != self.format or not isinstance(version, int):
            raise ContractError(f"{where}: not a trp-edge {self.what} (format {fmt!r}, expected {self.format!r})")
        if version > self.version:
            raise ContractError(f"{where}: {self.what} version {version} is newer than this trp-edge reads "
                                f"({self.version}): upgrade trp-edge")
        return version


COMPRESS_REPORT = Contract("trp-edge/compress-report", 1, "compress report")
BUILD_MANIFEST = Contract("trp-edge/build", 1, "build manifest")
CALIBRATION = Contract("trp-edge/calibration", 1, "calibration table header")
DEPLOY_REPORT = Contract("trp-edge/deploy-report", 1, "deploy report")
DEVICE_JOB = Contract("trp-edge/device-job", 1, "device job")
DEVICE_RESULT = Contract("trp-edge/device-result", 1, "device result")
CHECKPOINT = Contract("trp-edge/checkpoint", 1, "training checkpoint")
COMPRESSED_MODEL = Contract("trp-edge/compressed", 1, "compressed model")
METRICS = Contract("trp-edge/metrics", 1, "training metrics line")
CONTRACTS = (COMPRESS_REPORT, BUILD_MANIFEST, CALIBRATION, DEPLOY_REPORT, DEVICE_JOB, DEVICE_RESULT, CHECKPOINT,
             COMPRESSED_MODEL, METRICS)


def pair_job(runtime: str, threads: int, protocol: Any, dense: str, compressed: str, reference: str,
             rest_seconds: float = 0.0) -> dict[str, Any]:
    """The DEVICE_JOB that times a dense and a compressed artifact side by side (trp_edge.device.bench.bench),
    each checked against `reference` (an npz of the input and each variant's output), without per-op profiles.
    `protocol`: a ProfileConfig (or its dict). `rest_seconds`: the device idles this long before timing (it was
    just busy: see device.bench)."""
    proto = protocol.to_dict() if hasattr(protocol, "to_dict") else dict(protocol)
    arts = [{"variant": v, "file": f, "reference": reference}
            for v, f in (("dense", dense), ("compressed", compressed))]
    return DEVICE_JOB.stamp({"runtime": runtime, "threads": threads, "protocol": {**proto, "threads": threads},
                             "layers": False, "artifacts": arts, "rest_seconds": rest_seconds})


# ------------------------------------------------------------------------------------------------ atomic I/O


def write_text(path: Path, text: str) -> None:
    """Atomic: a reader sees the old file or the whole new one; two writers each write a temporary of their own."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def claim(path: Path) -> bool:
    """Create `path` empty if no file is there, atomically (O_EXCL): False when one is."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, contract: Contract, *, legacy: bool = True) -> dict[str, Any]:
    """A JSON file of `contract`, checked (Contract.check); an unreadable file is one InputError line."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable {contract.what} ({e})") from e
    contract.check(d, str(path), legacy=legacy)
    return d


class _DictView:
    """obj["key"] and obj.get("key") as on the plain dict of earlier releases (fields, then `extra`)."""

    def __getitem__(self, key: str) -> Any:
        if key in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            return getattr(self, key)
        extra = getattr(self, "extra", None) or {}
        if key in extra:
            return extra[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


# ------------------------------------------------------------------------------------------ compress report


def precision_entry(precisions: dict[str, Any] | None, precision: str,
                    runtime: str | None = None) -> dict[str, Any] | None:
    """A compress report's entry for the model built at `precision` for `runtime` (its own, "int8/ort", else
    the one all runtimes share, "int8"), or None: that precision builds the compressed model as it is."""
    p = precisions or {}
    return p.get(f"{precision}/{runtime}") or p.get(precision)


@dataclass
class CompressReport(_DictView):
    """report.json of `trp-edge compress`: what was compressed, how, and what it gained."""

    model: str
    arch: dict[str, Any]
    scheme: str
    energy: float
    input_shape: list[int]
    dense: dict[str, Any]  # macs, params, accuracy
    compressed: dict[str, Any]
    mac_speedup: float
    layers: list[dict[str, Any]]  # one LayerPlan dict per conv, MACs as counted on the built modules
    created: str = ""
    torch: str | None = None
    nuclear: float = 0.0
    period: int = 0
    target_speedup: float | None = None
    allocate: str | None = None  # how ranks were spread at the target with a table: latency | uniform
    data: str | None = None
    initial_accuracy: float | None = None
    param_ratio: float | None = None
    onnx: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None  # host timing, as deploy times (trp_edge.profile.time_pair)
    # per latency table: the whole-net latency it predicts, dense and compressed (trp_edge.latency_table.predict)
    predictions: list[dict[str, Any]] | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the CompressConfig it was made with
    # per precision whose builds keep some decomposed layers dense (their pairs are slower there than the dense
    # conv: planning.precision_dense): dense_layers, macs, mac_speedup and the onnx / model files they come from.
    # Keyed "int8", or "int8/ort", "int8/tflite" when the runtimes disagree (a model per runtime)
    precisions: dict[str, Any] | None = None

    def at_precision(self, precision: str, runtime: str | None = None) -> dict[str, Any]:
        """The compressed model as built at `precision` for `runtime`: macs, mac_speedup and the layers kept dense
        there."""
        p = precision_entry(self.precisions, precision, runtime)
        if p is None:
            return {"macs": self.compressed["macs"], "mac_speedup": self.mac_speedup, "dense_layers": []}
        return p

    @property
    def latency_table(self) -> str | None:
        """The (first) latency table the ranks were chosen with."""
        t = self.latency_tables
        return t[0] if t else None

    @property
    def latency_tables(self) -> list[str]:
        t = ((self.config or {}).get("decompose") or {}).get("latency_table")
        return [] if not t else [t] if isinstance(t, str) else list(t)

    @property
    def planned_precisions(self) -> tuple[str, ...]:
        """The precisions compress chose ranks for (its --precision; fp32 when the report does not say)."""
        p = (self.config or {}).get("precision") or "fp32"  # a list; comma-separated text in 0.1's reports
        return tuple(p.split(",")) if isinstance(p, str) else tuple(p)

    def to_dict(self) -> dict[str, Any]:
        return COMPRESS_REPORT.stamp(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "report.json") -> CompressReport:
        COMPRESS_REPORT.check(d, where)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise InputError(f"{where}: not a complete compress report (no {', '.join(missing)}); "
                             "run trp-edge compress again")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, path: Path) -> CompressReport:
        return cls.from_dict(read_json(path, COMPRESS_REPORT), str(path))

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())


# ------------------------------------------------------------------------------------------- build manifest


@dataclass
class Manifest(_DictView):
    """manifest.json of one runtime's build folder (OUT/<target>/<runtime>/): what was built from what, for which
    target, and each artifact's file, hash, validation and accuracy. Backend-specific keys (the runtime's
    version, TVM's tuning) are kept in `extra` and written beside the fields."""

    model: str
    source: str
    target: str
    target_spec: dict[str, Any]
    runtime: str
    created: str
    config: dict[str, Any]
    input: dict[str, Any]
    reference: dict[str, Any]
    macs: dict[str, Any]
    mac_speedup: float | None
    source_sha256: dict[str, str]
    artifacts: list[dict[str, Any]]
    build_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return BUILD_MANIFEST.stamp({**d, **self.extra})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "manifest.json") -> Manifest:
        BUILD_MANIFEST.check(d, where, legacy=False)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = sorted(n for n in names - set(d) if n != "build_seconds")
        if missing:
            raise InputError(f"{where}: not a complete build manifest (no {', '.join(missing)}); build again")
        extra = {k: v for k, v in d.items() if k not in names and k not in ("format", "version")}
        return cls(**{k: v for k, v in d.items() if k in names}, extra=extra)

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        f = Path(folder) / "manifest.json"
        if not f.is_file():
            raise InputError(f"{folder}: no manifest.json (not a trp-edge build folder)")
        return cls.from_dict(read_json(f, BUILD_MANIFEST, legacy=False), str(f))
