"""The CLI's shared parts: logging from -q/-v, options whose defaults are the configs' fields, library errors as
one line, and the option groups several commands share."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import sys
from pathlib import Path

import click

from .config import DeployConfig, ProfileConfig
from .errors import TrpEdgeError

log = logging.getLogger("trp_edge.cli")


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO if verbose == 0 else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    ours = logging.getLogger("trp_edge")
    for h in [h for h in ours.handlers if h.get_name() == "trp-edge.cli"]:  # an earlier command in this process
        ours.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("trp-edge.cli")
    handler.setFormatter(logging.Formatter("trp-edge: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False


def default(cls, name: str):
    """The default of a config field: the CLI states no default of its own."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def opt(cls, name: str, *decls: str, **kw):
    """click.option with the default of `cls.name` (shown in --help)."""
    d = default(cls, name)
    kw.setdefault("show_default", d is not None)
    return click.option(*decls, default=d, **kw)


def library_errors(fn):
    """Set up logging from -q/-v, then run the command; a library error (TrpEdgeError) becomes one line and exit
    code 1, with its traceback and cause on stderr under -v. Unexpected errors keep their traceback."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        verbose = kwargs.get("verbose", 0) - kwargs.get("quiet", 0)
        setup_logging(verbose)
        try:
            return fn(*args, **kwargs)
        except TrpEdgeError as e:
            if verbose > 0:
                log.debug("the error, with its cause:", exc_info=e)
            raise click.ClickException(str(e)) from e
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" writing {e.filename}" if e.filename else ""
            raise click.ClickException(f"the disk is full{where} ({e.strerror}): free some space and run again; "
                                       "files written before are kept") from e

    return run


def parse_ranks(value: str | None) -> dict[str, int] | None:
    """--ranks 'layer1.0.conv1=8,layer1.0.conv2=6' or a JSON file {name: rank}."""
    if not value:
        return None
    if Path(value).is_file():
        try:
            d = json.loads(Path(value).read_text())
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{value}: not JSON ({e})") from e
        if not isinstance(d, dict):
            raise click.BadParameter(f"{value}: expected a JSON object {{layer: rank}}")
        return {str(k): v for k, v in d.items()}
    out = {}
    for item in value.split(","):
        name, sep, k = item.partition("=")
        if not sep or not k.strip().isdigit():
            raise click.BadParameter(f"expected NAME=RANK[,NAME=RANK...] or a JSON file, got {item!r}")
        out[name.strip()] = int(k)
    return out


def _token(ctx, param, value):
    """--token goes to $TRP_EDGE_TOKEN, where the transport reads it: never into a config, so never into a report,
    a manifest or a log."""
    import os

    if value:
        os.environ["TRP_EDGE_TOKEN"] = value
    return None


def connection_options(f):
    f = click.option("--token", default=None, expose_value=False, callback=_token, metavar="TOKEN",
                     help="the token the device's trp-edge serve requires [default: $TRP_EDGE_TOKEN, else the "
                          "variable the target's [rpc] token_env names]")(f)
    f = click.option("--host", default=None, help="the device's trp-edge serve address")(f)
    f = click.option("--port", type=int, default=None)(f)
    f = click.option("--tracker", default=None, help="a TVM RPC tracker HOST:PORT")(f)
    f = click.option("--key", default=None, help="the device key at the tracker [default: the target's]")(f)
    return f


def _boards(ctx, param, value):
    if value is None:
        return None
    if value == "all":
        return 0
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"a number of boards or 'all', got {value!r}")
    return int(value)


boards_option = click.option(
    "--boards", default=None, callback=_boards, metavar="N|all",
    help="spread the jobs over N (or all) free boards with the key at --tracker; a dropped board's job is requeued")


def serve_limit_options(f):
    from .device.jobs import JOB_SECONDS, MAX_UPLOAD_MB

    f = click.option("--token", envvar="TRP_EDGE_TOKEN", default=None, show_envvar=True,
                     help="the token clients must present [beyond loopback without one: made and printed once]")(f)
    f = click.option("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, show_default=True,
                     help="the largest file a client may upload")(f)
    f = click.option("--job-seconds", type=float, default=JOB_SECONDS, show_default=True,
                     help="the longest one job may run (0: no limit)")(f)
    return f


def protocol_options(f):
    f = opt(ProfileConfig, "min_runs", "--min-runs", type=int, help="timed runs per model, at least")(f)
    f = opt(ProfileConfig, "min_seconds", "--min-seconds", type=float, help="timed seconds per model, at least")(f)
    f = opt(DeployConfig, "threads", "--threads", type=int, help="runtime threads [default: the target's]")(f)
    return f
