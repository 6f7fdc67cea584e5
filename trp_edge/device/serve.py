"""`trp-edge serve`: a TVM RPC server that also benchmarks ONNX Runtime, TFLite and ExecuTorch models uploaded to it,
so one transport, one tracker and one upload path serve every runtime.

It registers three functions in the server: `trp_edge.info()` (device identity and the runtimes present),
`trp_edge.bench(job_json)` (trp_edge.device.bench on the uploaded files) and `trp_edge.calibrate(job_json)`
(one layer of `trp-edge calibrate`). It needs numpy, the TVM
runtime and whichever of onnxruntime / ai-edge-litert / tflite-runtime / executorch the device has; torch only
for executorch, whose runtime links it. A
runtime that is missing is reported to the client, not crashed on. Bound beyond loopback it requires a token
(trp_edge.device.auth); every job is checked and bounded (trp_edge.device.jobs).

    python -m trp_edge.device.serve --host 127.0.0.1 --port 9090   # without click (the emulated userland)
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..contracts import DEVICE_RESULT
from . import auth
from .jobs import JOB_SECONDS, MAX_UPLOAD_MB, JobTimeout, plain_name, problem, time_limit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What the server accepts: the token a session must present (None: any session, loopback only), the largest
    upload and the longest job."""

    token: str | None = None
    max_upload_mb: float = MAX_UPLOAD_MB
    job_seconds: float = JOB_SECONDS


def register(runtimes: tuple[str, ...] | None = None, limits: Limits | None = None) -> None:
    """Runs in the server process before it forks a worker per session."""
    import tvm
    import tvm_ffi

    from .bench import JOBS, device_identity

    limits = limits or Limits()
    if limits.token:
        auth.install(limits.token)
    _bounded_upload(limits.max_upload_mb)

    @tvm_ffi.register_global_func("trp_edge.info", override=True)
    def info() -> str:
        ident = device_identity()
        if runtimes is not None:
            ident["offered"] = list(runtimes)
        return json.dumps(ident)

    def remote(kind: str, run, job_json: str) -> str:
        try:
            job = json.loads(job_json)
        except ValueError:
            job = None
        why = problem(kind, job)
        if why is None and runtimes is not None and job["runtime"] not in runtimes:
            why = f"runtime {job['runtime']} is not offered by this server (it offers {', '.join(runtimes)})"
        if why is None:
            base = Path(tvm.get_global_func("tvm.rpc.server.workpath")("job")).parent  # the session's uploads
            try:
                with time_limit(limits.job_seconds):
                    return json.dumps(run(job, base))
            except JobTimeout as e:
                why = str(e)
        log.warning("refused a %s job: %s", kind, why)
        return json.dumps(DEVICE_RESULT.stamp({"runtime": job.get("runtime") if isinstance(job, dict) else None,
                                               "error": f"trp-edge serve: {why}", "artifacts": {}}))

    for name, run in JOBS.items():
        tvm_ffi.register_global_func(f"trp_edge.{name}", functools.partial(remote, name, run), override=True)


def _bounded_upload(max_mb: float) -> None:
    """TVM's upload (tvm.rpc.server.upload), with a plain name inside the session folder and at most `max_mb`:
    one over is refused with one line and the session goes on."""
    import tvm
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm.rpc.server.upload", override=True)
    def upload(name: str, blob) -> None:
        if (why := plain_name(name)) is not None:
            raise ValueError(f"trp-edge serve refused the upload: {why}")
        if len(blob) > max_mb * 2**20:
            log.warning("refused an upload of %.2f MB (over %g MB)", len(blob) / 2**20, max_mb)
            raise ValueError(f"trp-edge serve refused the upload {name}: {len(blob) / 2**20:.2f} MB, over this "
                             f"server's --max-upload-mb {max_mb:g}")
        Path(tvm.get_global_func("tvm.rpc.server.workpath")(name)).write_bytes(bytes(blob))


def serve(host: str = "127.0.0.1", port: int = 9090, tracker: str | None = None, key: str = "",
          runtimes: tuple[str, ...] | None = None, port_end: int | None = None, limits: Limits | None = None):
    """Start the server (in a child process, as TVM does) and return it; `.proc.join()` waits. Bound beyond
    loopback, it requires a token: `limits.token`, else $TRP_EDGE_TOKEN, else one made here (`server.token`,
    `server.token_generated`: the caller prints it, once)."""
    import dataclasses
    import socket

    from tvm import rpc

    from ..errors import DeviceError

    tracker_addr = None
    if tracker:
        h, _, p = tracker.rpartition(":")
        tracker_addr = (h, int(p))
        try:  # TVM's listener thread dies on an unreachable tracker and leaves the port open and mute
            socket.create_connection(tracker_addr, timeout=5).close()
        except OSError as e:
            raise DeviceError(f"cannot reach the tracker at {tracker} ({e.strerror or e}); start it with "
                               f"`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {p}`") from e
    limits = limits or Limits()
    token, generated = auth.server_token(host, limits.token)
    limits = dataclasses.replace(limits, token=token)
    server = rpc.Server(host, port, port_end or port + 10, key=key, tracker_addr=tracker_addr, silent=True,
                        server_init_callback=functools.partial(register, runtimes, limits))
    server.token, server.token_generated = token, generated
    log.info("serving on %s:%d%s", host, server.port, f", registered with tracker {tracker} as {key!r}" if tracker
             else "")
    return server


def wait(server) -> None:
    """Block until the server ends; SIGTERM and Ctrl-C take its worker process down with it."""
    import signal

    def stop(*_):  # TVM runs the server in a worker process
        server.terminate()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.proc.join()
    except KeyboardInterrupt:
        server.terminate()


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m trp_edge.device.serve", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--key", default="")
    a = p.parse_args(argv)
    import os
    import sys

    # TVM starts the server in `sys.executable -m tvm.exec.popen_worker`: under qemu-user that must be the
    # wrapper that runs the guest python, not the guest binary itself
    sys.executable = os.environ.get("TRP_EDGE_PYTHON", sys.executable)
    server = serve(a.host, a.port, key=a.key)  # the token, if any, from $TRP_EDGE_TOKEN
    print(json.dumps({"serving": server.port, **({"token": server.token} if server.token_generated else {})}),
          flush=True)
    wait(server)


if __name__ == "__main__":
    main()
