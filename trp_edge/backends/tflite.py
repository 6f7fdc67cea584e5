"""TFLite: fp32 and static INT8 .tflite files converted from the torch models with litert-torch (no
TensorFlow), run here by ai-edge-litert and on a device by ai-edge-litert or tflite-runtime.

The converter lives in its own environment (see litert_convert.py); tools/setup.sh creates it as
.venv-litert, or point $TRP_EDGE_LITERT_PYTHON at a python that has litert-torch and trp_edge."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ConversionError, InputError, MissingTool, TrpEdgeError
from ..latency_table import DENSE, NET
from .base import Artifact, Capabilities, Lowered, ModelFiles, Run, Samples, Source, calibration_images

if TYPE_CHECKING:
    from ..config import BuildConfig, CalibrateConfig
    from ..targets import Target

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent.parent
OPS_NOTE = ("no per-layer breakdown: the Python TFLite interpreters (ai-edge-litert 2.3, tflite-runtime 2.14) "
            "expose no op profiler")
CAPABILITIES = Capabilities(int8=True, in_net=False, version_key="ai_edge_litert", other_packages=("tflite_runtime",),
                            ops_note=OPS_NOTE)


def _interpreter(path: str, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the older runtime a board may have instead
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    return Interpreter(model_path=str(path), num_threads=threads)


def load_signature(path: str, signature: str, threads: int = 1) -> Run:
    """One signature of a multi-signature .tflite (a calibration grid: tflite_grid), run on its one input; a float
    input is quantized first when the signature takes int8."""
    runner = _interpreter(path, threads).get_signature_runner(signature)
    det = runner.get_input_details()["args_0"]

    fed: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the input as fed (NHWC, quantized), per array given

    def run(x: np.ndarray) -> np.ndarray:
        if id(x) not in fed:  # converted once: timing repeats one input, and the conversion is not the model's
            y = x
            if y.ndim == 4 and y.shape[1:] != tuple(det["shape"][1:]):  # NCHW -> the grid's NHWC
                y = np.ascontiguousarray(y.transpose(0, 2, 3, 1))
            if det["dtype"] == np.int8:
                scale, zero = det["quantization"]
                y = np.clip(np.round(y / scale) + zero, -128, 127).astype(np.int8)
            fed.clear()
            fed[id(x)] = (x, y)
        return next(iter(runner(args_0=fed[id(x)][1]).values()))

    return run


def load(path: str, threads: int = 1, device: str = "cpu") -> Run:
    it = _interpreter(path, threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def run(x: np.ndarray) -> np.ndarray:
        if tuple(inp["shape"]) != x.shape:
            raise ValueError(f"{Path(path).name}: takes input {tuple(inp['shape'])}, got {x.shape}")
        it.set_tensor(inp["index"], x.astype(inp["dtype"]))
        it.invoke()
        return it.get_tensor(out["index"]).copy()

    return run


def profile_ops(path: str, x: np.ndarray, threads: int = 1, device: str = "cpu") -> None:
    return None  # OPS_NOTE


def layer_profile(path: str, x: np.ndarray, threads: int = 1) -> dict[str, Any]:
    raise ConfigError(f"{Path(path).name}: TFLite has no per-layer profile in a whole net ({OPS_NOTE})")


def converter_python() -> Path:
    env = os.environ.get("TRP_EDGE_LITERT_PYTHON")
    return Path(env) if env else _REPO / ".venv-litert" / "bin" / "python"


def check_converter() -> None:
    """The converter's environment is here (else one MissingTool line)."""
    if not converter_python().is_file():
        raise MissingTool(f"the TFLite converter environment is missing ({converter_python()}): run tools/setup.sh "
                           "or set TRP_EDGE_LITERT_PYTHON to a python with litert-torch==0.10.0 and trp-edge")


def check_available(target: Target, src: Source) -> None:
    if any(v.torch is None for v in src.variants):
        raise InputError(f"{src.path}: TFLite is converted from the torch model; pass a trp-edge compress output "
                         "folder (an ONNX file alone cannot be converted without TensorFlow)")
    check_converter()
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        raise MissingTool("ai-edge-litert is not installed: pip install 'trp-edge[tflite]'") from None


def _run_converter(args: list[str], what: str) -> None:
    cmd = [str(converter_python()), "-m", "trp_edge.backends.litert_convert", *args]
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        raise ConversionError(f"TFLite conversion of {what} failed: {err[-1][:300]}")


def convert(model_pt: Path, out: Path, shape: tuple[int, ...], calib: np.ndarray | None, folder: Path) -> None:
    args = [str(model_pt.resolve()), str(out.resolve()), "--shape", ",".join(map(str, shape))]
    calib_file = folder / f".{out.stem}.calib.npy"
    if calib is not None:
        np.save(calib_file, calib)
        args += ["--int8", str(calib_file.resolve()), str(out.with_suffix(".int8.tflite").resolve())]
    try:
        _run_converter(args, model_pt.name)
    finally:
        calib_file.unlink(missing_ok=True)


def build(src: Source, target: Target, folder: Path, cfg: BuildConfig, samples: Samples | None,
          measurer: Any = None) -> tuple[list[Artifact], dict[str, Any]]:
    """`measurer` (where TVM tuning times kernels) is not used: nothing here is tuned."""
    arts = []
    int8 = cfg.int8 and samples is not None
    for v in src.variants:
        log.info("tflite: converting %s%s", v.name, " (fp32 and INT8)" if int8 else "")
        out, own = folder / f"{v.name}.tflite", v.int8.get("tflite")
        convert(v.torch, out, src.input_shape, samples.calib if int8 and own is None else None, folder)
        arts.append(Artifact(v.name, out.name, "tflite", extra={"layout": "NCHW input (transposed inside)"}))
        if int8:
            if own is not None:  # INT8 from its own model: convert it, keep only the quantized file
                tmp = folder / f".{v.name}-int8-source.tflite"
                convert(own.torch, tmp, src.input_shape, samples.calib, folder)
                os.replace(tmp.with_suffix(".int8.tflite"), folder / f"{v.name}.int8.tflite")
                tmp.unlink(missing_ok=True)
            arts.append(Artifact(v.name, f"{v.name}.int8.tflite", "tflite", precision="int8",
                                 extra={"fp32_file": out.name, "quantization": "static INT8 (ai-edge-quantizer, "
                                        "min/max calibration), float32 input and output",
                                        **v.int8_extra("tflite", from_torch=True)}))
    import ai_edge_litert

    return arts, {"runtime_version": {"ai_edge_litert": getattr(ai_edge_litert, "__version__", "unknown")},
                  "converter": "litert-torch 0.10.0", "profiling": OPS_NOTE}


def int8_artifact(model: ModelFiles, work: Path, name: str, shape: tuple[int, ...], calib: np.ndarray,
                  target: Target) -> Path:
    """The net as build converts it (full-integer, from its torch file), in `work`: <name>.int8.tflite."""
    check_converter()
    out = work / f"{name}.tflite"
    convert(model.torch(), out, shape, calib, work)
    return out.with_suffix(".int8.tflite")


# ---- calibration: each layer's grid one .tflite with a signature per variant; the whole net converted ----


def lower_calibration(groups: dict[str, dict[str, Any]], cfg: CalibrateConfig,
                      tmp: Path) -> dict[str, tuple[list, Lowered]]:
    """Each layer's grid one .tflite with a signature per variant, written directly (tflite_grid: no conversion
    per grid point; INT8 full-integer). {group: (artifacts, files)}."""
    from .tflite_grid import grid_model

    out: dict[str, tuple[list, Lowered]] = {}
    for gi, (key, g) in enumerate(groups.items()):
        file = tmp / f"grid{gi}.tflite"
        if key == NET:  # the whole net goes through the converter, as build does
            lowered = _lower_net(g, cfg, tmp)
            if lowered:
                out[key] = lowered
            continue
        sigs = {f"v{vi}": _convs(m) for vi, m in enumerate(g["variants"].values())}
        file.write_bytes(grid_model(tuple(g["input_shape"]), sigs, int8=cfg.precision == "int8"))
        arts = [{"variant": variant, "file": file.name, "signature": f"v{vi}"}
                for vi, variant in enumerate(g["variants"])]
        out[key] = (arts, {file.name: file})
    return out


def _convs(module) -> list[dict[str, Any]]:
    """A dense conv or a low-rank pair as the conv chain grid_model writes ([] for the per-call model)."""
    from torch import nn

    chain = [module] if isinstance(module, nn.Conv2d) else [module.first, module.second] \
        if hasattr(module, "first") else []
    return [{"out": m.out_channels, "k": m.kernel_size, "s": m.stride, "p": m.padding, "d": m.dilation}
            for m in chain]


def _lower_net(g: dict[str, Any], cfg: CalibrateConfig, tmp: Path) -> tuple[list, Lowered] | None:
    """The whole dense net converted with litert-torch (INT8: quantized as build does, on random images), or
    None with a warning when it does not convert (or the converter is missing): the table then predicts the convs
    only."""
    import torch

    pt, file = tmp / "net.pt2", tmp / "net.tflite"
    calib = calibration_images(g["input_shape"]) if cfg.precision == "int8" else None
    try:
        check_converter()
        torch.export.save(torch.export.export(g["variants"][DENSE], (torch.zeros(g["input_shape"]),)), str(pt))
        convert(pt, file, tuple(g["input_shape"]), calib, tmp)
    except (TrpEdgeError, RuntimeError) as e:
        log.warning("calibrate: the whole net did not convert to TFLite (%s): the table predicts the convs only",
                    str(e).splitlines()[0][:200])
        return None
    if calib is not None:
        file = file.with_suffix(".int8.tflite")
    return [{"variant": DENSE, "file": file.name}], {file.name: file}
