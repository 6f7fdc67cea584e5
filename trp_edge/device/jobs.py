"""What a device accepts: a job's JSON checked against its contract (DEVICE_JOB and the shape trp_edge.device.bench
reads), its file names plain names inside the session folder, uploads capped by size and each job by time. A
job that breaks a limit is answered with one line; the server goes on serving. numpy-free, torch-free."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MAX_UPLOAD_MB = 3072  # serve --max-upload-mb: the largest torchvision classifier at fp32 (regnet_y_128gf, 645 M
# parameters, 2.5 GB; vit_h_14 2.4 GB) with room for its graph
JOB_SECONDS = 3600.0  # serve --job-seconds


class JobTimeout(TimeoutError):
    """A job ran past the server's per-job limit."""


def plain_name(name: Any) -> str | None:
    """Why `name` is not a plain file name inside the session folder (None: it is)."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a file name"
    if name.startswith(("/", "\\")) or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        return f"{name!r} is not a plain file name inside the session folder (no folders, no absolute paths, no ..)"
    return None


def _shape_problem(shape: Any) -> str | None:
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and 0 < d <= 1 << 16 for d in shape):
        return f"input_shape must be a list of positive ints, got {shape!r}"
    return None


def problem(kind: str, job: Any, *, plain: bool = True) -> str | None:
    """Why `job` (of `kind`: bench, calibrate, in_net) is refused (None: it is well formed). `plain`: file names must
    be plain names (on a server; a local run reads absolute paths)."""
    if not isinstance(job, dict):
        return "a job is a JSON object"
    if not isinstance(job.get("runtime"), str):
        return "the job names no runtime"
    threads = job.get("threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 < threads <= 1024:
        return f"threads must be a positive int, got {threads!r}"
    if not isinstance(job.get("protocol", {}), dict):
        return "protocol must be an object"
    arts = job.get("artifacts")
    if not isinstance(arts, list) or not arts or not all(isinstance(a, dict) for a in arts):
        return "artifacts must be a non-empty list of objects"
    names = [a.get("file") for a in arts] + [a["reference"] for a in arts if "reference" in a]
    if kind == "bench":
        if "reference" in job or any("reference" not in a for a in arts):
            names.append(job.get("reference"))  # the artifacts' reference where they name none of their own
    elif (why := _shape_problem(job.get("input_shape"))) is not None:
        return why
    for a in arts:
        if not isinstance(a.get("variant"), str):
            return f"artifact {a.get('file')!r} has no variant"
    for n in names:
        if not isinstance(n, str) or not n:
            return f"{n!r} is not a file name"
        if plain and (why := plain_name(n)) is not None:
            return why
    return None


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise JobTimeout in this (main) thread after `seconds` (None or 0: no limit). The check lands between two
    Python steps: a single inference call finishes first."""
    if not seconds or seconds <= 0:
        yield
        return

    def expired(*_):
        raise JobTimeout(f"the job ran past this server's limit of {seconds:.0f} s (serve --job-seconds)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
