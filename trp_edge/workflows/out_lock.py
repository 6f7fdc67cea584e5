"""One compress run per --out: the run claims the folder with a lock file created exclusively (O_EXCL), so of two
runs racing for one --out one wins and the other is refused in one line naming the winner. The lock goes when the
run ends, however it ends; one left by a run that died (its process gone, on this host) is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

LOCK = ".trp-edge.lock"
_held: list[Path] = []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(out: Path) -> None:
    """Take --out's lock (the folder exists), or raise InputError naming the run that holds it."""
    path = Path(out) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                other = {}  # being written this instant: held
            if other.get("host") == me["host"] and isinstance(other.get("pid"), int) and not _alive(other["pid"]):
                path.unlink(missing_ok=True)  # its run died: take it over
                continue
            who = f"pid {other.get('pid', '?')} on {other.get('host', '?')}, since {other.get('since', '?')}"
            raise InputError(f"--out {out}: another trp-edge compress is writing there ({who}); wait for it or choose "
                             f"another --out (if that run is gone, remove {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held.append(path)
        return
    raise InputError(f"--out {out}: cannot take its lock {path}")


@contextlib.contextmanager
def released() -> Iterator[None]:
    """The locks claimed inside go when it ends, however it ends."""
    n = len(_held)
    try:
        yield
    finally:
        while len(_held) > n:
            _held.pop().unlink(missing_ok=True)
