"""Targets are data: the bundled files load, a new board is a new file, a bad file names file and key."""

import os

import pytest
from click.testing import CliRunner

from trp_edge.cli import main
from trp_edge.config import CompressConfig, DeployConfig
from trp_edge.errors import ConfigError
from trp_edge.targets import all_targets, host_triple, load_target

REQUIRED = {"host", "rpi4", "rpi5", "rk3588-mali", "android-adreno", "jetson-orin", "cuda"}


def test_bundled_targets_load():
    found = {t.name: t for t in all_targets()}
    assert REQUIRED <= set(found)
    rpi4 = found["rpi4"]
    assert rpi4.cpu.tvm_target() == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                                     "num-cores": 4, "mattr": ["+neon"]}
    assert not rpi4.native and rpi4.cpu.cross_compiler == "aarch64-linux-gnu-gcc"
    assert found["host"].native and found["host"].cpu.triple == host_triple() and found["host"].cpu.cores >= 1
    mali = found["rk3588-mali"].gpu
    assert mali.api == "opencl" and mali.tvm_target(found["rk3588-mali"].cpu)["device"] == "mali"
    assert found["jetson-orin"].gpu.tvm_target(found["jetson-orin"].cpu)["arch"] == "sm_87"


def test_user_adds_a_board_by_adding_a_file(tmp_path, monkeypatch):
    (tmp_path / "myboard.toml").write_text(
        'description = "my board"\nthreads = 2\n[cpu]\ntriple = "aarch64-linux-gnu"\nmcpu = "cortex-a53"\n'
        'cores = 4\ncross_compiler = "aarch64-linux-gnu-gcc"\n[rpc]\ntracker = "10.0.0.2:9190"\nkey = "pi3"\n')
    monkeypatch.setenv("TRP_EDGE_TARGETS", str(tmp_path))
    t = load_target("myboard")
    assert (t.name, t.cpu.mcpu, t.threads, t.rpc.tracker, t.rpc.key) == ("myboard", "cortex-a53", 2, "10.0.0.2:9190",
                                                                          "pi3")
    assert load_target(tmp_path / "myboard.toml") == t
    out = CliRunner().invoke(main, ["targets"])
    assert out.exit_code == 0 and "myboard" in out.output and "rpi4" in out.output


@pytest.mark.parametrize("body, key", [
    ('[cpu]\ntriple = "aarch64-linux-gnu"\nmcpu = "cortex-a72"\ncores = "four"\n', "cpu.cores"),
    ('[cpu]\ntriple = "aarch64-linux-gnu"\n', "cpu.mcpu"),
    ('runtimes = ["tvm", "coreml"]\n[cpu]\ntriple = "x86_64-linux-gnu"\nmcpu = "generic"\n', "runtimes"),
    ('[cpu]\ntriple = "x86_64-linux-gnu"\nmcpu = "generic"\n[gpu]\napi = "metal"\n', "gpu.api"),
    ('[cpu]\ntriple = "x86_64-linux-gnu"\nmcpu = "generic"\nthreds = 4\n', "cpu.threds"),
    ('threads = 4\n', "cpu"),
    ('[cpu\ntriple = 1\n', "not valid TOML"),
])
def test_bad_file_names_file_and_key(tmp_path, monkeypatch, body, key):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_target(f)
    assert str(f) in str(e.value) and key in str(e.value)
    monkeypatch.setenv("TRP_EDGE_TARGETS", str(tmp_path))
    out = CliRunner().invoke(main, ["targets"])
    assert out.exit_code == 1 and "bad.toml" in out.output and key in out.output


def test_unknown_target_lists_known():
    with pytest.raises(ConfigError, match="unknown target 'rpi9'.*rpi4"):
        load_target("rpi9")


@pytest.mark.parametrize("cpu, expected", [
    ('triple = "aarch64-linux-gnu"\nmcpu = "cortex-a76"\ncores = 6\n', 6),  # a board: its cores from the file
    ('triple = "native"\nmcpu = "native"\ncores = 0\n', os.cpu_count() or 1),  # this machine: detected
])
def test_threads_zero_in_a_target_file_means_all_its_cores(tmp_path, cpu, expected):
    f = tmp_path / "allcores.toml"
    f.write_text(f"threads = 0\n[cpu]\n{cpu}")
    t = load_target(f)
    assert t.threads == 0 and t.cpu.cores == expected and t.run_threads == expected
    f.write_text(f"[cpu]\n{cpu}")  # without threads: one
    assert load_target(f).run_threads == 1


def test_threads_zero_is_refused_in_a_config():
    """0 = all cores is a target file's spelling only; an option of a run is a count."""
    with pytest.raises(ConfigError, match="--threads must be >= 1, got 0"):
        DeployConfig(target="host", threads=0)
    with pytest.raises(ConfigError, match="--threads must be >= 1, got 0"):
        CompressConfig(model="resnet20", threads=0)
