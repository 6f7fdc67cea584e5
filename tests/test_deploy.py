"""trp-edge serve / deploy / profile / report: a real RPC server (and tracker) on 127.0.0.1, every runtime
deployed through it, the report's figures consistent, and each failure a clear line."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trp_edge.cli import main

from .conftest import EXE, free_port, start, start_tracker, stop

FAST = ["--min-runs", "5", "--min-seconds", "0.05"]
TOP_KEYS = {"target", "runtime", "device", "emulated", "mac_speedup", "dense", "compressed", "latency_speedup",
            "efficiency", "layers"}


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    addr, p = start_tracker(tmp_path_factory.mktemp("tracker") / "log")
    yield addr
    stop(p)


@pytest.fixture(scope="module")
def tracked(tracker, tmp_path_factory):
    """A trp-edge serve registered with the tracker as 'tinybox' (sessions come through the tracker)."""
    port = free_port()
    p = start([EXE, "serve", "--port", str(port), "--tracker", tracker, "--key", "tinybox"], "listening on",
              tmp_path_factory.mktemp("tracked") / "log")
    yield port
    stop(p)


def deploy(args, reports: Path):
    return CliRunner().invoke(main, ["deploy", "--target", "host", "--reports", str(reports), *FAST, *args])


def reports_in(d: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((d / "host").glob("*.json"))]


def int8_bound(r: dict, side: str) -> float:
    """An INT8 model's largest error on the reference input: a fifth of the largest fp32 output there (torch's,
    build/<target>/reference.npz). The tiny ResNet-20's INT8 artifacts are at 3-6% of it (ORT and TFLite); an
    artifact whose outputs were zeros, or another net's, would be at 100% or about."""
    ref = np.load(Path(r["build"]).parent / "reference.npz")[side]
    return 0.2 * float(np.abs(ref).max())


def check_report(r: dict, runtime: str, precision: str = "fp32") -> None:
    assert TOP_KEYS <= r.keys() and r["runtime"] == runtime and r["target"] == "host" and not r["emulated"]
    assert r["precision"] == precision
    for side in ("dense", "compressed"):
        assert {"median_ms", "p10_ms", "p90_ms", "runs"} <= r[side].keys() and r[side]["runs"] >= 5
        assert r[side]["p10_ms"] <= r[side]["median_ms"] <= r[side]["p90_ms"]
        # the device's outputs match torch (INT8: near it, on a random input the ranges were not calibrated for)
        assert r[side]["max_abs_diff"] <= (1e-4 if precision == "fp32" else int8_bound(r, side))
    assert r["latency_speedup"] == pytest.approx(r["dense"]["median_ms"] / r["compressed"]["median_ms"])
    assert r["efficiency"] == pytest.approx(r["latency_speedup"] / r["mac_speedup"])
    assert r["device"]["cores"] >= 1 and r["device"]["runtimes"]["numpy"]


# builds for TVM, ORT, TFLite and ExecuTorch (fp32 and INT8) and times them all over RPC
@pytest.mark.slow
def test_deploy_every_runtime_through_serve(compressed, server, tmp_path):
    res = deploy(["--model", str(compressed), "--host", "127.0.0.1", "--port", str(server), "--precision",
                  "fp32,int8"], tmp_path)
    assert res.exit_code == 0, res.output
    every = {(r["runtime"], r["precision"]): r for r in reports_in(tmp_path)}
    # INT8 where the runtime builds it: over RPC, INT8 dense against INT8 compressed
    assert set(every) == {("tvm", "fp32"), ("ort", "fp32"), ("ort", "int8"), ("tflite", "fp32"), ("tflite", "int8"),
                          ("executorch", "fp32"), ("executorch", "int8")}
    for (rt, prec), r in every.items():
        check_report(r, rt, prec)
        assert r["transport"].startswith("rpc (127.0.0.1")
    for rt in ("ort", "tflite", "executorch"):
        q = every[(rt, "int8")]
        assert q["artifacts"]["compressed"]["file"].endswith((".int8.onnx", ".int8.tflite", ".int8.pte"))
        # the fp32 dense model, timed in the same run, is the reference line
        assert q["fp32_dense"]["median_ms"] == every[(rt, "fp32")]["dense"]["median_ms"]
        assert q["fp32_dense"]["speedup"] == pytest.approx(q["fp32_dense"]["median_ms"] / q["compressed"]["median_ms"])
        assert f"{rt} int8" in res.output
    reps = {rt: r for (rt, prec), r in every.items() if prec == "fp32"}
    for r in reps.values():
        for ext in ("md", "png"):
            assert (tmp_path / "host" / r["files"][{"md": "markdown", "png": "plot"}[ext]]).stat().st_size > 0
    for rt in ("tvm", "ort", "executorch"):  # per-layer breakdown: every decomposed layer has both times
        lay = [la for la in reps[rt]["layers"] if la["rank"] is not None]
        assert lay and all(la["dense_ms"] is not None and la["compressed_ms"] is not None for la in lay), rt
        assert sum(la["compressed_ms"] for la in lay) > 0, rt
        assert reps[rt]["layers_unmatched_kernels"] == {"dense": 0, "compressed": 0}
    assert "no op profiler" in reps["tflite"]["layers_note"]
    # the untuned TVM build is timed against ONNX Runtime's compressed model in the same run
    t = reps["tvm"]["tvm"]
    assert not t["tuned"] and "untuned" not in t and t["ort"]["max_abs_diff"] <= 1e-4
    assert t["ort"]["ratio"] == pytest.approx(t["ort"]["median_ms"] / reps["tvm"]["compressed"]["median_ms"])
    md = (tmp_path / "host" / reps["tvm"]["files"]["markdown"]).read_text()
    assert "ONNX Runtime" in res.output and "ONNX Runtime" in md


def test_a_gpu_artifact_is_skipped_on_a_device_without_that_api(tmp_path, tiny):
    """A TVM build's OpenCL module on a device whose TVM runtime has no OpenCL is not run, and says why; the CPU
    artifacts of the same job still are."""
    import numpy as np
    import torch

    from trp_edge.device.bench import bench

    torch.onnx.export(tiny.eval(), (torch.randn(1, 3, 16, 16),), str(tmp_path / "tiny.onnx"),
                      input_names=["input"], dynamo=False)
    x = torch.randn(1, 3, 16, 16)
    np.savez(tmp_path / "reference.npz", input=x.numpy(), compressed=tiny(x).detach().numpy())
    (tmp_path / "tiny-opencl.so").write_bytes(b"not loaded")
    job = {"runtime": "tvm", "threads": 1, "reference": "reference.npz", "layers": False,
           "protocol": {"warmup": 1, "block": 1, "min_runs": 2, "min_seconds": 0.0},
           "artifacts": [{"variant": "opencl:compressed", "file": "tiny-opencl.so", "device": "opencl",
                          "key": "compressed"},
                         {"variant": "ref:ort", "file": "tiny.onnx", "runtime": "ort", "key": "compressed",
                          "timing_only": True}]}
    out = bench(job, tmp_path)
    assert "no opencl device" in out["artifacts"]["opencl:compressed"]["skipped"]
    assert "opencl" not in out["device"]["tvm_devices"] and "cpu" in out["device"]["tvm_devices"]
    assert out["artifacts"]["ref:ort"]["max_abs_diff"] <= 1e-4 and out["timing"]["ref:ort"]["runs"] >= 2
    assert list(out["timing"]) == ["ref:ort"]


# a build and a timed deploy through the tracker
@pytest.mark.slow
def test_deploy_through_the_tracker(compressed, tracked, tracker, tmp_path):
    res = deploy(["--model", str(compressed), "--tracker", tracker, "--key", "tinybox", "--runtime", "ort",
                  "--precision", "fp32"], tmp_path)
    assert res.exit_code == 0, res.output
    (r,) = reports_in(tmp_path)
    check_report(r, "ort")
    assert "tracker" in r["transport"]


# ORT and TVM builds, timed, profiled and aggregated
@pytest.mark.slow
def test_local_deploy_profile_and_report(compressed, tmp_path):
    res = deploy(["--model", str(compressed), "--local", "--runtime", "ort,tvm", "--precision", "fp32"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "efficiency" in res.output
    prof = CliRunner().invoke(main, ["profile", str(compressed / "build" / "host" / "ort"), "--reports", str(tmp_path),
                                     *FAST])
    assert prof.exit_code == 0, prof.output
    assert len(reports_in(tmp_path)) == 3
    agg = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert agg.exit_code == 0, agg.output
    assert "| host | resnet20 | spatial | ort |" in agg.output and "| host | resnet20 | spatial | tvm |" in agg.output
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "summary.png").stat().st_size > 0


@pytest.mark.slow
def test_emulated_deploy_is_labelled(compressed, tmp_path):
    res = CliRunner().invoke(main, ["deploy", "--target", "rpi4", "--emulate", "--model", str(compressed), "--runtime",
                                    "ort", "--precision", "fp32,int8", "--reports", str(tmp_path), *FAST])
    assert res.exit_code == 0, res.output
    reports = {r["precision"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "rpi4").glob("*.json"))}
    assert sorted(reports) == ["fp32", "int8"]
    for r in reports.values():
        assert r["emulated"] and "EMULATED" in r["note"]
        assert "EMULATED" in (tmp_path / "rpi4" / r["files"]["markdown"]).read_text()
    # fp32 under qemu matches the host's torch output; INT8 is compared with the fp32 model, so only loosely
    assert reports["fp32"]["compressed"]["max_abs_diff"] <= 1e-4
    assert 0 < reports["int8"]["compressed"]["max_abs_diff"] <= int8_bound(reports["int8"], "compressed")
    assert "[EMULATED" in res.output


@pytest.mark.slow
def test_tvm_tuned_over_rpc_on_an_emulated_board(compressed, tmp_path):
    """MetaSchedule cross-compiles here and times each candidate on an aarch64 `trp-edge serve` under qemu."""
    db = tmp_path / "db"
    res = CliRunner().invoke(main, ["deploy", "--target", "rpi4", "--emulate", "--model", str(compressed), "--runtime",
                                    "tvm", "--tune-trials", "2", "--tuning-db", str(db), "--precision", "fp32",
                                    "--reports", str(tmp_path / "r"), *FAST])
    assert res.exit_code == 0, res.output
    m = json.loads((compressed / "build" / "rpi4" / "tvm" / "manifest.json").read_text())
    t = m["tuning"]
    assert t["runner"].startswith("emulated rpc (qemu-user aarch64, 127.0.0.1:") and t["emulated"]
    assert t["device"] and t["threads"] == 1 and t["database"].startswith(str(db))
    for name in ("dense", "compressed"):
        assert t["per_model"][name]["trials"] + t["per_model"][name]["reused_from_database"] >= 1
    assert t["per_model"]["dense"]["trials"] >= 1
    assert any(f.stat().st_size > 0 for f in Path(t["database"]).glob("database_tuning_record.json"))
    for a in m["artifacts"]:
        if a["device"] == "cpu":
            assert a["tuned"] and a["validation"]["status"] == "passed", a
            assert a["validation"]["where"].startswith("emulated (aarch64") and a["validation"]["max_abs_diff"] <= 1e-4
    (r,) = [json.loads(p.read_text()) for p in (tmp_path / "r" / "rpi4").glob("*.json")]
    assert r["emulated"] and "EMULATED" in r["note"] and r["compressed"]["max_abs_diff"] <= 1e-4
    assert "[EMULATED" in res.output


def test_unreachable_device(compressed, tmp_path):
    res = deploy(["--model", str(compressed), "--host", "127.0.0.1", "--port", str(free_port()), "--runtime", "ort"],
                 tmp_path)
    assert res.exit_code == 1 and "cannot open a session" in res.output and "trp-edge serve" in res.output
    assert not (tmp_path / "host").exists()


def test_refused_session(compressed, server, tmp_path):
    res = deploy(["--model", str(compressed), "--host", "127.0.0.1", "--port", str(server), "--key", "other",
                  "--runtime", "ort"], tmp_path)
    assert res.exit_code == 1 and "cannot open a session" in res.output


def test_runtime_missing_on_the_device(compressed, tmp_path):
    port = free_port()
    p = start([EXE, "serve", "--port", str(port), "--runtimes", "tvm"], "listening on", tmp_path / "log")
    try:
        res = deploy(["--model", str(compressed), "--host", "127.0.0.1", "--port", str(port), "--runtime", "ort"],
                     tmp_path)
    finally:
        stop(p)
    assert res.exit_code == 1 and "runtime ort is not offered by this server" in res.output


def test_timeout(compressed, server, tmp_path):
    res = CliRunner().invoke(main, ["deploy", "--target", "host", "--model", str(compressed), "--host", "127.0.0.1",
                                    "--port", str(server), "--runtime", "ort", "--timeout", "2",
                                    "--min-seconds", "30",
                                    "--reports", str(tmp_path)])
    assert res.exit_code == 1 and "longer than --timeout 2 s" in res.output


def test_unreachable_tracker_for_serve(tmp_path):
    res = subprocess.run([EXE, "serve", "--port", str(free_port()), "--tracker", f"127.0.0.1:{free_port()}", "--key",
                          "k"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cannot reach the tracker" in res.stderr


def test_no_connection_says_how(compressed, tmp_path, monkeypatch):
    monkeypatch.delenv("TRP_EDGE_TRACKER", raising=False)
    monkeypatch.delenv("TRP_EDGE_RPC", raising=False)
    res = CliRunner().invoke(main, ["deploy", "--target", "rpi4", "--model", str(compressed)])
    assert res.exit_code == 1 and "no device connection for rpi4" in res.output and "trp-edge serve" in res.output


@pytest.fixture(scope="module")
def untrained_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two compress outputs of the same (untrained, seeded) ResNet-20: the same dense model, two decompositions."""
    root = tmp_path_factory.mktemp("pair")
    outs = []
    for name, scheme, speedup in (("spatial2", "spatial", "2"), ("channel15", "channel", "1.5")):
        out = root / name
        res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16", "--steps", "0",
                                        "--scheme", scheme, "--target-speedup", speedup, "--out", str(out), "-q",
                                        "--no-latency", "--no-calibrate"])
        assert res.exit_code == 0, res.output
        outs.append(out)
    return outs[0], outs[1]


# two models built and timed over RPC
@pytest.mark.slow
def test_compare_times_models_side_by_side_in_one_run(untrained_pair, server, tmp_path):
    a, b = untrained_pair
    res = deploy(["--model", str(a), "--compare", str(b), "--host", "127.0.0.1", "--port", str(server),
                  "--runtime", "ort", "--precision", "fp32"], tmp_path)
    assert res.exit_code == 0, res.output
    reps = {r["name"]: r for r in reports_in(tmp_path)}
    assert set(reps) == {"spatial2", "channel15"}
    for r in reps.values():
        check_report(r, "ort")
        assert [row["name"] for row in r["comparison"]] == ["spatial2", "channel15"]
    # both start from the same dense model: its artifact is timed once and serves both reports
    assert reps["spatial2"]["dense"] == reps["channel15"]["dense"]
    # ... while each compressed model is its own file, timed on its own
    comp = [reps[n]["artifacts"]["compressed"]["sha256"] for n in ("spatial2", "channel15")]
    assert comp[0] != comp[1]
    assert reps["spatial2"]["mac_speedup"] > reps["channel15"]["mac_speedup"]
    row = reps["channel15"]["comparison"][1]
    assert row["efficiency"] == pytest.approx(reps["channel15"]["efficiency"])
    assert "side by side" in res.output and "| spatial2 | spatial |" in res.output


def test_compare_with_a_bad_folder(compressed, tmp_path):  # the session's model: no pair compressed for a refusal
    res = deploy(["--model", str(compressed), "--compare", str(tmp_path / "nope"), "--local",
                  "--runtime", "ort"], tmp_path)
    assert res.exit_code == 1 and "nope: not a trp-edge compress output" in res.output
    assert not (tmp_path / "host").exists()


def test_the_prediction_is_judged_as_made_and_anchored_on_the_dense_net_measured_now():
    from types import SimpleNamespace

    from trp_edge.workflows.deploy_report import _add_prediction

    pr = {"target": "host", "runtime": "ort", "precision": "fp32", "threads": 1, "dense_ms": 10.0,
          "compressed_ms": 4.0, "latency_speedup": 2.5, "deployment": "host/ort fp32, 1 thread(s)"}
    src = SimpleNamespace(latency_table="t.csv", layers=[], predictions=[pr])
    rep = {"target": "host", "runtime": "ort", "precision": "fp32", "threads": 1, "kept_dense_at_precision": []}
    # the machine runs 20 % faster than when the table was made: both nets move, the speedup holds
    _add_prediction(rep, src, {"median_ms": 8.0}, {"median_ms": 3.3})
    got = rep["prediction"]
    assert abs(got["error"] - (3.3 / 4.0 - 1)) < 1e-12 and abs(got["dense_error"] + 0.2) < 1e-12
    assert abs(got["anchored_compressed_ms"] - 3.2) < 1e-12 and abs(got["anchored_error"] - (3.3 / 3.2 - 1)) < 1e-12


def test_a_tvm_deploy_without_onnxruntime_warns_instead_of_failing(compressed, tmp_path, monkeypatch, caplog):
    """The ORT reference line of a TVM deploy: ONNX Runtime missing here raises MissingTool (the backend's
    check), which deploy must turn into a warning, as it meant to (it caught ConfigError and InputError only)."""
    import shutil

    from trp_edge.backends import ort
    from trp_edge.config import DeployConfig
    from trp_edge.contracts import Manifest
    from trp_edge.errors import MissingTool
    from trp_edge.targets import load_target
    from trp_edge.workflows.deploy import references

    def missing(*args, **kwargs):
        raise MissingTool("onnxruntime is not installed: pip install 'trp-edge[onnx]'")

    monkeypatch.setattr(ort, "check_available", missing)
    model = tmp_path / "resnet20"
    shutil.copytree(compressed, model, ignore=shutil.ignore_patterns("build"))  # no ORT build to reuse
    tvm = tmp_path / "tvm"
    tvm.mkdir()
    Manifest(model="resnet20", source=str(model), target="host", target_spec={}, runtime="tvm", created="",
             config={}, input={}, reference={}, macs={}, mac_speedup=None, source_sha256={},
             artifacts=[]).write(tvm / "manifest.json")
    refs = references(model, "tvm", load_target("host"), tvm, DeployConfig(target="host", local=True), 1)
    assert "ort" not in refs
    assert "no ort reference" in caplog.text and "onnxruntime is not installed" in caplog.text


def test_deploy_times_by_default_the_precisions_compress_planned(compressed, tmp_path, caplog):
    """Stages agree by default: a model compressed for fp32 (compress's default) is deployed at fp32 only, and
    deploy says why INT8 was not timed; --precision still asks for INT8."""
    import logging

    assert json.loads((compressed / "report.json").read_text())["config"]["precision"] == ["fp32"]
    with caplog.at_level(logging.INFO, logger="trp_edge"):
        res = deploy(["--model", str(compressed), "--local", "--runtime", "ort"], tmp_path)
    assert res.exit_code == 0, res.output
    assert [(r["runtime"], r["precision"]) for r in reports_in(tmp_path)] == [("ort", "fp32")]
    assert "compressed for fp32" in caplog.text and "--precision" in caplog.text


def test_an_efficiency_above_1_1_is_flagged_as_a_weak_dense_baseline_with_the_layers_behind_it():
    from trp_edge.workflows.deploy_report import WEAK_BASELINE, weak_baseline

    layers = [{"name": "a", "mac_speedup": 2.0, "dense_ms": 3.0, "compressed_ms": 0.5},   # 2 ms beyond its MACs
              {"name": "b", "mac_speedup": 2.0, "dense_ms": 1.0, "compressed_ms": 0.5},   # as its MACs say
              {"name": "c", "mac_speedup": 2.0, "dense_ms": 1.5, "compressed_ms": 0.5},   # 0.5 ms beyond
              {"name": "d", "mac_speedup": 1.0, "dense_ms": None, "compressed_ms": 0.1}]
    w = weak_baseline({"efficiency": 3.04, "layers": layers, "layers_other_ms": {"dense": 4.0, "compressed": 0.3}})
    assert w["threshold"] == WEAK_BASELINE == 1.1 and w["efficiency"] == 3.04
    assert [la["name"] for la in w["layers"]] == ["a", "c"] and w["layers"][0]["excess_ms"] == pytest.approx(2.0)
    assert "a, c" in w["explained_by"] and w["other_ms"]["dense"] == 4.0
    assert "no per-layer rows" in weak_baseline({"efficiency": 1.5, "layers": []})["explained_by"]
