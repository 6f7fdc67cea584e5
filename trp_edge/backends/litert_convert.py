"""torch -> .tflite with litert-torch, fp32 and static INT8 (ai-edge-quantizer, float input/output).

Runs inside the converter's own environment (.venv-litert: litert-torch pins typing-extensions<4.13 via
xdsl, apache-tvm-ffi needs >=4.13), called by trp_edge.backends.tflite:

    python -m trp_edge.backends.litert_convert MODEL.pt OUT.tflite --shape 1,1,28,28 [--int8 CALIB.npy OUT_INT8]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")


def convert_fp32(model, example) -> bytes:
    import litert_torch

    return litert_torch.convert(model.eval(), (example,)).model_content()


def quantize_int8(fp32: bytes, calib, input_name: str = "args_0", signature: str = "serving_default") -> bytes:
    """Static INT8 weights and activations; input and output stay float32 (a QUANTIZE after the input and a
    DEQUANTIZE before the output). Ranges are plain min/max over the calibration images: the quantizer's
    own calibrate() averages ranges with a 0.95 factor and clipped badly with few samples."""
    import numpy as np
    from ai_edge_quantizer import calibrator, qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.utils import qsv_utils

    rm = recipe_manager.RecipeManager()
    rm.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
    rm.add_quantization_config(".*", qtyping.TFLOperationName.INPUT, algorithm_key=AlgorithmName.NO_QUANTIZE)
    rm.add_quantization_config(".*", qtyping.TFLOperationName.OUTPUT, algorithm_key=AlgorithmName.NO_QUANTIZE)
    qt = quantizer.Quantizer(bytes(fp32), rm.get_quantization_recipe())
    cal = calibrator.Calibrator(bytes(fp32), num_threads=1, qsv_update_func=qsv_utils.min_max_update)
    cal.calibrate({signature: [{input_name: np.ascontiguousarray(x[None], np.float32)} for x in calib]}, rm)
    return bytes(qt.quantize(cal.get_model_qsvs(), enable_progress_report=False).quantized_model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--shape", required=True)
    ap.add_argument("--int8", nargs=2, metavar=("CALIB_NPY", "OUT"))
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from trp_edge.models import load_model

    torch.set_num_threads(1)
    model = load_model(args.model).model.eval()
    example = torch.zeros(*(int(s) for s in args.shape.split(",")))
    try:
        fp32 = convert_fp32(model, example)
    except Exception as e:  # noqa: BLE001 - one line for the caller
        print(f"litert-torch cannot convert {args.model}: {str(e).strip().splitlines()[0][:300]}", file=sys.stderr)
        return 1
    with open(args.out, "wb") as f:
        f.write(fp32)
    if args.int8:
        q = quantize_int8(fp32, np.load(args.int8[0]))
        with open(args.int8[1], "wb") as f:
            f.write(q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
