import json
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from trp_edge.cli import main
from trp_edge.export import onnx_macs


def run(args, cwd: Path):
    import os

    runner = CliRunner()

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)


REPORT_KEYS = {"scheme", "energy", "nuclear", "period", "dense", "compressed", "mac_speedup", "layers", "onnx",
               "trajectory"}


# full-size ResNet-18 at 224x224: decomposed, exported and timed (about 60 s of CPU)
@pytest.mark.slow
def test_compress_a_torchvision_resnet18_state_dict(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pt")
    # MAC-based here (the default measures ResNet-18's latency table first: about 100 s; tests/test_calibrate.py
    # covers that path on a small model)
    res = run(["compress", "resnet18.pt", "--scheme", "spatial", "--no-calibrate", "-q"], tmp_path)
    assert res.exit_code == 0, res.output
    out = tmp_path / "trp-edge-out" / "resnet18"
    for name in ("compressed.pt", "dense.pt", "dense.onnx", "model.onnx", "report.json", "ranks.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= r.keys()
    assert r["scheme"] == "spatial" and r["energy"] == 0.02 and r["input_shape"] == [1, 3, 224, 224]
    for side in ("dense", "compressed"):
        assert {"macs", "params", "accuracy"} <= r[side].keys() and r[side]["accuracy"] is None
    assert r["mac_speedup"] == pytest.approx(r["dense"]["macs"] / r["compressed"]["macs"])
    # MACs agree with an independent count of the exported graphs within 1 %
    assert abs(onnx_macs(out / "dense.onnx") - r["dense"]["macs"]) <= 0.01 * r["dense"]["macs"]
    assert abs(onnx_macs(out / "model.onnx") - r["compressed"]["macs"]) <= 0.01 * r["compressed"]["macs"]
    layers = {la["name"]: la for la in r["layers"]}
    assert "1x1" in layers["layer2.0.downsample.0"]["reason"]  # not eligible for the spatial scheme
    for la in r["layers"]:
        assert {"name", "scheme", "rank", "full_rank", "macs_dense", "macs_lowrank", "reason"} <= la.keys()
        assert (la["rank"] is None) == (la["reason"] is not None)
    assert "resnet18: spatial scheme" in res.output
    lat = r["latency"]  # host onnxruntime timing, reported beside the MAC speedup
    assert lat["runtime"] == "onnxruntime" and lat["threads"] == 1 and lat["device"]["cores"] >= 1
    for side in ("dense", "compressed"):
        assert lat[side]["runs"] >= 20 and lat[side]["p10_ms"] <= lat[side]["median_ms"] <= lat[side]["p90_ms"]
    assert lat["latency_speedup"] == pytest.approx(lat["dense"]["median_ms"] / lat["compressed"]["median_ms"])
    assert lat["efficiency"] == pytest.approx(lat["latency_speedup"] / r["mac_speedup"])
    assert "latency here (onnxruntime" in res.output


# TRP training, exports and the report through the CLI (about 40 s of CPU)
@pytest.mark.slow
def test_train_decompose_and_report_on_synthetic_data(tmp_path):
    res = run(["compress", "resnet20", "--data", "synthetic:1x16x16", "--steps", "24", "--period", "4", "--batch", "32",
               "--nuclear", "3e-4", "--scheme", "channel", "--lr", "0.05", "--out", "o", "-q", "--no-latency",
               "--no-calibrate"],
              tmp_path)
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [t["step"] for t in r["trajectory"]] == [0, 4, 8, 12, 16, 20, 24]
    final = r["trajectory"][-1]
    assert final.get("final") and final["ranks"] == r["trajectory"][-2]["ranks"]  # the last TSVD's ranks
    decomposed = {la["name"]: la["rank"] for la in r["layers"] if la["rank"] is not None}
    assert decomposed and all(final["ranks"][n] == k for n, k in decomposed.items())
    # the decomposition reproduces the TRP output exactly, so nothing is lost at decomposition
    assert r["compressed"]["accuracy"] == r["dense"]["accuracy"]
    assert r["dense"]["accuracy"] is not None and r["compressed"]["accuracy"] is not None
    assert r["training"]["steps"] == 24
    assert r["onnx"]["max_abs_diff"] < 1e-4
    assert abs(onnx_macs(tmp_path / "o" / "model.onnx") - r["compressed"]["macs"]) <= 0.01 * r["compressed"]["macs"]


# ResNet-20 at 32x32 through compress and its ONNX exports (about 10 s of CPU)
@pytest.mark.slow
def test_target_speedup_is_met(tmp_path):
    res = run(["compress", "resnet20", "--steps", "0", "--target-speedup", "2.5", "--scheme", "channel",
               "--out", "o", "-q", "--no-latency", "--no-calibrate"], tmp_path)
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["mac_speedup"] >= 2.5 and r["target_speedup"] == 2.5
    # every decomposed layer keeps the energy rank of the energy found: at least 1 - e of its energy
    kept = [la for la in r["layers"] if la["rank"] is not None]
    assert kept and all(la["rank"] == la["energy_rank"] and la["kept_energy"] >= 1 - r["energy"] - 1e-9 for la in kept)


@pytest.mark.parametrize("args,message", [
    (["compress", "missing.pt"], "missing.pt: no such file"),
    (["compress", "corrupt.pt"], "not a readable PyTorch file"),
    (["compress", "odd.pt", "--arch", "vgg17"], "unknown architecture 'vgg17'"),
    (["compress", "odd.pt"], "matches no known architecture"),
    (["compress", "resnet20", "--energy", "1.5"], "energy must be in (0, 1)"),
    (["compress", "resnet20", "--energy", "0"], "energy must be in (0, 1)"),
    (["compress", "resnet20", "--data", "fashion-mnist:/nonexistent", "--steps", "2"], "no such data directory"),
    (["compress", "resnet20", "--epochs", "1"], "TRP training needs data"),
    (["compress", "resnet20", "--steps", "0", "--target-speedup", "1000", "--no-calibrate"], "out of reach"),
    (["compress", "resnet20", "--steps", "0", "--ranks", "nope=3"], "layers the model does not have"),
])
def test_bad_input_is_one_clear_line_and_keeps_what_was_written(tmp_path, args, message):
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02not a pickle at all")
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "odd.pt")
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text('{"keep": true}')
    res = run([*args, "--out", "o", "--force"] if "--force" not in args else args, tmp_path)
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.output
    assert (out / "report.json").read_text() == '{"keep": true}'


# a whole compress of ResNet-20 at 32x32 (about 10 s of CPU; it measured a latency table too, now not)
@pytest.mark.slow
def test_an_existing_out_needs_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("old")
    res = run(["compress", "resnet20", "--steps", "0", "--out", "o"], tmp_path)
    assert res.exit_code != 0 and "--force" in res.output
    assert (out / "report.json").read_text() == "old"
    res = run(["compress", "resnet20", "--steps", "0", "--out", "o", "--force", "-q", "--no-latency",
               "--no-calibrate"], tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["model"] == "resnet20"


def test_a_full_disk_is_one_clear_line_and_keeps_what_was_written(tmp_path, monkeypatch):
    import errno
    import os

    import trp_edge.workflows.compress

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "o" / "dense.onnx"))

    monkeypatch.setattr(trp_edge.workflows.compress, "compress", full)
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("old")
    res = run(["compress", "resnet20", "--steps", "0", "--out", "o", "--force"], tmp_path)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0].startswith("Error: the disk is full writing ") and "dense.onnx" in lines[0]
    assert (out / "report.json").read_text() == "old"
