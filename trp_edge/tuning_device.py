"""Where TVM tuning measures: the Measurer the build workflow passes into the TVM backend, made from the
target and the build's connection options. Above the backends and beside the transport: it reaches the device
(trp_edge.transport), starts an emulated server (trp_edge.emulate) and names this machine
(trp_edge.profile.host_identity), so that trp_edge.backends.tvm does none of that."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .backends.tvm import Measurer
from .errors import ConfigError, DeviceError
from .targets import Connection

if TYPE_CHECKING:
    from .config import BuildConfig
    from .targets import Target


def device_info(conn: Connection) -> dict[str, Any]:
    """The identity a `trp-edge serve` reports, checked to have a TVM runtime to time kernels with."""
    from .transport import connect

    sess = connect(conn, 120)
    try:
        info = json.loads(sess.get_function("trp_edge.info")())
    except Exception:  # noqa: BLE001 - tvm.exec.rpc_server has no trp_edge.info
        raise DeviceError(f"{conn.describe()} is a TVM RPC server without trp-edge's trp_edge.info; run "
                          "`trp-edge serve` there to tune on it") from None
    if "cpu" not in info.get("tvm_devices", ["cpu"]):
        raise DeviceError(f"{conn.describe()} has no TVM runtime to time kernels with (pip install apache-tvm "
                          "there, or build the TVM runtime: README)")
    return info


@contextmanager
def measurer(target: Target, cfg: BuildConfig, threads: int) -> Iterator[Measurer | None]:
    """The machine tuning measures on, at `threads` (the deployment's, resolved once by the caller): the device
    given by cfg's host/port or tracker/key, else an emulated aarch64 server (cfg.tune_emulated, at one thread:
    qemu on this machine's cores), else this machine for a native target, else the target's [rpc] or
    $TRP_EDGE_TRACKER / $TRP_EDGE_RPC; None when no tuning is asked for or there is no device (the build is left
    untuned, with a warning)."""
    from .profile import host_identity
    from .transport import connect, resolve

    if cfg.tune_trials <= 0 and cfg.tune_minutes <= 0:
        yield None
        return
    given = bool(cfg.host or cfg.tracker)
    if cfg.tune_emulated and not given and not target.native:
        from .emulate import emulated_server

        with emulated_server(target) as conn:
            yield Measurer(f"emulated rpc (qemu-user {target.cpu.arch}, {conn.describe()})", device_info(conn),
                           conn, 1, emulated=True, connect=connect)
        return
    if target.native and not given:
        yield Measurer("local", host_identity(), threads=threads)
        return
    try:
        conn = resolve(target, **cfg.reach)
    except ConfigError:
        yield None
        return
    yield Measurer(f"rpc ({conn.describe()})", device_info(conn), conn, threads, connect=connect)
