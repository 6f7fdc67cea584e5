"""Calibration's layers timed in place (ONNX Runtime, or any runtime whose backend has CAPABILITIES.in_net):
the whole nets of net_grid, each timed and profiled per layer on the device (job in_net), and every dense conv
and pair given its time in the net (in_net_rows, place). Also how a calibration call's files reach the device
(written: a file lowered only when its call comes, removed after it)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..backends.base import Lowered
from ..errors import ConversionError, DeviceError
from ..latency_table import CALL, DENSE
from ..targets import Target
from ..transport import Session

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")


def net_grid(groups: dict[str, dict[str, Any]], members: dict[str, list[str]]) -> dict[str, dict[str, tuple[str, int]]]:
    """The whole nets that time every measured pair in place: the dense net, then per scheme and grid position j
    the net with every layer that has a j-th measured rank in that scheme as its pair at that rank (the others
    dense). {variant: {layer: (scheme, rank)}}, "dense" first with no pairs."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for key, names in members.items():
        for variant in groups[key]["variants"]:
            scheme, _, k = variant.partition(":")
            for name in names if k else ():
                ranks.setdefault((name, scheme), []).append(int(k))
    grid: dict[str, dict[str, tuple[str, int]]] = {DENSE: {}}
    for scheme in dict.fromkeys(s for _, s in ranks):
        mine = {n: sorted(r) for (n, s), r in ranks.items() if s == scheme}
        for j in range(max(len(r) for r in mine.values())):
            grid[f"{scheme}@{j}"] = {n: (scheme, r[j]) for n, r in mine.items() if j < len(r)}
    return grid


_LOWERING = threading.Lock()  # lowering (torch export) one file at a time, whichever board waits for it


def fan_out(workers: int, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """fn over items, `workers` at a time (a fleet's boards), the results in the items' order as they are ready;
    one at a time in this thread with one worker."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="trp-edge-board")
    try:
        yield from pool.map(fn, items)
    finally:  # a caller that stops early (a failed net) leaves the jobs not started unrun
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def written(files: Lowered) -> Iterator[dict[str, Path]]:
    """The files of one call as paths: a file that the backend's lower_calibration left as a function is written
    now and removed when the call is over, so the host holds one call's models at a time."""
    paths = {}
    try:
        for name, file in files.items():
            with _LOWERING:
                paths[name] = file() if callable(file) else file
        yield paths
    finally:
        for name, file in files.items():
            if callable(file) and name in paths:
                paths[name].unlink(missing_ok=True)


def time_net(session: Session, job: dict[str, Any], files: Lowered, g: dict[str, Any],
              target: Target) -> tuple[float | None, dict[tuple[str, str, int], dict[str, Any]], dict[str, Any]]:
    """The whole dense net's latency, each layer as timed in place (in_net_rows; {} without the nets of
    net_grid, or when they did not run: a device whose trp-edge has no in_net job), and the device's identity.
    One net per call, so that a board holds one net's file at a time, and the host too (written)."""
    dense = job["artifacts"][0]["file"]
    if len(job["artifacts"]) > 1:
        res: dict[str, Any] = {"nets": {}, "errors": {}}

        def one_net(a):
            try:
                with written({a["file"]: files[a["file"]]}) as paths:
                    return session.call("in_net", {**job, "artifacts": [a]}, paths)
            except (DeviceError, ConversionError) as e:
                return {"error": str(e)}

        for one in fan_out(session.workers, one_net, job["artifacts"]):  # one net per call, on any free board
            res["nets"].update(one.get("nets") or {})
            res["errors"].update(one.get("errors") or {})
            res.setdefault("device", one.get("device"))
            if one.get("error"):
                res["error"] = one["error"]
                break
        in_net = in_net_rows(res, g)
        net = (res.get("nets") or {}).get(DENSE)
        if net is not None:
            return net["timing"]["median_ms"], in_net, res["device"]
        job = {**job, "artifacts": job["artifacts"][:1]}  # the dense net alone, as without the grid
    with written({dense: files[dense]}) as paths:
        res = session.call("calibrate", job, paths)
    if res.get("error"):
        raise DeviceError(f"{target.name}/{job['runtime']}: {res['error']}")
    return res["timing"].get(DENSE, {}).get("median_ms"), {}, res["device"]


def in_net_rows(res: dict[str, Any], g: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(layer, scheme, rank) -> its row as timed in place: each net's per-layer profile, scaled by that net's
    timed latency over its profiled one (the profiler's own cost taken out). A dense conv from the dense net, a
    pair from its grid net. {} with a warning when a net failed: the table then keeps every layer as timed alone."""
    nets = res.get("nets") or {}
    failed = res.get("error") or "; ".join(f"{v}: {e}" for v, e in (res.get("errors") or {}).items())
    if failed or set(nets) != set(g["grid"]):
        log.warning("calibrate: the whole nets did not all run (%s): every layer is as timed alone",
                    str(failed or "missing").splitlines()[0][:200])
        return {}
    out = {}
    for variant, pairs in g["grid"].items():
        net = nets[variant]
        scale = net["timing"]["median_ms"] / net["total_ms"] if net["total_ms"] > 0 else 1.0
        for tag, t in net["layers"].items():
            name = g["order"][int(tag)]
            scheme, rank = pairs.get(name, (DENSE, 0))
            if (scheme == DENSE) == (variant == DENSE):
                out[(name, scheme, rank)] = {"median_ms": round(t["median_ms"] * scale, 5),
                                             "p10_ms": round(t["p10_ms"] * scale, 5),
                                             "p90_ms": round(t["p90_ms"] * scale, 5), "runs": t["runs"]}
    return out


def place(rows: list[dict[str, Any]], in_net: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with every dense conv and pair as timed in place (in_net_rows), when the nets timed them all; the
    per-call rows stay. Else the rows as timed alone, with a warning when there were nets."""
    timed = [r for r in rows if r["scheme"] != CALL]
    missing = [r for r in timed if (r["layer"], r["scheme"], r["rank"]) not in in_net]
    if not in_net or missing:
        if in_net:
            log.warning("calibrate: %s %s:%s was not found in its whole net: every layer is as timed alone",
                        missing[0]["layer"], missing[0]["scheme"], missing[0]["rank"])
        return rows
    return [r if r["scheme"] == CALL else {**r, **in_net[(r["layer"], r["scheme"], r["rank"])]} for r in rows]
