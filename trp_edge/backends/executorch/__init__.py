"""ExecuTorch (PyTorch's edge runtime): fp32 and INT8 .pte programs lowered to XNNPACK, exported from the torch
models directly (no ONNX detour); run, timed and profiled (ETDump) by executorch.runtime on the device.

- fp32: `to_edge_transform_and_lower(torch.export.export(m, (x,)), partitioner=[XnnpackPartitioner()])`, the
  program a user would make by hand, plus a constant method listing the convs (export.py);
- INT8: PT2E with XNNPACKQuantizer (symmetric, per-channel weights), calibrated on the model's data;
- calibration: each layer's grid one .pte with a method per variant (load_signature), and the whole nets of the
  in-place grid with their convs tagged by layer (layer_profile maps ETDump's events by order and kernel class).

The runtime links libtorch, so a board running it needs torch (an aarch64 wheel exists). A .pte is CPU-portable
(XNNPACK picks its kernels when the program loads), so a foreign target's artifacts are validated on this host
when no emulated userland has torch (CAPABILITIES.host_validates)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError, MissingTool
from ...latency_table import DENSE, NET
from ..base import Artifact, Capabilities, Lowered, ModelFiles, Samples, Source, calibration_images, lower_nets
from .runtime import layer_profile, load, load_signature, profile_ops  # noqa: F401 - the backend's protocol

if TYPE_CHECKING:
    from ...config import BuildConfig, CalibrateConfig
    from ...targets import Target

log = logging.getLogger(__name__)

VERSION = "executorch==1.5.0"  # the release that pairs with torch 2.14 (tools/setup.sh installs it)
CAPABILITIES = Capabilities(int8=True, in_net=True, version_key="executorch",
                            host_validates="CPU-portable .pte; no torch in the emulated userland")
QUANTIZATION = "PT2E, XNNPACKQuantizer: symmetric s8 per-channel weights, static s8 activations, min/max calibration"


def check_available(target: Target, src: Source) -> None:
    if any(v.torch is None for v in src.variants):
        raise InputError(f"{src.path}: ExecuTorch exports the torch model; pass a trp-edge compress output folder "
                         "(an ONNX file alone has no torch model to export)")
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except ImportError:
        raise MissingTool(f"executorch is not installed: pip install '{VERSION}' (it pairs with torch 2.14), or "
                          "choose other runtimes with --runtime") from None


def _model(path: Path):
    from ...models import load_model

    return load_model(str(path)).model.eval()


def build(src: Source, target: Target, folder: Path, cfg: BuildConfig, samples: Samples | None,
          measurer: Any = None) -> tuple[list[Artifact], dict[str, Any]]:
    """Each variant's fp32 .pte, and its INT8 .pte when asked (from the variant's own INT8 model where compress
    merged pairs back for ExecuTorch INT8). `measurer` is not used: nothing here is tuned."""
    from importlib.metadata import version

    from .export import write

    arts = []
    for v in src.variants:
        log.info("executorch: exporting %s%s", v.name, " (fp32 and INT8)" if cfg.int8 and samples else "")
        fp32 = write(_model(v.torch), src.input_shape, folder / f"{v.name}.pte")
        arts.append(Artifact(v.name, fp32.name, "executorch", extra={"delegate": "XNNPACK"}))
        if cfg.int8 and samples is not None:
            own = v.int8.get("executorch", v)
            q = write(_model(own.torch), src.input_shape, folder / f"{v.name}.int8.pte", calib=samples.calib)
            arts.append(Artifact(v.name, q.name, "executorch", precision="int8",
                                 extra={"delegate": "XNNPACK", "fp32_file": fp32.name, "quantization": QUANTIZATION,
                                        **v.int8_extra("executorch", from_torch=True)}))
    return arts, {"runtime_version": {"executorch": version("executorch")}, "exporter": "torch.export + "
                  "to_edge_transform_and_lower, XnnpackPartitioner", "profiling": "ETDump (per XNNPACK op; convs "
                  "mapped to layers by order and kernel class)"}


def int8_artifact(model: ModelFiles, work: Path, name: str, shape: tuple[int, ...], calib: np.ndarray,
                  target: Target) -> Path:
    """The net as build quantizes it (PT2E, from its torch file), in `work`: <name>.int8.pte."""
    from .export import write

    return write(_model(model.torch()), shape, work / f"{name}.int8.pte", calib=calib)


# ---- calibration: each layer's grid one .pte with a method per variant; the whole nets tagged by layer ----


def lower_calibration(groups: dict[str, dict[str, Any]], cfg: CalibrateConfig,
                      tmp: Path) -> dict[str, tuple[list, Lowered]]:
    """Each layer's grid one .pte with a method per variant ("v0", "v1", ...; INT8: each quantized on random
    activations, as the other runtimes' grids), written when its call comes; the NET group's whole nets as
    .pte files whose conv rows carry their layer tag (base.lower_nets). {group: (artifacts, files)}."""
    from functools import partial

    int8 = cfg.precision == "int8"
    out: dict[str, tuple[list, Lowered]] = {}
    for gi, (key, g) in enumerate(groups.items()):
        shape = tuple(g["input_shape"])
        if key == NET and "grid" in g:
            out[key] = lower_nets(g, int8, partial(_lower_net, shape, tmp, int8), _name)
            continue
        if key == NET:
            file = _name("net0", int8)
            out[key] = ([{"variant": DENSE, "file": file}], {file: partial(_lower_net, shape, tmp, int8, "net0",
                                                                           g["variants"][DENSE], None)})
            continue
        file = _name(f"grid{gi}", int8)
        methods = {f"v{vi}": m for vi, m in enumerate(g["variants"].values())}
        arts = [{"variant": variant, "file": file, "signature": f"v{vi}"} for vi, variant in enumerate(g["variants"])]
        out[key] = (arts, {file: partial(_lower_grid, methods, shape, tmp / file, int8)})
    return out


def _name(stem: str, int8: bool) -> str:
    return f"{stem}{'.int8' if int8 else ''}.pte"


def _lower_grid(methods: dict[str, Any], shape: tuple[int, ...], path: Path, int8: bool) -> Path:
    from .export import programs

    path.write_bytes(programs(methods, shape, calibration_images(shape) if int8 else None))
    return path


def _lower_net(shape: tuple[int, ...], tmp: Path, int8: bool, stem: str, model, tags: list[int] | None) -> Path:
    from .export import write

    return write(model, shape, tmp / _name(stem, int8), calib=calibration_images(shape) if int8 else None, tags=tags)
