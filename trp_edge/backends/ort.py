"""ONNX Runtime: the graph optimized for the target and saved (fp32), and a static INT8 (QDQ) model
calibrated on real images.

Graph optimizations are saved at ORT_ENABLE_ALL only for the host itself: that level adds layout
transforms (NCHWc) specific to this CPU; a foreign target gets the portable ORT_ENABLE_EXTENDED level
and finishes optimizing when it loads the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..build import Artifact, Samples, Source
from ..config import BuildConfig
from ..errors import TrpEdgeError
from ..targets import Target

log = logging.getLogger(__name__)


def check_available(target: Target, src: Source) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise TrpEdgeError("onnxruntime is not installed: pip install 'trp-edge[onnx]'") from None


def optimize(src_onnx: Path, dst: Path, level_all: bool) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level_all
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3  # the NCHWc warning is the point of level_all on the host
    try:
        ort.InferenceSession(str(src_onnx), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise TrpEdgeError(f"{src_onnx}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None


def quantize_int8(src_onnx: Path, dst: Path, calib: np.ndarray, workdir: Path) -> None:
    """Static INT8, QDQ format, per-channel weights (s8), u8 activations, calibrated with MinMax."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(src_onnx), load_external_data=False).graph.input[0].name
    pre = workdir / f".{dst.stem}.pre.onnx"
    quant_pre_process(str(src_onnx), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib[i: i + 1] for i in range(len(calib)))

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.items, None)
            return None if x is None else {name: x}

    try:
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)
        for f in workdir.glob("augmented_model*.onnx"):
            f.unlink()


def build(src: Source, target: Target, folder: Path, cfg: BuildConfig,
          samples: Samples | None) -> tuple[list[Artifact], dict[str, Any]]:
    arts = []
    level = "all" if target.native else "extended"
    for v in src.variants:
        fp32 = f"{v.name}.onnx"
        optimize(v.onnx, folder / fp32, level_all=target.native)
        arts.append(Artifact(v.name, fp32, "ort", extra={"optimization": level}))
        if cfg.int8 and samples is not None:
            q = f"{v.name}.int8.onnx"
            log.info("ort: quantizing %s to INT8 (QDQ) on %d images from %s", v.name, len(samples.calib),
                     samples.origin)
            cwd, src_onnx, dst, work = os.getcwd(), v.onnx.resolve(), (folder / q).resolve(), folder.resolve()
            try:  # the quantizer writes its scratch models into the working directory
                os.chdir(work)
                quantize_int8(src_onnx, dst, samples.calib, work)
            finally:
                os.chdir(cwd)
            arts.append(Artifact(v.name, q, "ort", precision="int8",
                                 extra={"fp32_file": fp32, "quantization": "static QDQ, s8 per-channel weights, "
                                        "u8 activations, MinMax calibration"}))
    import onnxruntime

    return arts, {"runtime_version": {"onnxruntime": onnxruntime.__version__}}
