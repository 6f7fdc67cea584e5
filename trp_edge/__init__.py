"""trp-edge: Trained Rank Pruning (Xu et al., IJCAI 2020) for CNNs, lowered to edge devices.

The public API is imported lazily, so `import trp_edge` (and `trp-edge --help`) load no torch. The four workflows
are functions here, each taking a config or the CLI's options as keywords and returning a typed result:

    trp_edge.compress(model, **options) -> CompressResult      trp_edge.build(cfg | **options) -> BuildResult
    trp_edge.deploy(cfg | **options) -> DeployResult          trp_edge.calibrate(cfg | **options) -> CalibrationResult

They are wired in trp_edge.api; their modules live in trp_edge.workflows, so the function trp_edge.compress and
the module never collide."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "CompressConfig": "config", "DecomposeConfig": "config", "TRPConfig": "config", "BuildConfig": "config",
    "DeployConfig": "config", "CalibrateConfig": "config", "ProfileConfig": "config",
    "TrpEdgeError": "errors", "InputError": "errors", "ConfigError": "errors", "ValidationError": "errors",
    "DeviceError": "errors", "DeviceTimeout": "errors", "MissingTool": "errors", "ConversionError": "errors",
    "CompressReport": "report", "LatencyTable": "latency_table", "load_table": "latency_table",
    "load_model": "models", "load_data": "data",
    "decompose_": "planning", "SCHEMES": "lowrank", "energy_rank": "lowrank", "LowRankConv2d": "lowrank",
    "TRPTrainer": "trp", "count_macs": "flops", "export_onnx": "export",
    "compress": "api", "CompressResult": "workflows.compress", "build": "api", "BuildResult": "api",
    "deploy": "api", "DeployResult": "api", "calibrate": "api", "CalibrationResult": "api",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'trp_edge' has no attribute {name!r}")
