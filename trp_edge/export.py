"""ONNX export, each file validated with onnxruntime against torch, and an independent MAC count of
an ONNX graph (Conv and Gemm/MatMul nodes from the inferred shapes)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ConversionError, InputError, MissingTool, ValidationError

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingTool(f"{module} is not installed: pip install 'trp-edge[{extra}]'") from None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, atol: float = 1e-4,
                rtol: float = 1e-3) -> float:
    """Write `model` as ONNX to `path` (atomically), run it in onnxruntime on a random input and compare
    with torch. Returns the max abs diff; raises ValidationError above atol + rtol * |torch|."""
    _require("onnx", "onnx")
    model = model.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamo=True, external_data=False, verbose=False)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            tmp.unlink(missing_ok=True)
            raise ConversionError(f"ONNX export of {path.name} failed: {str(e).splitlines()[0][:200]}") from e
    try:
        diff = validate_onnx(model, tmp, example.shape, atol=atol, rtol=rtol, name=path.name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return diff


def validate_onnx(model: nn.Module, path: Path, shape, *, atol: float = 1e-4, rtol: float = 1e-3,
                  seed: int = 0, name: str | None = None) -> float:
    _require("onnxruntime", "onnx")
    from .backends.ort import load

    name = name or path.name
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model.eval()(x.to(next(model.parameters()).device)).cpu().numpy()
    try:
        run = load(str(path))  # the session every other ORT figure uses
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"{name}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from e
    got = run(x.numpy())
    if got.shape != ref.shape:
        raise ValidationError(f"{name}: output shape {got.shape} differs from torch's {ref.shape}")
    diff = float(np.max(np.abs(got - ref)))
    bound = atol + rtol * float(np.max(np.abs(ref)))
    if not diff <= bound:
        raise ValidationError(f"{name}: onnxruntime differs from torch by {diff:.3g} (> {bound:.3g})", diff)
    log.info("%s: onnxruntime matches torch, max abs diff %.3g", name, diff)
    return diff


def onnx_macs(path: Path) -> int:
    """MACs of an ONNX graph (batch as exported), counted from its Conv, Gemm and MatMul nodes."""
    onnx = _require("onnx", "onnx")
    try:
        m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:160]})") from e
    shapes: dict[str, list[int]] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]  # (n, c/g, kh, kw)
            out = shapes[node.output[0]]  # (b, n, ho, wo)
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            trans_a = any(att.name == "transA" and att.i for att in node.attribute)
            k = a[-2] if trans_a else a[-1]
            total += int(np.prod(out)) * k
    return total
