"""Wall time and bytes sent of one in-place ONNX Runtime calibration table of ResNet-20 over 1, 2 and 3 loopback
`trp-edge serve`s behind one TVM RPC tracker (calibrate --tracker --boards N). On one machine the servers share its
cores: the numbers show what the fleet costs and saves in scheduling, not what N real boards would give.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_fleet.py [--boards 1,2,3] [--input-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr, start_new_session=True,
                            env={**os.environ, **env})


def stop(p: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def wait_for(ready, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise SystemExit("the tracker or the servers did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", default="1,2,3")
    ap.add_argument("--input-size", type=int, default=32)
    a = ap.parse_args()
    import trp_edge.transport_fleet as tf
    from trp_edge.config import CalibrateConfig
    from trp_edge.workflows.calibrate import calibrate

    sent = {"bytes": 0, "calls": 0}
    lock = threading.Lock()
    real = tf.session_call

    def counting(sess, conn, kind, job, files, timeout):
        with lock:
            sent["bytes"] += sum(Path(p).stat().st_size for p in files.values())
            sent["calls"] += 1
        return real(sess, conn, kind, job, files, timeout)

    tf.session_call = counting
    env = {"TRP_EDGE_TOKEN": "bench-fleet", "OMP_NUM_THREADS": "1"}
    os.environ.update(env)
    rows = []
    for n in (int(x) for x in a.boards.split(",")):
        tport = free_port()
        tracker = spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport),
                         "--port-end", str(tport + 1)], env)
        wait_for(lambda tport=tport: socket.create_connection(("127.0.0.1", tport), timeout=1).close() or True)
        boards = [spawn([sys.executable, "-m", "trp_edge", "serve", "--port", str(free_port()), "--tracker",
                         f"127.0.0.1:{tport}", "--key", "bench"], env) for _ in range(n)]
        wait_for(lambda tport=tport, n=n: tf.free_boards(tf.Connection(tracker=f"127.0.0.1:{tport}", key="bench")) == n)
        sent.update(bytes=0, calls=0)
        try:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                r = calibrate(CalibrateConfig(target="host", model="resnet20", input_size=a.input_size, threads=1,
                                              tracker=f"127.0.0.1:{tport}", key="bench", out=out), boards=n)
                wall = time.perf_counter() - t0
                header = json.loads(r.header.read_text())
        finally:
            for p in [*boards, tracker]:
                stop(p)
        rows.append({"boards": n, "wall_s": round(wall, 1), "rows": r.rows, "calls": sent["calls"],
                     "MB_sent": round(sent["bytes"] / 2**20, 2), "in_net": header.get("in_net"),
                     "transport": header.get("transport")})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
