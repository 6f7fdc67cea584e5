"""One frozen, validated config object per workflow; each round-trips to JSON so every artifact
records how it was made."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config_base import _check, _JSONMixin
from .config_train import NUCLEAR_SOLVERS, TRPConfig  # noqa: F401  (re-exported: `from trp_edge.config import TRPConfig`)
from .targets import RUNTIMES

PRECISIONS = ("fp32", "int8")  # what each runtime is built at is its backend's (trp_edge.backends.capabilities)

SCHEME_NAMES = ("channel", "spatial")  # the matrix forms; "auto" picks one of them (or dense) per layer
ALLOCATIONS = ("latency", "uniform")  # how ranks spread over layers at a MAC target (DecomposeConfig.allocate)


def names(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A list option as a tuple (from comma-separated text, the CLI's, or a sequence); None when empty."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return tuple(str(v).strip() for v in items if str(v).strip()) or None


@dataclass(frozen=True)
class DecomposeConfig(_JSONMixin):
    """How eligible convs become low-rank pairs.

    energy: the e of TSVD(W, e): keep the smallest rank k with sum_{j>k} s_j^2 <= e * sum s_j^2.
    ranks: explicit per-layer ranks (layer name -> k); they override the energy rule for those layers.
    target_speedup: choose e by bisection so the decomposed model has this many times fewer MACs.
    scheme "auto": per layer the faster of channel, spatial and dense at the kept energy (measured latency
    with latency_table, else fewer MACs); layer_schemes fixes the scheme of named layers.
    latency_table: a calibration table, or several (one per deployment): ranks come from the fp32 ones (a pair
    must be faster than dense in each runtime's); an INT8 table only keeps dense, in the INT8 builds, the pairs
    slower there (planning_latency.precision_dense).
    linear: also factorize nn.Linear layers into two Linears (the channel scheme's form; same energy rule and
    TRP projection); the spatial scheme leaves them dense.
    allocate: with target_speedup and a latency table, "latency" (default) re-allocates the ranks of the
    one-e plan across layers: the lowest table latency at the same MAC target without dropping more
    singular-value energy in all (trp_edge.allocate); "uniform" keeps one e for every layer.
    """

    scheme: str = "channel"
    energy: float = 0.02
    ranks: Mapping[str, int] | None = None
    skip_stem: bool = False
    target_speedup: float | None = None
    latency_table: str | tuple[str, ...] | None = None
    layer_schemes: Mapping[str, str] | None = None
    linear: bool = False
    allocate: str = "latency"

    def __post_init__(self):
        names = (*SCHEME_NAMES, "auto")
        _check(self.allocate in ALLOCATIONS, f"unknown allocation {self.allocate!r}: use one of "
               f"{', '.join(ALLOCATIONS)}")
        _check(self.scheme in names, f"unknown scheme {self.scheme!r}: use one of {', '.join(names)}")
        if self.layer_schemes is not None:
            bad = {k: v for k, v in self.layer_schemes.items() if v not in SCHEME_NAMES}
            _check(not bad, f"per-layer schemes must be one of {', '.join(SCHEME_NAMES)}, got {bad}")
            _check(self.scheme == "auto" or set(self.layer_schemes.values()) <= {self.scheme},
                   f"per-layer schemes other than {self.scheme!r} need scheme 'auto'")
            object.__setattr__(self, "layer_schemes", dict(self.layer_schemes))
        _check(0.0 < self.energy < 1.0, f"energy must be in (0, 1), got {self.energy}")
        if isinstance(self.latency_table, list | tuple):  # one table stays a plain path (report.json's contract)
            tables = tuple(str(t) for t in self.latency_table)
            object.__setattr__(self, "latency_table", tables[0] if len(tables) == 1 else tables or None)
        if self.ranks is not None:
            bad = {k: v for k, v in self.ranks.items() if not (isinstance(v, int) and v >= 1)}
            _check(not bad, f"explicit ranks must be integers >= 1, got {bad}")
            object.__setattr__(self, "ranks", dict(self.ranks))
        if self.target_speedup is not None:
            _check(self.target_speedup > 1.0, f"target speedup must be > 1, got {self.target_speedup}")


@dataclass(frozen=True)
class ProfileConfig(_JSONMixin):
    """The timing protocol (see trp_edge.profile): warm-up runs, then alternating blocks of `block`
    runs until every variant has `min_runs` runs and `min_seconds` of timed work (or `max_seconds`)."""

    warmup: int = 5
    block: int = 5
    min_runs: int = 20
    min_seconds: float = 1.0
    max_seconds: float = 60.0
    threads: int | None = None

    def __post_init__(self):
        _check(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        _check(self.block >= 1, f"block must be >= 1, got {self.block}")
        _check(self.min_runs >= 1, f"min runs must be >= 1, got {self.min_runs}")
        _check(self.min_seconds >= 0 and self.max_seconds > 0, "min/max seconds must be >= 0 / > 0")
        _check(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class CompressConfig(_JSONMixin):
    """`trp-edge compress`: which model, which data, where the artifacts go, and how."""

    model: str
    decompose: DecomposeConfig = DecomposeConfig()
    trp: TRPConfig = TRPConfig()
    arch: str | None = None
    weights: str | None = None
    trust_pickle: bool = False
    in_channels: int | None = None
    num_classes: int | None = None
    input_size: int | None = None
    data: str | None = None
    out: str | None = None
    force: bool = False
    resume: bool = False
    latency: ProfileConfig | None = ProfileConfig()  # host ONNX Runtime timing in the report; None: skip
    # the deployment the ranks are chosen for: its latency table is used, or measured first (calibrate)
    target: str | None = None  # default host
    runtime: tuple[str, ...] | None = None  # ort, tflite, or several (comma-separated text too; default ort)
    precision: tuple[str, ...] | None = None  # fp32, int8, or both (comma-separated text too; default fp32)
    threads: int | None = None  # default the target's
    calibrate: bool = True  # measure a missing or stale table when the target can be reached
    calibration: str | None = None  # where tables are found and written (default: calibration_root())

    def __post_init__(self):
        _check(isinstance(self.decompose, DecomposeConfig), "decompose must be a DecomposeConfig")
        _check(isinstance(self.trp, TRPConfig), "trp must be a TRPConfig")
        _check(self.in_channels is None or self.in_channels >= 1, f"in-channels must be >= 1, got {self.in_channels}")
        _check(self.num_classes is None or self.num_classes >= 2, f"num-classes must be >= 2, got {self.num_classes}")
        _check(self.input_size is None or self.input_size >= 8, f"input size must be >= 8, got {self.input_size}")
        _check(not (self.force and self.resume), "--force starts again and --resume goes on: pass one of them")
        _check(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        for opt, field, known in (("--runtime", "runtime", RUNTIMES), ("--precision", "precision", PRECISIONS)):
            object.__setattr__(self, field, names(getattr(self, field)))
            bad = [v for v in getattr(self, field) or () if v not in known]
            _check(not bad, f"{opt}: unknown {bad[0] if bad else ''!r}: use {', '.join(known)} (comma-separated)")
        _check(not (self.trp.needs_data and self.data is None),
               "TRP training needs data (so does --finetune): pass --data (fashion-mnist, cifar10:DIR, "
               "imagefolder:DIR, synthetic) or --steps 0 to decompose directly")

    @classmethod
    def from_options(cls, model: str, **options: Any) -> CompressConfig:
        """A config from flat keyword options named as the CLI's (the Python API): each goes to the
        decomposition, the TRP training or the run itself by its name. `latency=False` skips the timing."""
        parts: dict[str, dict[str, Any]] = {"decompose": {}, "trp": {}, "run": {}}
        owners = {f.name: part for part, kind in (("decompose", DecomposeConfig), ("trp", TRPConfig), ("run", cls))
                  for f in dataclasses.fields(kind) if f.name not in ("decompose", "trp", "model")}
        unknown = sorted(set(options) - set(owners))
        _check(not unknown, f"compress: unknown options {unknown}; use any of {sorted(owners)}")
        for k, v in options.items():
            parts[owners[k]][k] = v
        run = parts["run"]
        if run.get("latency") is True or "latency" not in run:
            run["latency"] = ProfileConfig()
        elif run["latency"] is False:
            run["latency"] = None
        return cls(model, DecomposeConfig(**parts["decompose"]), TRPConfig(**parts["trp"]), **run)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        d = dict(d)
        d["decompose"] = DecomposeConfig.from_dict(d.get("decompose", {}))
        d["trp"] = TRPConfig.from_dict(d.get("trp", {}))
        if d.get("latency") is not None:
            d["latency"] = ProfileConfig.from_dict(d["latency"])
        return super().from_dict(d)


@dataclass(frozen=True, kw_only=True)
class DeviceReach(_JSONMixin):
    """How build (TVM tuning), calibrate and deploy reach the device: a `trp-edge serve` at host:port, or a TVM
    RPC tracker HOST:PORT and key; none of them: the target's [rpc] (transport.resolve takes `reach`)."""

    host: str | None = None
    port: int | None = None
    tracker: str | None = None
    key: str | None = None

    @property
    def reach(self) -> dict[str, Any]:  # as transport.resolve and another workflow's config take them
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DeviceReach)}

    def _check_reach(self) -> None:
        _check(self.tracker is None or ":" in self.tracker, f"--tracker must be HOST:PORT, got {self.tracker!r}")


@dataclass(frozen=True)
class BuildConfig(DeviceReach):
    """`trp-edge build`: which model, for which target, with which runtimes.

    runtimes: "all" (the target's) or comma-separated tvm, ort, tflite.
    tune_trials: MetaSchedule trials for TVM (0: untuned; the tuning database is reused across builds).
    tune_minutes: a time budget for TVM tuning, per model (0: none); alone, it tunes until the time is up.
    tuning_db: where the tuning database lives (default OUT/<target>/tuning); share one between models.
    host/port, tracker/key: the device MetaSchedule measures on (a `trp-edge serve`; default: the target's
    [rpc], else this machine for a native target); tune_emulated: an aarch64 `trp-edge serve` under qemu
    (checks the flow only: the tuning is qemu's).
    threads: the threads the model will run at, which TVM tuning measures at (default: the target's).
    int8: also build INT8 artifacts (ORT QDQ, TFLite), calibrated on `calib` (default: the data the
    model was compressed with) and evaluated against fp32 on `eval_images` test images.
    """

    model: str
    target: str = "host"
    runtimes: str = "all"
    out: str | None = None
    tune_trials: int = 0
    tune_minutes: float = 0.0
    int8: bool = True
    calib: str | None = None
    calib_images: int = 64
    eval_images: int = 500
    gpu: bool = True
    emulate: bool = True
    tuning_db: str | None = None
    tune_emulated: bool = False
    threads: int | None = None  # default the target's

    def __post_init__(self):
        _check(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        _check(self.tune_trials >= 0, f"--tune-trials must be >= 0, got {self.tune_trials}")
        _check(self.tune_minutes >= 0, f"--tune-minutes must be >= 0, got {self.tune_minutes}")
        self._check_reach()
        _check(self.calib_images >= 1, f"calibration images must be >= 1, got {self.calib_images}")
        _check(self.eval_images >= 1, f"evaluation images must be >= 1, got {self.eval_images}")


def calibration_root(folder: str | None = None) -> str:
    """Where latency tables are found and written: `folder`, else $TRP_EDGE_CALIBRATION, else ./calibration."""
    return folder or os.environ.get("TRP_EDGE_CALIBRATION") or "calibration"


def _check_device_options(cfg) -> None:
    """What DeployConfig and CalibrateConfig check alike (a protocol read from JSON becomes a ProfileConfig)."""
    _check(cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")
    _check(cfg.timeout > 0, f"--timeout must be > 0, got {cfg.timeout}")
    cfg._check_reach()
    if isinstance(cfg.protocol, Mapping):
        object.__setattr__(cfg, "protocol", ProfileConfig(**cfg.protocol))


@dataclass(frozen=True)
class DeployConfig(DeviceReach):
    """`trp-edge deploy`: build (or reuse) a model's artifacts for a target, run them on the device (over
    TVM RPC, on this machine with `local`, or under qemu with `emulate`) and write latency reports."""

    target: str
    model: str | None = None
    runtimes: str = "all"
    local: bool = False
    emulate: bool = False
    threads: int | None = None
    tune_trials: int = 0
    tune_minutes: float = 0.0
    tuning_db: str | None = None
    reports: str = "reports"
    timeout: float = 900.0
    layers: bool = True
    protocol: ProfileConfig = ProfileConfig()
    compare: tuple[str, ...] = ()  # other compress outputs timed in the same run, side by side
    # None: the precisions compress chose the ranks for (its --precision, recorded in report.json), so the default
    # path never times INT8 pairs nobody checked; INT8 only where the runtime builds it (ORT, TFLite)
    precision: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "compare", tuple(self.compare))
        object.__setattr__(self, "precision", names(self.precision))
        bad = [p for p in self.precision or () if p not in PRECISIONS]
        _check(not bad, f"--precision: unknown {bad[0] if bad else ''!r}: use fp32, int8 or fp32,int8")
        _check(not (self.local and self.emulate), "--local and --emulate exclude each other")
        _check(not ((self.local or self.emulate) and (self.host or self.tracker)),
               "--local/--emulate run here; drop --host/--tracker")
        _check(self.tune_trials >= 0 and self.tune_minutes >= 0, "--tune-trials and --tune-minutes must be >= 0")
        _check_device_options(self)


# the calibration protocol: each layer is small, so fewer runs per block and a short minimum
CALIBRATION_PROTOCOL = ProfileConfig(warmup=2, block=3, min_runs=9, min_seconds=0.05, max_seconds=10)


@dataclass(frozen=True)
class CalibrateConfig(DeviceReach):
    """`trp-edge calibrate`: measure every eligible conv of `model`, dense and as low-rank pairs over a grid of
    ranks in each of `schemes`, with `runtime` (ort, tflite) at `precision` (fp32, int8) and `threads`
    (default: the target's), here with `local` or on the device (connection as for deploy: host/port,
    tracker/key, else the target's [rpc]).

    input_size / data: the input the layers see (default: the model's own size; data takes size and channels
    from a data set). out: the table goes to OUT/<target>/<runtime>/<stem>.{csv,json}
    (trp_edge.latency_table.table_path)."""

    model: str
    target: str = "host"
    schemes: tuple[str, ...] = SCHEME_NAMES
    runtime: str = "ort"
    precision: str = "fp32"
    threads: int | None = None
    local: bool = False
    out: str | None = None  # default calibration_root()
    input_size: int | None = None
    data: str | None = None
    trust_pickle: bool = False
    timeout: float = 1800.0
    protocol: ProfileConfig = CALIBRATION_PROTOCOL

    def __post_init__(self):
        object.__setattr__(self, "schemes", tuple(self.schemes))
        _check(self.runtime in RUNTIMES, f"calibration runtime {self.runtime!r} is not supported: use "
               f"{', '.join(RUNTIMES)}")
        _check(self.precision in PRECISIONS, f"unknown precision {self.precision!r}: use {' or '.join(PRECISIONS)}")
        _check(bool(self.schemes), f"--schemes: name at least one of {', '.join(SCHEME_NAMES)}")
        bad = [s for s in self.schemes if s not in SCHEME_NAMES]
        _check(not bad, f"unknown scheme {bad[0] if bad else ''!r}: use one of {', '.join(SCHEME_NAMES)}")
        _check(not (self.local and (self.host or self.tracker)), "--local measures here; drop --host/--tracker")
        _check_device_options(self)
        _check(self.input_size is None or self.input_size >= 8, f"input size must be >= 8, got {self.input_size}")
