"""A fleet: every free board with the target's key at a TVM RPC tracker, as one Session whose call may run on any
of them at once (Session.workers: one per board). Boards must report the same CPU identity (a board that does
not is refused, its identity shown, and held so the tracker does not hand it back); a board that drops mid-job
has the job requeued on another, and a board that registers later joins. A journal beside the output makes a
killed run resume: a call whose answer is in it is answered from it, never run twice."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DeviceError
from .targets import Connection
from .transport import Call, Session, _versioned, connect, session_call

log = logging.getLogger(__name__)

IDENTITY = ("cpu", "machine", "cores")  # what boards of one fleet must share
ATTEMPTS = 3  # boards one job is tried on before the run fails


def free_boards(conn: Connection) -> int:
    """How many boards with conn.key the tracker has free now."""
    from tvm import rpc

    h, _, p = (conn.tracker or "").rpartition(":")
    try:
        summary = rpc.connect_tracker(h, int(p)).summary()
    except Exception as e:  # noqa: BLE001 - socket and tracker errors alike
        raise DeviceError(f"cannot reach the tracker at {conn.tracker} ({e})") from e
    return int(summary.get("queue_info", {}).get(conn.key, {}).get("free", 0))


@dataclass
class Board:
    sess: Any
    name: str
    info: dict[str, Any]


class Fleet:
    """Up to `wanted` boards; call(kind, job, files) runs on whichever is free, requeued when a board drops."""

    def __init__(self, conn: Connection, wanted: int, timeout: float, wait: float = 120.0):
        self.conn, self.wanted, self.timeout, self.wait = conn, wanted, timeout, wait
        self.idle: queue.Queue[Board] = queue.Queue()
        self.live = 0
        self.ident: tuple | None = None
        self.held: list[Board] = []  # refused boards, kept so the tracker does not hand them out again
        self.lock = threading.Lock()
        self.opening = False
        self.why = "no answer"

    def open(self, handshake: float = 30.0) -> Board | None:
        """One more board from the tracker, checked; None when none came or it was refused."""
        try:
            sess = connect(self.conn, self.timeout, handshake=handshake)
            info = json.loads(sess.get_function("trp_edge.info")())
        except Exception as e:  # noqa: BLE001 - no board free now, or one that died on the way
            log.debug("fleet: no board (%s)", e)
            self.why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            return None
        board = Board(sess, getattr(sess, "trp_edge_board", f"board {self.live + len(self.held) + 1}"), info)
        ident = tuple(info.get(k) for k in IDENTITY)
        with self.lock:
            if self.ident is None:
                self.ident = ident
            if ident != self.ident:
                log.warning("fleet: refused %s: its CPU %s is not the fleet's %s", board.name,
                            dict(zip(IDENTITY, ident, strict=True)), dict(zip(IDENTITY, self.ident, strict=True)))
                self.held.append(board)
                return None
            self.live += 1
        log.info("fleet: %s joined (%d boards)", board.name, self.live)
        return board

    def _take(self) -> Board:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return self.idle.get(timeout=1.0)
            except queue.Empty:
                pass
            with self.lock:
                grow = self.live < self.wanted and not self.opening
                self.opening = self.opening or grow
            if grow:
                try:
                    board = self.open(handshake=5.0)
                finally:
                    self.opening = False
                if board is not None:
                    return board
            if time.monotonic() > deadline:
                raise DeviceError(f"no board with key {self.conn.key!r} came free at tracker {self.conn.tracker} "
                                  f"within {self.wait:.0f} s")

    def call(self, kind: str, job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
        last: DeviceError | None = None
        for _ in range(ATTEMPTS):
            board = self._take()
            try:
                result = session_call(board.sess, self.conn, kind, job, files, self.timeout)
            except DeviceError as e:  # the board dropped (or its session ended): the job goes to another
                log.warning("fleet: %s dropped (%s); its job is requeued", board.name, str(e).splitlines()[0][:160])
                with self.lock:
                    self.live -= 1
                del board
                gc.collect()  # TVM's session object is in a cycle: free it now
                last = e
                continue
            self.idle.put(board)
            return result
        raise DeviceError(f"a {kind} job failed on {ATTEMPTS} boards (last: {last})")

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait()
        self.held.clear()
        gc.collect()


@contextmanager
def open_fleet(conn: Connection, boards: int, timeout: float = 900.0,
               journal: Path | None = None) -> Iterator[Session]:
    """A Session over `boards` boards (0: every free one) with conn.key at conn.tracker; `journal`: see Journal."""
    if not conn.tracker:
        raise ConfigError("--boards spreads jobs over the boards of a tracker: pass --tracker HOST:PORT (and --key)")
    wanted = boards or max(free_boards(conn), 1)
    fleet = Fleet(conn, wanted, timeout)
    try:
        first = fleet.open(handshake=60.0)
        if first is None:
            raise DeviceError(f"no board with key {conn.key!r} at tracker {conn.tracker} answered ({fleet.why})")
        fleet.idle.put(first)
        for _ in range(wanted - 1):
            if (b := fleet.open(handshake=10.0)) is not None:
                fleet.idle.put(b)
        log.info("fleet: %d of %d boards with key %r", fleet.live, wanted, conn.key)
        call: Call = _versioned(conn.describe(), fleet.call)
        if journal is not None:
            call = Journal(journal).wrap(call)
        yield Session(f"rpc fleet ({fleet.live} boards, {conn.describe()})", call, workers=wanted)
    finally:
        fleet.close()


class Journal:
    """Answers as they come, one JSON line per call keyed by the job (kind and content): a call already answered
    is answered from the file. Removed by the caller once its output is written."""

    def __init__(self, path: Path):
        self.path, self.lock = Path(path), threading.Lock()
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    d = json.loads(line)
                    self.done[d["key"]] = d["result"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by the kill
            log.info("resuming: %d answers from %s", len(self.done), self.path)

    @staticmethod
    def key(kind: str, job: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([kind, job], sort_keys=True).encode()).hexdigest()[:24]

    def wrap(self, call: Call) -> Call:
        def journaled(kind: str, job: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
            k = self.key(kind, job)
            if k in self.done:
                return self.done[k]
            result = call(kind, job, files)
            if not result.get("error"):
                with self.lock:
                    self.done[k] = result
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with self.path.open("a") as f:
                        f.write(json.dumps({"key": k, "result": result}) + "\n")
                        f.flush()
            return result

        return journaled
