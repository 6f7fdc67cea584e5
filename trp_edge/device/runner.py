"""Device side: load one artifact with the runtime it was built for and run it on numpy arrays.

Imports numpy and that runtime only (no torch, no trp_edge modules that need torch), so it runs on a
board, under qemu in the arm64 userland, and inside `trp-edge serve`. How each runtime loads is its
backend's business (trp_edge.backends.<runtime>.load).

    python -m trp_edge.device.runner check JOB.json     # prints {"results": [...]} as JSON

JOB.json: {"reference": "reference.npz", "threads": 1,
           "artifacts": [{"file": "compressed.so", "runtime": "tvm", "variant": "compressed", "device": "cpu"}]}
reference.npz holds "input" and one "<variant>" array per model (the expected output).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ..backends import capabilities, get
from ..backends.base import Run
from ..targets import RUNTIMES


def load(path: str, runtime: str, threads: int = 1, device: str = "cpu") -> Run:
    """An artifact loaded by its runtime's backend (trp_edge.backends.<runtime>.load)."""
    return get(runtime).load(str(path), threads, device)


def runtime_versions() -> dict[str, str | None]:
    """Which runtimes this device has, by package (each backend's CAPABILITIES.version_key and other_packages;
    None: not installed)."""
    import importlib

    out: dict[str, str | None] = {"numpy": np.__version__}
    for rt in RUNTIMES:
        caps = capabilities(rt)
        for package in (caps.version_key, *caps.other_packages):
            try:
                out[package] = getattr(importlib.import_module(package), "__version__", None) or _dist(package)
            except Exception:  # noqa: BLE001 - a runtime that fails to import is as good as missing
                out[package] = None
    return out


def _dist(package: str) -> str:
    """An installed package's version from its metadata (a namespace package has no __version__: executorch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def session_modes() -> dict[str, str]:
    """How this runner runs each runtime's worker threads where that changes multi-thread latency (each backend's
    CAPABILITIES.session_mode; a table measured another way is stale: latency_table.stale)."""
    return {caps.version_key: caps.session_mode for caps in map(capabilities, RUNTIMES) if caps.session_mode}


def tvm_device_apis() -> list[str]:
    """The TVM device APIs this runtime can run kernels on (cpu, and opencl / vulkan / cuda where the TVM
    runtime was built with them and a device answers); [] without TVM."""
    try:
        import tvm
    except Exception:  # noqa: BLE001 - no TVM here
        return []
    found = []
    for api in ("cpu", "opencl", "vulkan", "cuda"):
        try:
            if tvm.device(api, 0).exist:
                found.append(api)
        except Exception:  # noqa: BLE001 - a runtime built without that API
            pass
    return found


def check(job: dict, base: Path) -> list[dict]:
    """Run every artifact of a job on the reference input; a failure is recorded, not raised."""
    ref = np.load(base / job["reference"])
    x = ref["input"]
    results = []
    for a in job["artifacts"]:
        r = {"file": a["file"]}
        t0 = time.perf_counter()
        try:
            fn = load(str(base / a["file"]), a["runtime"], job.get("threads", 1), a.get("device", "cpu"))
            got = np.asarray(fn(x), dtype=np.float32)
            want = ref[a["variant"]]
            if got.shape != want.shape:
                r["error"] = f"output shape {got.shape}, expected {want.shape}"
            else:
                r["max_abs_diff"] = float(np.max(np.abs(got - want)))
                r["max_abs_ref"] = float(np.max(np.abs(want)))
                r["rel_l2"] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
                r["top1_match"] = bool(np.array_equal(got.argmax(-1), want.argmax(-1)))
        except Exception as e:  # noqa: BLE001 - reported to the caller as data
            r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            r["traceback"] = traceback.format_exc(limit=3)
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "check":
        print(__doc__, file=sys.stderr)
        return 2
    job_path = Path(argv[1])
    job = json.loads(job_path.read_text())
    results = check(job, job_path.parent)
    print(json.dumps({"results": results, "runtimes": runtime_versions()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
