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


@pytest.mark.slow
def test_the_wheel_ships_every_target_and_an_install_outside_the_checkout_lists_them(tmp_path):
    """`pip install .` outside the checkout: the wheel carries targets/ as trp_edge/_targets, and the installed
    package, run from another folder, lists every target of the checkout."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (repo / f).is_file() and not f.startswith((".venv", "tests/", "tools/", "calibration/", "docs/")):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((repo / f).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = {Path(n).stem for n in zipfile.ZipFile(wheel).namelist() if n.startswith("trp_edge/_targets/")}
    assert shipped == {p.stem for p in (repo / "targets").glob("*.toml")} and REQUIRED <= shipped
    site = tmp_path / "site"  # the wheel unpacked as pip installs it; its dependencies come from this environment
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run([sys.executable, "-c", "from trp_edge.cli import main; main()", "targets", "--json"],
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True).stdout
    import json

    listed = {t["name"] for t in json.loads(out)}
    assert listed == shipped


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
