"""Every file and message one stage hands the next has a format and a version; a newer version than this
trp-edge reads is refused in one line naming the file (trp_edge.contracts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trp_edge.cli import main
from trp_edge.contracts import (
    BUILD_MANIFEST,
    CALIBRATION,
    COMPRESS_REPORT,
    COMPRESSED_MODEL,
    CONTRACTS,
    DEPLOY_REPORT,
    DEVICE_JOB,
    DEVICE_RESULT,
    CompressReport,
    Manifest,
)
from trp_edge.errors import ContractError

NEWER = 99


def _one_line_newer(e: pytest.ExceptionInfo, where: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and where in msg and f"version {NEWER} is newer" in msg and "upgrade trp-edge" in msg


def _report(**over) -> dict:
    r = {"model": "m", "arch": {}, "scheme": "spatial", "energy": 0.02, "input_shape": [1, 3, 16, 16],
         "dense": {"macs": 10}, "compressed": {"macs": 5}, "mac_speedup": 2.0, "layers": []}
    return {**r, **over}


def _manifest() -> Manifest:
    return Manifest(model="m", source="s", target="host", target_spec={}, runtime="ort", created="now", config={},
                    input={"shape": [1, 3, 16, 16]}, reference={"file": "../reference.npz"}, macs={}, mac_speedup=None,
                    source_sha256={}, artifacts=[], extra={"runtime_version": {"onnxruntime": "x"}})


def test_every_contract_has_its_own_format_and_a_version():
    assert len({c.format for c in CONTRACTS}) == len(CONTRACTS)
    assert all(c.version >= 1 for c in CONTRACTS)
    stamped = DEVICE_JOB.stamp({"format": "old", "version": 0, "runtime": "ort"})
    assert stamped == {"format": DEVICE_JOB.format, "version": DEVICE_JOB.version, "runtime": "ort"}


def test_a_newer_compress_report_is_refused(tmp_path):
    p = tmp_path / "report.json"
    CompressReport(**_report()).write(p)
    assert CompressReport.read(p).model == "m" and json.loads(p.read_text())["version"] == COMPRESS_REPORT.version
    p.write_text(json.dumps({**json.loads(p.read_text()), "version": NEWER}))
    with pytest.raises(ContractError) as e:
        CompressReport.read(p)
    _one_line_newer(e, str(p))
    legacy = tmp_path / "old.json"  # a report from before the contract had a version reads as version 0
    legacy.write_text(json.dumps(_report()))
    assert CompressReport.read(legacy).mac_speedup == 2.0


def test_a_newer_build_manifest_is_refused_and_extra_keys_round_trip(tmp_path):
    from trp_edge.workflows.build import load_manifest

    _manifest().write(tmp_path / "manifest.json")
    m = load_manifest(tmp_path)
    assert m.runtime == "ort" and m["runtime_version"] == {"onnxruntime": "x"} and m.get("tuning") is None
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert (d["format"], d["version"]) == (BUILD_MANIFEST.format, BUILD_MANIFEST.version)
    (tmp_path / "manifest.json").write_text(json.dumps({**d, "version": NEWER}))
    with pytest.raises(ContractError) as e:
        load_manifest(tmp_path)
    _one_line_newer(e, "manifest.json")


def test_a_newer_calibration_header_is_refused(tmp_path):
    from trp_edge.latency_table import LatencyTable, load_table

    header = {"target": "host", "runtime": "ort", "precision": "fp32", "threads": 1, "layers": {}}
    row = {"layer": "c", "scheme": "dense", "rank": 0, "shape": "s", "median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0,
           "runs": 3}
    csv, header_file = LatencyTable(header, [row]).write(tmp_path / "t")
    assert load_table(csv).dense("c") == 1.0
    assert json.loads(header_file.read_text())["format"] == CALIBRATION.format
    header_file.write_text(json.dumps({**json.loads(header_file.read_text()), "version": NEWER}))
    with pytest.raises(ContractError) as e:
        load_table(csv)
    _one_line_newer(e, "t.json")


def test_a_newer_deploy_report_is_refused_by_report_and_one_line_in_the_cli(tmp_path):
    from trp_edge.report import read_report

    d = tmp_path / "host"
    d.mkdir()
    rep = DEPLOY_REPORT.stamp({"target": "host", "runtime": "ort", "dense": {}, "compressed": {}, "latency_speedup": 1})
    (d / "m-ort.json").write_text(json.dumps({**rep, "version": NEWER}))
    with pytest.raises(ContractError) as e:
        read_report(d / "m-ort.json")
    _one_line_newer(e, "m-ort.json")
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and f"version {NEWER} is newer" in lines[0], res.output


def test_a_newer_device_job_is_answered_with_one_error_line():
    from trp_edge.device.bench import JOBS

    for kind, run in JOBS.items():
        out = run(DEVICE_JOB.stamp({"runtime": "ort", "artifacts": []}) | {"version": NEWER}, Path("."))
        assert out["format"] == DEVICE_RESULT.format and f"version {NEWER} is newer" in out["error"], kind
        assert "\n" not in out["error"]


def test_a_newer_device_result_is_refused_and_every_job_goes_out_versioned():
    from trp_edge.transport import _versioned

    sent = []

    def device(kind, job, files):
        sent.append(job)
        return {"format": DEVICE_RESULT.format, "version": NEWER, "artifacts": {}}

    with pytest.raises(ContractError) as e:
        _versioned("rpc (127.0.0.1:9090)", device)("bench", {"runtime": "ort"}, {})
    _one_line_newer(e, "127.0.0.1:9090")
    assert sent == [{"format": DEVICE_JOB.format, "version": DEVICE_JOB.version, "runtime": "ort"}]
    old = _versioned("x", lambda kind, job, files: {"runtime": "ort", "artifacts": {}})  # a 0.1 device: version 0
    assert old("bench", {}, {})["runtime"] == "ort"


def test_metrics_lines_are_versioned_and_a_newer_one_is_refused(tmp_path):
    from trp_edge.contracts import METRICS
    from trp_edge.trp_metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", fresh=True)
    log.write({"phase": "trp", "epoch": 1, "loss": 0.5})
    (row,) = log.rows()
    assert (row["format"], row["version"], row["loss"]) == (METRICS.format, METRICS.version, 0.5)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**row, "epoch": 2, "version": NEWER}) + "\n")
    with pytest.raises(ContractError) as e:
        log.rows()
    _one_line_newer(e, "metrics.jsonl:2")


def test_a_newer_compressed_model_is_refused(tmp_path):
    from trp_edge.models import load_model

    p = tmp_path / "compressed.pt"
    torch.save({"format": COMPRESSED_MODEL.format, "version": NEWER, "spec": "{}", "state_dict": {}}, p)
    with pytest.raises(ContractError) as e:
        load_model(str(p))
    _one_line_newer(e, "compressed.pt")


def test_a_newer_training_checkpoint_is_refused_and_one_of_0_1_still_resumes(tmp_path, tiny):
    from trp_edge.config import DecomposeConfig, TRPConfig
    from trp_edge.contracts import CHECKPOINT
    from trp_edge.data import load_data
    from trp_edge.trp import TRPTrainer

    data = load_data("synthetic:3x16x16", workers=0)
    ckpt = tmp_path / "checkpoint.pt"
    tr = TRPTrainer(tiny, data, TRPConfig(steps=1, batch=16), DecomposeConfig(scheme="channel"), checkpoint=ckpt,
                    progress=False)
    tr.save_checkpoint(0, 1)
    st = torch.load(ckpt, weights_only=True)
    assert (st["format"], st["version"]) == (CHECKPOINT.format, CHECKPOINT.version)
    assert tr.load_checkpoint() == (0, 1)
    torch.save({k: v for k, v in st.items() if k not in ("format", "version")}, ckpt)  # as 0.1 wrote it
    assert tr.load_checkpoint() == (0, 1)
    torch.save({**st, "version": NEWER}, ckpt)
    with pytest.raises(ContractError) as e:
        tr.load_checkpoint()
    _one_line_newer(e, "checkpoint.pt")


@pytest.mark.parametrize("threads, rest", [(1, 0.0), (2, 10.0)])
def test_compress_times_its_pair_as_a_device_job_and_rests_first_at_several_threads(tmp_path, tiny, threads, rest):
    """compress's latency check is a DEVICE_JOB pair job (deploy --local's runner); at 2+ threads it asks the device
    to rest first, since compress's own work just kept every core busy."""
    from types import SimpleNamespace

    from trp_edge.config import CompressConfig
    from trp_edge.workflows.compress_checks import latency_check

    sent = []

    def run_job(job, files):
        sent.append(job)
        assert {p.name for p in files.values()} == {"dense.onnx", "model.onnx", "latency-reference.npz"}
        t = {"median_ms": 2.0}
        return {"timing": {"dense": t, "compressed": {"median_ms": 1.0}}, "threads": job["threads"], "device": {},
                "protocol": job["protocol"], "artifacts": {"dense": {}, "compressed": {}},
                "rested_s": job["rest_seconds"]}

    run = SimpleNamespace(cfg=CompressConfig(model="m", threads=threads), example=torch.zeros(1, 3, 16, 16),
                          dense_macs=SimpleNamespace(total=200), services=SimpleNamespace(run_job=run_job))
    out = latency_check(run, tmp_path, tiny.eval(), tiny.eval(), 100)
    (job,) = sent
    assert (job["format"], job["rest_seconds"], job["threads"]) == (DEVICE_JOB.format, rest, threads)
    assert out["latency_speedup"] == 2.0 and out["efficiency"] == 1.0 and out["rested_s"] == rest
    assert not (tmp_path / "latency-reference.npz").exists()  # the reference goes once timed


def test_the_device_rests_before_timing_when_the_job_asks(tmp_path, tiny, monkeypatch):
    import numpy as np

    from trp_edge.config import ProfileConfig
    from trp_edge.contracts import pair_job
    from trp_edge.device import bench
    from trp_edge.export import export_onnx

    x = torch.zeros(1, 3, 16, 16)
    export_onnx(tiny.eval(), x, tmp_path / "d.onnx")
    with torch.no_grad():
        np.savez(tmp_path / "ref.npz", input=x.numpy(), dense=tiny(x).numpy(), compressed=tiny(x).numpy())
    slept = []
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    fast = ProfileConfig(warmup=0, block=1, min_runs=1, min_seconds=0)
    out = bench.JOBS["bench"](pair_job("ort", 1, fast, "d.onnx", "d.onnx", "ref.npz", rest_seconds=3.0), tmp_path)
    assert slept == [3.0] and out["rested_s"] == 3.0 and set(out["timing"]) == {"dense", "compressed"}
    out = bench.JOBS["bench"](pair_job("ort", 1, fast, "d.onnx", "d.onnx", "ref.npz"), tmp_path)
    assert slept == [3.0] and "rested_s" not in out
