from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from trp_edge.errors import ValidationError
from trp_edge.export import export_onnx, onnx_macs, validate_onnx
from trp_edge.flops import count_macs


def test_export_is_validated_and_counted(tiny, tmp_path):
    x = torch.zeros(1, 3, 16, 16)
    diff = export_onnx(tiny, x, tmp_path / "m.onnx")
    assert diff < 1e-5
    assert onnx_macs(tmp_path / "m.onnx") == count_macs(tiny, x).total
    assert not list(tmp_path.glob(".*tmp"))


def test_a_corrupted_artifact_fails_validation(tiny, tmp_path):
    x = torch.zeros(1, 3, 16, 16)
    export_onnx(tiny, x, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    init = max(m.graph.initializer, key=lambda t: int(torch.tensor(t.dims).prod()))
    arr = numpy_helper.to_array(init).copy()
    arr *= -1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ValidationError, match="differs from torch") as e:
        validate_onnx(tiny, tmp_path / "bad.onnx", x.shape)
    assert e.value.max_abs_diff > 1e-3
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValidationError, match="cannot load"):
        validate_onnx(tiny, tmp_path / "junk.onnx", x.shape)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_real_fashion_mnist_short_trp_run(tmp_path):
    from trp_edge.api import compress
    from trp_edge.config import CompressConfig, DecomposeConfig, TRPConfig

    cfg = CompressConfig(model="resnet20", data="fashion-mnist", out=str(tmp_path / "o"), calibrate=False,
                         latency=None, decompose=DecomposeConfig(scheme="spatial", energy=0.02),
                         trp=TRPConfig(steps=40, lr=0.05, nuclear=3e-4))
    r = compress(cfg, progress=False).report
    assert r["arch"]["in_channels"] == 1 and r["input_shape"] == [1, 1, 28, 28]
    assert r["dense"]["accuracy"] > r["initial_accuracy"] + 20  # it learns from the real images
    assert abs(r["compressed"]["accuracy"] - r["dense"]["accuracy"]) <= 1.0
