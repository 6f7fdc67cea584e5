"""TVM tuning measures at the threads the model will run at: the build's --threads (deploy passes its own),
resolved once with the target's semantics (0 in a target file: every core), not the target file's raw value."""

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from trp_edge.config import BuildConfig, DeployConfig
from trp_edge.errors import ConfigError
from trp_edge.targets import load_target, resolve_threads
from trp_edge.workflows.deploy import reusable

HOST_TOML = Path(__file__).resolve().parent.parent / "targets" / "host.toml"


def all_cores_target(tmp_path: Path) -> Path:
    """The host target with `threads = 0` (all cores) in its file."""
    text = HOST_TOML.read_text().replace('name = "host"', 'name = "host-all-cores"')
    text = text.replace("threads = 1 ", "threads = 0 ")
    path = tmp_path / "host-all-cores.toml"
    path.write_text(text)
    assert load_target(str(path)).threads == 0
    return path


def test_resolve_threads_zero_in_the_target_file_means_every_core(tmp_path):
    target = load_target(str(all_cores_target(tmp_path)))
    assert resolve_threads(None, target) == os.cpu_count() == target.cpu.cores
    assert resolve_threads(3, target) == 3
    assert resolve_threads(None, load_target("host")) == 1
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        BuildConfig(model="m.onnx", threads=0)


def test_tuning_measures_at_the_builds_threads(tmp_path, tiny, monkeypatch):
    """A tuned build at --threads 1 on a target whose file says 0: the measurer (and MetaSchedule's local runner
    it makes) run at 1 thread, where the target's raw value (0) was used before. No real tuning runs."""
    pytest.importorskip("tvm")
    from trp_edge.backends.tvm import tuning
    from trp_edge.workflows.build import build

    torch.onnx.export(tiny.eval(), (torch.randn(1, 3, 16, 16),), str(tmp_path / "tiny.onnx"), input_names=["input"],
                      dynamo=False)
    toml = all_cores_target(tmp_path)
    seen = []

    def fake_tune(mod, target, work_dir, trials, m, compiler=None, seconds=None, scheduler="round-robin"):
        seen.append({"threads": m.threads, "runner": m.runner, "trials": trials, "work_dir": work_dir,
                     "evaluator": tuning._runner(m).f_run_evaluator})
        return {"tasks": 0, "reused_from_database": 0, "tuned": 0, "trials": 0, "seconds": 0.0, "runner": m.runner}

    monkeypatch.setattr(importlib.import_module("trp_edge.backends.tvm.build"), "tune", fake_tune)
    res = build(BuildConfig(model=str(tmp_path / "tiny.onnx"), target=str(toml), runtimes="tvm", tune_trials=4,
                            threads=1, out=str(tmp_path / "b")))
    assert len(seen) == 1 and seen[0]["threads"] == 1 and seen[0]["runner"] == "local" and seen[0]["trials"] == 4
    assert seen[0]["evaluator"].func is tuning.local_evaluate and seen[0]["evaluator"].args == (1,)
    m = res.manifests["tvm"]
    assert m["config"]["threads"] == 1 and m["tuning"]["threads"] == 1
    assert json.loads((seen[0]["work_dir"] / "target.json").read_text())["threads"] == 1  # a database per count
    assert m["artifacts"][0]["validation"]["status"] == "passed"
    # without --threads the build resolves the target's 0 to every core, never to 0
    seen.clear()
    res = build(BuildConfig(model=str(tmp_path / "tiny.onnx"), target=str(toml), runtimes="tvm", tune_trials=4,
                            out=str(tmp_path / "c"), int8=False))
    assert seen[0]["threads"] == os.cpu_count() and res.manifests["tvm"]["config"]["threads"] == os.cpu_count()


def test_deploy_reuses_a_tuned_build_only_at_its_threads():
    tuned = DeployConfig(target="host", tune_trials=8)
    assert reusable({"tune_trials": 8, "tune_minutes": 0.0, "threads": 2}, tuned, 2)
    assert not reusable({"tune_trials": 8, "tune_minutes": 0.0, "threads": 4}, tuned, 2)
    assert not reusable({"tune_trials": 8}, tuned, 2)  # built before threads were recorded: tuned at the target's
    assert not reusable({"tune_trials": 0, "threads": 2}, tuned, 2)  # another budget
    untuned = DeployConfig(target="host")
    assert reusable({"tune_trials": 0, "tune_minutes": 0.0, "threads": 4}, untuned, 1)
    assert reusable({"tune_trials": 0}, untuned, 3)
