"""ExecuTorch as a runtime: .pte programs built, validated against torch, deployed locally and over RPC, fp32 and
INT8, per-layer rows from ETDump mapped by order and kernel class, a table of its own; and the mapping refused
where the events do not line up."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from trp_edge.cli import main
from trp_edge.errors import ConversionError


def rows(*convs):
    """Conv rows as a program carries them: (out, in, kh, kw, oh, ow, groups, tag)."""
    return np.array([[*c, 1, -1] if len(c) == 6 else c for c in convs], np.int64)


def ev(*names):
    return [(n, [0.1]) for n in names]


def test_events_map_to_convs_by_order_and_kernel_class():
    from trp_edge.backends.executorch.runtime import _conv_events

    convs = rows((8, 3, 3, 3, 16, 16), (2, 8, 3, 1, 16, 16), (8, 2, 1, 3, 16, 16), (8, 8, 1, 1, 16, 16))
    events = ev("Transpose (ND, X32) #1", "Convolution (NHWC, F32) IGEMM #1", "Convolution (NHWC, F32) IGEMM #2",
                "Convolution (NHWC, F32) IGEMM #3", "Add (ND) #1", "Fully Connected (NC, F32) GEMM #1",
                "Global Average Pooling (NWC, F32) #1", "Fully Connected (NC, F32) GEMM #2")
    # the 1x1 conv is XNNPACK's first fully connected op; the second is the classifier, passed over
    assert _conv_events(events, convs) == [1, 2, 3, 5]
    dw = rows((8, 8, 3, 3, 16, 16, 8, -1))
    assert _conv_events(ev("Convolution (NHWC, F32) DWConv #1"), dw) == [0]
    with pytest.raises(ConversionError, match="does not fit"):  # a spatial conv where a depthwise one should be
        _conv_events(ev("Convolution (NHWC, F32) IGEMM #1"), dw)
    with pytest.raises(ConversionError, match="have no XNNPACK event"):  # a conv that ran outside the delegate
        _conv_events(events[:4], convs)
    with pytest.raises(ConversionError, match="left over"):  # more convolutions than the model has convs
        _conv_events(events + ev("Convolution (NHWC, F32) IGEMM #4"), convs)


def test_a_missing_executorch_is_one_line(compressed, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_executorch(name, *a, **k):
        if name.startswith("executorch"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    res = CliRunner().invoke(main, ["build", str(compressed), "--target", "host", "--runtime", "executorch",
                                    "--out", str(tmp_path / "b")])
    assert res.exit_code == 1 and "executorch is not installed: pip install 'executorch==1.5.0'" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.slow
def test_build_validate_and_deploy_locally_fp32_and_int8(compressed, tmp_path):
    pytest.importorskip("executorch.runtime")
    out = compressed / "build"  # where deploy looks for it
    res = CliRunner().invoke(main, ["build", str(compressed), "--target", "host", "--runtime", "executorch"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "host" / "executorch" / "manifest.json").read_text())
    arts = {(a["variant"], a["precision"]): a for a in m["artifacts"]}
    assert set(arts) == {(v, p) for v in ("dense", "compressed") for p in ("fp32", "int8")}
    for (v, p), a in arts.items():
        assert a["file"] == f"{v}{'.int8' if p == 'int8' else ''}.pte" and a["validation"]["status"] == "passed"
        assert a["validation"]["where"] == "native"
    assert arts["compressed", "fp32"]["validation"]["max_abs_diff"] <= 1e-4  # torch's output, to fp32 rounding
    assert 0 <= arts["compressed", "int8"]["accuracy"]["agreement"] <= 1
    assert m["runtime_version"]["executorch"].startswith("1.5")
    res = CliRunner().invoke(main, ["deploy", "--target", "host", "--model", str(compressed), "--local", "--runtime",
                                    "executorch", "--precision", "fp32,int8", "--reports", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "reusing the build" in res.output
    reps = {r["precision"]: r for r in (json.loads(f.read_text()) for f in (tmp_path / "r" / "host").glob("*.json"))}
    assert set(reps) == {"fp32", "int8"}
    fp32 = reps["fp32"]
    assert fp32["runtime"] == "executorch" and fp32["dense"]["median_ms"] > 0 and fp32["compressed"]["median_ms"] > 0
    # per-layer rows from ETDump: every decomposed layer has both times, no kernel left unmatched
    lay = [la for la in fp32["layers"] if la["rank"] is not None]
    assert lay and all(la["dense_ms"] is not None and la["compressed_ms"] is not None for la in lay)
    assert sum(la["dense_ms"] for la in lay) > 0 and sum(la["compressed_ms"] for la in lay) > 0
    assert fp32["layers_unmatched_kernels"] == {"dense": 0, "compressed": 0}
    assert reps["int8"]["fp32_dense"]["median_ms"] == fp32["dense"]["median_ms"]
    # the run's closing line and field: the fastest compressed deployment against the fastest dense one
    f = fp32["fastest"]
    assert f == reps["int8"]["fastest"] and f["deployments"] == 2 and "fastest compressed executorch" in res.output
    assert f["compressed"]["median_ms"] == min(r["compressed"]["median_ms"] for r in reps.values())
    assert f["dense"]["median_ms"] == min(r["dense"]["median_ms"] for r in reps.values())
    assert f["speedup"] == pytest.approx(f["dense"]["median_ms"] / f["compressed"]["median_ms"])


@pytest.mark.slow
def test_calibration_in_place_and_a_table_of_another_runtime_refused(tmp_path):
    pytest.importorskip("executorch.runtime")
    import torch
    from torch import nn

    from trp_edge.backends import capabilities
    from trp_edge.config import CalibrateConfig
    from trp_edge.errors import InputError
    from trp_edge.latency_table import load_table, stale
    from trp_edge.workflows.calibrate import calibrate_model

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    cfg = CalibrateConfig(model="two", runtime="executorch", local=True, out=str(tmp_path))
    res = calibrate_model(cfg, "two", net, torch.zeros(1, 3, 16, 16))
    t = load_table(res.csv, target="host", runtime="executorch", precision="fp32")
    # the whole nets ran and their ETDump events were mapped to the layers: rows as timed in place
    assert t.header["in_net"] is True and t.header["net_ms"] > 0 and set(t.header["layers"]) == {"0", "2"}
    for layer in t.header["layers"]:
        assert t.dense(layer) > 0
        pairs = [r for r in t.rows if r["layer"] == layer and r["scheme"] in ("channel", "spatial")]
        # ETDump counts whole microseconds: a rank-1 pair of a 3-channel conv at 16x16 can profile at 0 in place
        assert pairs and all(r["median_ms"] >= 0 and r["rank"] >= 1 for r in pairs)
        assert any(r["median_ms"] > 0 for r in pairs)
    assert stale(t.header, t.header["device"], capabilities("executorch")) is None
    with pytest.raises(InputError, match="measured with executorch, not ort"):
        load_table(res.csv, target="host", runtime="ort", precision="fp32")
