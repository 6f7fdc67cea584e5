"""torch -> ExecuTorch .pte with the XNNPACK delegate, fp32 and INT8 (PT2E with XNNPACKQuantizer): the program a
PyTorch user makes by hand (`to_edge_transform_and_lower(torch.export.export(m, (x,)),
partitioner=[XnnpackPartitioner()])`), plus one constant method, CONVS_METHOD, that lists the model's convs.

XNNPACK's profile (ETDump) names its ops after XNNPACK operators ("Convolution (NHWC, F32) IGEMM #3"), not after
graph nodes (its preprocess leaves no debug handles), so the program carries what the device needs to map them
back: one row per conv call in execution order (out and in channels, kernel, output size, groups, layer tag).
runtime.py lines the events up with these rows by order and kernel class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .runtime import CONVS_METHOD  # the method export writes: its one name lives with its reader

CONV_COLUMNS = ("out_c", "in_c", "kh", "kw", "oh", "ow", "groups", "tag")


def conv_rows(module, example, tags: list[int] | None = None):
    """One row per nn.Conv2d call in execution order (CONV_COLUMNS; tag -1 without `tags`), as an int64 tensor.
    Refuses `tags` whose length is not the number of calls (a conv called twice, say) with ConversionError."""
    import torch
    from torch import nn

    from ...errors import ConversionError

    rows: list[list[int]] = []

    def hook(m, _inp, out):
        rows.append([m.out_channels, m.in_channels, *m.kernel_size, *out.shape[-2:], m.groups, -1])

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    if tags is not None:
        if len(tags) != len(rows):
            raise ConversionError(f"{len(rows)} conv calls, {len(tags)} layer tags expected")
        for r, t in zip(rows, tags):
            r[-1] = t
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, len(CONV_COLUMNS))


def quantized(module, example, calib: np.ndarray):
    """`module` through PT2E with XNNPACKQuantizer (symmetric, per-channel weights, static activations),
    calibrated on `calib` one image at a time, as an exported program."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, (example,)).module(), q)
    with torch.no_grad():
        for x in calib:
            prepared(torch.from_numpy(np.ascontiguousarray(x[None], np.float32)))
    return torch.export.export(convert_pt2e(prepared), (example,))


def programs(modules: dict[str, Any], shape: tuple[int, ...], calib: np.ndarray | None = None,
             tags: list[int] | None = None) -> bytes:
    """One .pte holding a method per module ("forward" for a single model, or one per grid variant), each lowered
    to XNNPACK (INT8 through PT2E when `calib` is given), and CONVS_METHOD listing the first module's convs."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = torch.zeros(shape)
    eps = {}
    for name, m in modules.items():
        m = m.eval()
        eps[name] = quantized(m, example, calib) if calib is not None else torch.export.export(m, (example,))
    convs = conv_rows(next(iter(modules.values())), example, tags)
    edge = to_edge_transform_and_lower(eps, partitioner=[XnnpackPartitioner()], constant_methods={CONVS_METHOD: convs})
    return edge.to_executorch().buffer


def write(module, shape: tuple[int, ...], path: Path, calib: np.ndarray | None = None,
          tags: list[int] | None = None) -> Path:
    """`module` as one .pte at `path` (method "forward"); errors of the exporter become one ConversionError."""
    from ...errors import ConversionError

    try:
        data = programs({"forward": module}, shape, calib, tags)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the caller
        raise ConversionError(f"ExecuTorch cannot export {path.stem}: {str(e).strip().splitlines()[0][:300]}") from e
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
