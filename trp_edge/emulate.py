"""Foreign-CPU artifacts checked on this machine: an arm64 Debian userland with aarch64 numpy,
onnxruntime, ai-edge-litert and TVM, run under qemu-user (no chroot, no binfmt_misc).

tools/arm64_userland.sh builds it once (about 30 s: 42 arm64 .debs unpacked without maintainer scripts,
aarch64 wheels installed from the host) and caches it in $TRP_EDGE_ARM64 (default
~/.cache/trp-edge/arm64). Emulation checks correctness only: its timings are never device latency."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, DeviceError, DeviceTimeout, MissingTool
from .targets import EMULATORS, Connection, Target

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent
SCRIPT = _REPO / "tools" / "arm64_userland.sh"


def userland_dir() -> Path:
    return Path(os.environ.get("TRP_EDGE_ARM64", Path.home() / ".cache" / "trp-edge" / "arm64"))


def can_emulate(target: Target) -> str | None:
    """None when this machine can run the target's CPU artifacts under emulation, else why not.
    A missing emulator is an error naming the package (emulation was asked for)."""
    arch = target.cpu.arch
    if arch not in EMULATORS:
        return f"no emulator for {arch} (emulated: {', '.join(EMULATORS)})"
    if "android" in target.cpu.triple:
        return "Android (bionic) libraries do not run in the glibc userland; check them on the phone"
    exe, pkg = EMULATORS[arch]
    if not shutil.which(exe):
        raise ConfigError(f"{exe} not found (it runs {target.name}'s {arch} artifacts here to check them): "
                          f"apt-get install {pkg}, or pass --no-emulate")
    return None


def _wheels() -> str:
    """The wheel list the userland script pins (its SITE/.done holds the list it installed)."""
    import re

    m = re.search(r'^WHEELS="([^"]*)"', SCRIPT.read_text(), re.M) if SCRIPT.is_file() else None
    return m.group(1).strip() if m else ""


def ensure_userland() -> Path:
    """The wrapper that runs aarch64 python3 under qemu; builds the userland the first time."""
    d = userland_dir()
    py = d / "py"
    stamp = d / "site" / ".done"
    if py.is_file() and stamp.is_file() and stamp.read_text().strip() == _wheels():
        return py
    if not SCRIPT.is_file():
        raise MissingTool(f"the arm64 userland is missing in {d} and {SCRIPT} is not here to build it")
    log.info("building the arm64 userland in %s (once, about 30 s; needs the Debian mirror and PyPI)", d)
    env = {**os.environ, "HOST_PY": sys.executable, "SKIP_CHECK": "1"}
    r = subprocess.run(["bash", str(SCRIPT), str(d)], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not py.is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MissingTool(f"could not build the arm64 userland ({SCRIPT.name}): {tail[0]}")
    return py


def run_module(module: str, job: dict, folder: Path, target: Target, timeout: float = 900,
               args: tuple[str, ...] = ()) -> dict:
    """`python -m MODULE [ARGS] JOB.json` in the emulated aarch64 python, on the folder's files; the last
    JSON line it prints."""
    py = ensure_userland()
    job_file = folder / f".{module.rsplit('.', 1)[-1]}-job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run([str(py), "-m", module, *args, str(job_file.resolve())], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceTimeout(f"the emulated run in {folder} took over {timeout:.0f} s") from None
    finally:
        job_file.unlink(missing_ok=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"the emulated {target.cpu.arch} python failed (exit {r.returncode}): {err}")
    return json.loads(lines[-1])


def run_check(job: dict, folder: Path, target: Target, timeout: float = 900) -> list[dict]:
    """trp_edge.device.runner's check, run by the emulated aarch64 python on the folder's artifacts."""
    out = run_module("trp_edge.device.runner", job, folder, target, timeout, args=("check",))
    log.debug("emulated runtimes: %s", out.get("runtimes"))
    return out["results"]


@contextmanager
def emulated_server(target: Target, startup: float = 300.0) -> Iterator[Connection]:
    """An aarch64 `trp-edge serve` (python -m trp_edge.device.serve) under qemu on a free loopback port, for
    the jobs that need a live RPC server of the target's architecture (MetaSchedule's runner); stopped on
    leaving. Its timings are qemu's."""
    import socket
    import time

    why = can_emulate(target)
    if why:
        raise ConfigError(f"--emulate: cannot run {target.name} artifacts here ({why})")
    py = ensure_userland()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(_REPO), "TRP_EDGE_PYTHON": str(py)}
    proc = subprocess.Popen([str(py), "-m", "trp_edge.device.serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        line = ""
        while not line.startswith("{"):  # the server prints {"serving": PORT} once it listens
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                err = (proc.stderr.read().strip().splitlines() or ["no output"])[-1]
                raise DeviceError(f"the emulated {target.cpu.arch} trp-edge serve failed to start: {err}")
            if time.monotonic() - t0 > startup:
                raise DeviceTimeout(f"the emulated {target.cpu.arch} trp-edge serve did not start in {startup:.0f} s")
        port = json.loads(line)["serving"]
        log.info("emulated %s trp-edge serve on 127.0.0.1:%d (qemu: timings are not the device's)",
                 target.cpu.arch, port)
        yield Connection(host="127.0.0.1", port=port)
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
