"""Device side of the profiler: check each artifact against the reference, time the dense and compressed
models by the one timing protocol (trp_edge.profile: warm-up, alternating blocks, a count and a minimum
time), then a per-op breakdown where the runtime offers one. numpy and the runtimes only, no torch.

Used in-process (`--local`), by the emulated aarch64 python (`--emulate`) and by `trp-edge serve` (over
TVM RPC). Every failure of one artifact is returned as data.

    python -m trp_edge.device.bench JOB.json             # prints the result as one JSON line
    python -m trp_edge.device.bench calibrate JOB.json   # the same for a calibration job (below)

JOB: {"runtime": "ort", "threads": 4, "reference": "reference.npz", "protocol": {...ProfileConfig...},
      "artifacts": [{"variant": "dense", "file": "dense.onnx", "device": "cpu"}, {"variant": "compressed", ...}],
      "layers": true}
An artifact may name its own "reference" file and the "key" of its output there (default: the job's
reference and its variant), so the models of several compress runs are timed side by side in one job; its own
"runtime" (a reference build of another runtime, timed alongside; "timing_only": no per-op profile); and a
"device" (TVM device API: cpu, opencl, ...). One whose device API this TVM runtime lacks is "skipped", not run.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import capabilities, get
from ..config import ProfileConfig
from ..contracts import DEVICE_JOB, DEVICE_RESULT
from ..errors import ContractError
from ..profile import host_identity, time_alternating
from .jobs import problem
from .runner import load, runtime_versions, session_modes, tvm_device_apis


def device_identity() -> dict[str, Any]:
    return {**host_identity(), "runtimes": runtime_versions(), "sessions": session_modes(),
            "tvm_devices": tvm_device_apis()}


def _failure(e: Exception) -> str:
    """One artifact's failure, as recorded: the exception's type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def bench(job: dict[str, Any], base: Path) -> dict[str, Any]:
    rt, threads = job["runtime"], int(job.get("threads", 1))
    cfg = ProfileConfig(**job.get("protocol", {}))
    refs: dict[str, Any] = {}
    inputs: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"runtime": rt, "threads": threads, "device": device_identity(), "artifacts": {}}
    runners = {}
    apis = None
    for a in job["artifacts"]:
        r: dict[str, Any] = {"file": a["file"]}
        out["artifacts"][a["variant"]] = r
        api = a.get("device", "cpu")
        if api != "cpu":
            apis = tvm_device_apis() if apis is None else apis
            if api not in apis:  # a GPU build on a device without that TVM device API: not run, not an error
                r["skipped"] = (f"this device's TVM runtime has no {api} device (it has: {', '.join(apis) or 'none'});"
                                f" build the TVM runtime with {api} there (docs/device-setup.md: mobile GPUs)")
                continue
        try:
            ref_name = a.get("reference", job.get("reference"))
            if ref_name not in refs:
                refs[ref_name] = np.load(base / ref_name)
            ref = refs[ref_name]
            x = inputs[a["variant"]] = ref["input"]
            fn = load(str(base / a["file"]), a.get("runtime", rt), threads, api)
            got = np.asarray(fn(x), dtype=np.float32)
            want = ref[a.get("key", a["variant"])]
            r["max_abs_diff"] = float(np.max(np.abs(got - want))) if got.shape == want.shape else None
            runners[a["variant"]] = (lambda fn=fn, x=x: fn(x))
        except ImportError as e:
            r["error"] = f"runtime missing on the device: {e}"
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            r["error"] = _failure(e)
    if not runners:
        out["error"] = "; ".join(f"{v}: {r.get('error') or r.get('skipped')}" for v, r in out["artifacts"].items())
        return out
    if job.get("rest_seconds"):  # the machine was just busy on every core: let it settle (see the job's maker)
        time.sleep(float(job["rest_seconds"]))
        out["rested_s"] = float(job["rest_seconds"])
    out["timing"] = {k: t.to_dict() for k, t in time_alternating(runners, cfg).items()}
    out["protocol"] = cfg.to_dict()
    if job.get("layers", True):
        _profile_ops(job, base, rt, threads, inputs, out, runners)
    if capabilities(rt).ops_note:
        out["ops_note"] = capabilities(rt).ops_note
    return out


def _profile_ops(job, base: Path, rt: str, threads: int, inputs: dict[str, np.ndarray], out: dict[str, Any],
                 runners: dict) -> None:
    """Each timed artifact's per-op profile (the backend's profile_ops), after the timing."""
    for a in job["artifacts"]:
        if a["variant"] not in runners or a.get("precision", "fp32") != "fp32" or a.get("timing_only"):
            continue
        r = out["artifacts"][a["variant"]]
        try:
            r["ops"] = get(rt).profile_ops(str(base / a["file"]), inputs[a["variant"]], threads, a.get("device", "cpu"))
        except Exception as e:  # noqa: BLE001 - recorded, the timing stands
            r["ops_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def calibrate(job: dict[str, Any], base: Path) -> dict[str, Any]:
    """One layer of `trp-edge calibrate`: the dense conv and its low-rank pairs (one small model each) timed in
    alternating blocks on a random input of the layer's shape. A variant that fails is recorded, not raised.

    JOB: {"runtime": "ort", "threads": 1, "protocol": {...}, "input_shape": [1, 64, 56, 56],
          "artifacts": [{"variant": "dense", "file": "dense.onnx"}, {"variant": "spatial:8", "file": ...}, ...]}"""
    rt, threads = job["runtime"], int(job.get("threads", 1))
    cfg = ProfileConfig(**job.get("protocol", {}))
    x = np.random.default_rng(0).standard_normal(job["input_shape"]).astype(np.float32)
    out: dict[str, Any] = {"runtime": rt, "threads": threads, "device": device_identity(), "errors": {}}
    runners = {}
    for a in job["artifacts"]:
        try:
            if a.get("signature"):  # one variant of a multi-signature grid (TFLite)
                fn = get(rt).load_signature(str(base / a["file"]), a["signature"], threads)
            else:
                fn = load(str(base / a["file"]), rt, threads, a.get("device", "cpu"))
            fn(x)
            runners[a["variant"]] = (lambda fn=fn: fn(x))
        except ImportError as e:
            out["error"] = f"runtime missing on the device: {e}"
            return out
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            out["errors"][a["variant"]] = _failure(e)
    out["timing"] = {k: t.to_dict() for k, t in time_alternating(runners, cfg).items()} if runners else {}
    out["protocol"] = cfg.to_dict()
    return out


def in_net(job: dict[str, Any], base: Path) -> dict[str, Any]:
    """The layers of `trp-edge calibrate` in place: whole nets whose layers are tagged (backends.ort.tag_layers),
    one at a time (a net per grid position, too many to hold at once on a board): each timed by the protocol,
    then profiled per layer (the backend's layer_profile). A net that fails is recorded, not raised.

    JOB: as calibrate's, "artifacts" [{"variant": "dense", "file": "net0.onnx"}, {"variant": "spatial@3", ...}]"""
    rt, threads = job["runtime"], int(job.get("threads", 1))
    cfg = ProfileConfig(**job.get("protocol", {}))
    x = np.random.default_rng(0).standard_normal(job["input_shape"]).astype(np.float32)
    out: dict[str, Any] = {"runtime": rt, "threads": threads, "device": device_identity(), "errors": {}, "nets": {}}
    if not capabilities(rt).in_net:
        out["error"] = f"{rt}: no per-layer profile in a whole net"
        return out
    profile = get(rt).layer_profile
    for a in job["artifacts"]:
        path = str(base / a["file"])
        try:
            fn = load(path, rt, threads, a.get("device", "cpu"))
            fn(x)
            timing = time_alternating({a["variant"]: (lambda fn=fn: fn(x))}, cfg)[a["variant"]]
            del fn
            out["nets"][a["variant"]] = {"timing": timing.to_dict(), **profile(path, x, threads)}
        except ImportError as e:
            out["error"] = f"runtime missing on the device: {e}"
            return out
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            out["errors"][a["variant"]] = _failure(e)
    out["protocol"] = cfg.to_dict()
    return out


def _versioned(run: Callable[[dict[str, Any], Path], dict[str, Any]]) -> Callable[[dict[str, Any], Path], dict]:
    """A job function behind the device-job contract: a job of a newer trp-edge is answered with one error line
    (the host reads it as a failed run), and every answer carries the device-result format and version."""

    def versioned(job: dict[str, Any], base: Path) -> dict[str, Any]:
        try:
            DEVICE_JOB.check(job, "the job sent to this device")
        except ContractError as e:
            return DEVICE_RESULT.stamp({"runtime": job.get("runtime"), "error": str(e), "artifacts": {}})
        if (why := problem(run.__name__, job, plain=False)) is not None:  # the kinds are the functions' names
            return DEVICE_RESULT.stamp({"runtime": job.get("runtime"), "error": f"a malformed job: {why}",
                                        "artifacts": {}})
        return DEVICE_RESULT.stamp(run(job, base))

    return functools.wraps(run)(versioned)


JOBS = {"bench": _versioned(bench), "calibrate": _versioned(calibrate), "in_net": _versioned(in_net)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[0] not in JOBS):
        print(__doc__, file=sys.stderr)
        return 2
    job_path = Path(argv[-1])
    run = JOBS[argv[0]] if len(argv) == 2 else bench
    print(json.dumps(run(json.loads(job_path.read_text()), job_path.parent)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
