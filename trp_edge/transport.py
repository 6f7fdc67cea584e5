"""How a job reaches the device and its answer comes back: one job format (trp_edge.device.bench), three
transports.

- local: in this process, on this machine's files;
- emulated: the aarch64 python of the arm64 userland under qemu-user (correctness only: its timings are
  qemu's, never the device's);
- rpc: a `trp-edge serve` reached over TVM RPC, directly (host:port) or through a tracker (key).

The connection comes from the flags, else from the target file's [rpc], else from $TRP_EDGE_TRACKER
(HOST:PORT, with $TRP_EDGE_KEY or the target's key) or $TRP_EDGE_RPC (HOST:PORT). A timeout is a
DeviceTimeout (a TimeoutError), whatever transport raised it."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contracts import DEVICE_JOB, DEVICE_RESULT
from .errors import ConfigError, DeviceError, DeviceTimeout
from .targets import Connection

if TYPE_CHECKING:
    from .targets import Target

SERVE_HINT = ("start it on the device with `trp-edge serve --host 0.0.0.0 --port {port}` (see docs/device-setup.md: "
              "serving from a Raspberry Pi)")

Call = Callable[[str, dict[str, Any], dict[str, Path]], dict[str, Any]]


def resolve(target: Target, *, host: str | None = None, port: int | None = None, tracker: str | None = None,
            key: str | None = None) -> Connection:
    """Flags, else the target file, else $TRP_EDGE_TRACKER / $TRP_EDGE_RPC; the target's token_env goes with it."""
    conn = _resolve(target, host=host, port=port, tracker=tracker, key=key)
    return dataclasses.replace(conn, token_env=target.rpc.token_env) if target.rpc.token_env else conn


def _resolve(target: Target, *, host: str | None, port: int | None, tracker: str | None,
             key: str | None) -> Connection:
    def via_tracker(addr: str, fallback_key: str | None = None) -> Connection:
        return Connection(tracker=addr, key=key or fallback_key or target.rpc.key or target.name)

    if tracker:
        return via_tracker(tracker)
    if host:
        return Connection(host=host, port=port or target.rpc.port, key=key or "")
    if target.rpc.tracker:
        return via_tracker(target.rpc.tracker)
    if target.rpc.host:
        return Connection(host=target.rpc.host, port=port or target.rpc.port, key=key or "")
    if os.environ.get("TRP_EDGE_TRACKER"):
        return via_tracker(os.environ["TRP_EDGE_TRACKER"], os.environ.get("TRP_EDGE_KEY"))
    if os.environ.get("TRP_EDGE_RPC"):
        h, _, p = os.environ["TRP_EDGE_RPC"].rpartition(":")
        if not h or not p.isdigit():
            raise ConfigError(f"$TRP_EDGE_RPC must be HOST:PORT, got {os.environ['TRP_EDGE_RPC']!r}")
        return Connection(host=h, port=int(p), key=key or "")
    raise ConfigError(f"no device connection for {target.name}: pass --host H --port P or --tracker H:P --key K, "
                      f"set [rpc] in {target.path}, or use --local / --emulate; "
                      + SERVE_HINT.format(port=target.rpc.port))


def localized(job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """The job with absolute paths, for a run on this machine's file system (in-process or under qemu)."""
    arts = [{**a, **{k: str(files[a[k]].resolve()) for k in ("file", "reference") if k in a}}
            for a in job["artifacts"]]
    return {**job, "artifacts": arts}


def run_local(job: dict[str, Any], files: dict[str, Path], kind: str = "bench") -> dict[str, Any]:
    """The job run by the device side (trp_edge.device.bench) in this process, as a board runs it in `trp-edge
    serve`."""
    from .device.bench import JOBS

    return JOBS[kind](localized(job, files), Path.cwd())


def run_emulated(job: dict[str, Any], files: dict[str, Path], target: Target, timeout: float,
                 kind: str = "bench") -> dict[str, Any]:
    from .emulate import can_emulate, run_module

    why = can_emulate(target)
    if why:
        raise ConfigError(f"--emulate: cannot run {target.name} artifacts here ({why})")
    folder = files[job["artifacts"][0]["file"]].parent
    return run_module("trp_edge.device.bench", localized(job, files), folder, target, timeout, args=(kind,))


def _last_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]


def _in_thread(fn: Callable[[], Any], seconds: float) -> dict[str, Any]:
    """Run fn in a daemon thread for at most `seconds`: {"value": ...}, {"error": exception} or {} (no answer)."""
    box: dict[str, Any] = {}

    def go():
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the caller, who raises it by type
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    return box


def connect(conn: Connection, timeout: float, handshake: float = 60.0):
    """Open the session in a daemon thread so a server that accepts the socket but never answers (a wedged
    listener, a wrong port) becomes an error after `handshake` seconds instead of a hang. The token (--token,
    $TRP_EDGE_TOKEN or the target's token_env) rides in TVM's handshake: trp_edge.device.auth."""
    from tvm import rpc

    from .device.auth import REFUSED, client_token, handshake_key, redact

    token = client_token(conn.token_env)

    lock, given_up, got = threading.Lock(), [False], {}

    def go():
        sess = (_via_tracker(conn, token, timeout) if conn.tracker else
                rpc.connect(conn.host, conn.port, key=handshake_key(conn.key or "", token), session_timeout=timeout))
        with lock:  # a session that comes after the caller gave up is dropped, so the board is free again
            if not given_up[0]:
                got["sess"] = sess

    box = _in_thread(go, handshake)
    with lock:
        given_up[0] = True
        if "sess" in got:
            return got["sess"]
    why = redact(_last_line(box["error"]), token) if "error" in box else f"no answer within {handshake:.0f} s"
    if "wrong or missing token" in why:
        raise DeviceError(f"{conn.describe()}: {REFUSED}")
    raise DeviceError(f"cannot open a session on {conn.describe()} ({why}); " + SERVE_HINT.format(port=conn.port))


def _via_tracker(conn: Connection, token: str | None, timeout: float, retries: int = 2):
    """TVM's TrackerSession.request, with the token in the handshake to the board (never sent to the tracker)."""
    from tvm import rpc
    from tvm.rpc import base

    from .device.auth import handshake_key

    h, _, p = (conn.tracker or "").rpartition(":")
    tracker = rpc.connect_tracker(h, int(p))
    last: Exception | None = None
    try:
        for _ in range(retries):
            try:
                base.sendjson(tracker._sock, [base.TrackerCode.REQUEST, conn.key, "", 1])  # noqa: SLF001 - TVM 0.27
                value = base.recvjson(tracker._sock)  # noqa: SLF001
                if value[0] != base.TrackerCode.SUCCESS:
                    raise RuntimeError(f"the tracker answered {value!r}")
                url, port, matchkey = value[1]
                sess = rpc.connect(url, port, handshake_key(matchkey, token), session_timeout=timeout)
                sess.trp_edge_board = f"{url}:{port}"  # which board, for a fleet's messages
                return sess
            except (OSError, RuntimeError) as e:
                last = e
                if "wrong or missing token" in str(e):
                    break
        raise RuntimeError(f"cannot request {conn.key!r} from the tracker ({_last_line(last or Exception())})")
    finally:
        tracker.close()


def _remote_call(sess, conn: Connection, kind: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        fn = sess.get_function(f"trp_edge.{kind}")
    except Exception:  # noqa: BLE001 - TVM raises a plain error for a missing global function
        raise DeviceError(f"{conn.describe()} is a TVM RPC server without trp-edge's trp_edge.{kind}; run "
                          "`trp-edge serve` (of this version) there instead of tvm.exec.rpc_server") from None
    # the server ends a session past its timeout (RPCSessionTimeoutError, a TimeoutError); the watchdog covers a
    # server that goes silent instead
    box = _in_thread(lambda: fn(json.dumps(job)), timeout + 30.0)
    if "value" in box:
        return json.loads(box["value"])
    err = box.get("error")
    if err is None or isinstance(err, TimeoutError):
        raise DeviceTimeout(f"{conn.describe()}: the run took longer than --timeout {timeout:.0f} s") from err
    raise DeviceError(f"{conn.describe()}: the run failed ({_last_line(err)})") from err


def session_call(sess, conn: Connection, kind: str, job: dict[str, Any], files: dict[str, Path],
                 timeout: float) -> dict[str, Any]:
    """Upload the files to an open session, run trp_edge.<kind> on them there and remove them again."""
    try:
        try:
            for name, path in files.items():
                sess.upload(str(path), name)
        except Exception as e:  # noqa: BLE001 - socket and RPC errors alike
            raise DeviceError(f"{conn.describe()} refused the upload ({_last_line(e)})") from e
        return _remote_call(sess, conn, kind, job, timeout)
    finally:
        try:
            for name in files:
                sess.remove(name)
        except Exception:  # noqa: BLE001 - the session may be gone already
            pass


@contextmanager
def rpc_session(conn: Connection, timeout: float) -> Iterator[Call]:
    """A session on the device's `trp-edge serve`; yields call(kind, job, files) -> result (session_call)."""
    held = [connect(conn, timeout)]  # the only reference: the server serves one session at a time, and TVM
    # closes a session when its object goes, so it is dropped on leaving even if a caller keeps `call`

    def call(kind: str, job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
        if not held:
            raise DeviceError(f"{conn.describe()}: the session was closed")
        return session_call(held[0], conn, kind, job, files, timeout)

    try:
        yield call
    finally:
        held.clear()


@dataclass
class Session:
    """Where jobs run: `transport` names it for the report, `call(kind, job, files)` runs one job."""

    transport: str
    call: Call
    emulated: bool = False
    workers: int = 1  # how many calls may run at once (a fleet: one per board; trp_edge.transport_fleet)


@contextmanager
def open_session(target: Target, *, local: bool = False, emulate: bool = False, conn: Connection | None = None,
                 timeout: float = 900.0) -> Iterator[Session]:
    """A session of the transport the options name: local, emulated, or RPC on `conn`."""
    if local:
        yield Session("local", _versioned("local", lambda kind, job, files: run_local(job, files, kind)))
    elif emulate:
        yield Session("emulated (qemu-user)", _versioned("qemu", lambda kind, job, files: run_emulated(
            job, files, target, timeout, kind)), emulated=True)
    else:
        if conn is None:
            raise ConfigError("open_session: an RPC session needs a connection (transport.resolve)")
        with rpc_session(conn, timeout) as call:
            yield Session(f"rpc ({conn.describe()})", _versioned(conn.describe(), call))


def _versioned(where: str, call: Call) -> Call:
    """Every job goes out as a DEVICE_JOB and every answer is read as a DEVICE_RESULT: a device whose trp-edge
    answers in a newer version is refused in one line (an older one's answer, with no version, reads as 0)."""

    def versioned(kind: str, job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
        result = call(kind, DEVICE_JOB.stamp(job), files)
        DEVICE_RESULT.check(result, f"the {kind} result from {where}")
        return result

    return versioned
