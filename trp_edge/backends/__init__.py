"""Runtimes as same-shaped modules: tvm, ort, tflite, executorch. Each implements the runtime protocol of
trp_edge.backends.base (CAPABILITIES, check_available, build, load, profile_ops, ...); `get(name)` returns one
and `capabilities(name)` what it can do. Heavy imports stay inside the functions, so a missing runtime is one
clear line when it is used, and a backend's CAPABILITIES is read without importing the runtime itself.

The registry is static: each backend is imported by name below, so an import walker sees every edge."""

from __future__ import annotations

from ..targets import RUNTIMES
from .base import Capabilities, Runtime

# TVM's capabilities, declared here until its backend (being split into a package) declares CAPABILITIES itself
_TVM = Capabilities(int8=False, in_net=False, version_key="tvm", reference="ort")


def get(name: str) -> Runtime:
    """The backend module of a runtime."""
    if name == "ort":
        from . import ort as mod
    elif name == "tflite":
        from . import tflite as mod
    elif name == "tvm":
        from . import tvm as mod
    elif name == "executorch":
        from . import executorch as mod
    else:
        raise ValueError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
    return mod  # type: ignore[return-value]


def capabilities(name: str) -> Capabilities:
    """What runtime `name` can do (its backend's CAPABILITIES); the runtime itself is not imported."""
    if name == "tvm":
        return _TVM
    return get(name).CAPABILITIES


def int8_runtimes() -> tuple[str, ...]:
    """The runtimes trp-edge builds (so deploys and calibrates) at INT8."""
    return tuple(rt for rt in RUNTIMES if capabilities(rt).int8)
