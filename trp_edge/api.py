"""The public workflow functions, wired: `trp_edge.compress` is the compress workflow given how it finds or measures
its latency tables (the calibrate workflow) and how it times its latency check (the local session deploy uses),
so that trp_edge.workflows.compress itself reaches no device. build, deploy and calibrate need no wiring.

    trp_edge.compress(model, **options) -> CompressResult      trp_edge.build(cfg | **options) -> BuildResult
    trp_edge.deploy(cfg | **options) -> DeployResult          trp_edge.calibrate(cfg | **options) -> CalibrationResult
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .workflows.build import BuildResult, build
from .workflows.calibrate import CalibrationResult, calibrate, deployment_tables
from .workflows.deploy import DeployResult, deploy

if TYPE_CHECKING:
    from torch import nn

    from .config import CompressConfig
    from .workflows.compress import CompressResult, Services

__all__ = ["BuildResult", "CalibrationResult", "DeployResult", "build", "calibrate", "compress", "deploy",
           "services"]


def run_here(job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """A device job on this machine, through the session `deploy --local` opens (the same job runner, versioning
    and process), so compress's latency check and deploy time a model one way."""
    from .targets import load_target
    from .transport import open_session

    with open_session(load_target("host"), local=True) as session:
        return session.call("bench", job, files)


def services() -> Services:
    from .workflows.compress import Services

    return Services(find_tables=deployment_tables, run_job=run_here)


def compress(cfg: CompressConfig | nn.Module | str, /, *, progress: bool = True, on_step=None,
             **options: Any) -> CompressResult:
    """`trp-edge compress` (trp_edge.workflows.compress.compress): load -> TRP training -> decomposition -> ONNX
    export and report. `cfg`: a CompressConfig, or a model (an nn.Module, a name or a file) with the CLI's options
    as keywords (`data=`, `scheme=`, `energy=`, `epochs=`, `out=`, ...). Returns the CompressResult."""
    from .workflows import compress as flow

    return flow.compress(cfg, services=services(), progress=progress, on_step=on_step, **options)
