"""compress's checks on this machine, after the export: the latency check (the dense and compressed ONNX files
timed as deploy --local times a build) and the INT8 whole-net check (the runtimes compress plans INT8 for here:
when the quantized compressed net is not faster than the quantized dense one, those INT8 builds keep every pair
dense). `run` is workflows.compress's run state."""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..contracts import pair_job
from ..errors import TrpEdgeError
from ..planning import LayerPlan

log = logging.getLogger(__name__)

# compress times its pair right after its own training and export kept every core busy; a machine just out of
# such load can run multi-thread work slower for a while (the AMD EPYC VM of BENCHMARKS "Measured for issue 27":
# the compressed ResNet-18 at 2 threads took 11 ms instead of 7.7 ms within 5 s of a 2-core burst, and was back
# at rest after 10 s), while deploy times a device at rest. So at 2+ threads the check waits this long first.
REST_AFTER_LOAD_S = 10.0


def latency_check(run: Any, stage: Path, dense_model, model, comp_macs: int) -> dict[str, Any] | None:
    """What the MACs became in milliseconds here, from day one: the staged dense.onnx and model.onnx timed side by
    side by the device job deploy --local runs (the same session setup, job, protocol and threads: one number a
    user compares with deploy's), on an input of the model's shape; their outputs checked against torch's."""
    import numpy as np

    cfg = run.cfg
    if cfg.latency is None:
        return None
    threads = cfg.latency.threads or cfg.threads or 1
    x = np.random.default_rng(0).standard_normal(tuple(run.example.shape)).astype(np.float32)
    with torch.no_grad():
        ref = {"input": x, **{k: m(torch.from_numpy(x)).numpy() for k, m in (("dense", dense_model),
                                                                              ("compressed", model))}}
    np.savez(stage / "latency-reference.npz", **ref)
    rest = REST_AFTER_LOAD_S if threads > 1 else 0.0
    job = pair_job("ort", threads, replace(cfg.latency, threads=threads), "dense.onnx", "model.onnx",
                   "latency-reference.npz", rest_seconds=rest)
    files = {f: stage / f for f in ("dense.onnx", "model.onnx", "latency-reference.npz")}
    try:
        res = run.services.run_job(job, files)
    except TrpEdgeError as e:  # a failed check is reported; the compressed model stands
        res = {"error": str(e)}
    finally:
        (stage / "latency-reference.npz").unlink(missing_ok=True)
    if "timing" not in res:
        log.warning("the latency check here did not run: %s", res.get("error"))
        return None
    t = res["timing"]
    speedup = t["dense"]["median_ms"] / t["compressed"]["median_ms"]
    return {"runtime": "onnxruntime", "target": "host", "threads": res["threads"], "device": res["device"],
            "protocol": res["protocol"], "dense": t["dense"], "compressed": t["compressed"], "latency_speedup": speedup,
            "efficiency": speedup / (run.dense_macs.total / comp_macs),
            "max_abs_diff": {k: res["artifacts"][k].get("max_abs_diff") for k in ("dense", "compressed")},
            "rested_s": res.get("rested_s", 0.0)}


def int8_net_check(run: Any, stage: Path, dense_model: torch.nn.Module, model: torch.nn.Module,
                   plans: list[LayerPlan], kept_at: dict[str, dict[str, list[str]]], spec_of) -> dict[str, Any]:
    """Each runtime compress plans INT8 for on this machine (a host INT8 table beside the fp32 ones): the whole
    dense and compressed nets, quantized as build quantizes them, timed side by side at the table's threads.
    Per-layer INT8 tables miss what the net adds around a pair (on the Intel host's ResNet-20, ORT pairs at
    0.72-0.96 of the dense conv alone left the INT8 net at 0.96x of dense: BENCHMARKS.md); when the compressed
    net is not faster, that runtime's INT8 builds keep every pair dense (kept_at updated). {runtime: timing}."""
    from ..lowrank import merge_pairs_

    decomposed, out = [p.name for p in plans if p.rank is not None], {}
    for h in (t.header for t in run.tables):  # the run's tables, loaded once
        rt, kept = h["runtime"], kept_at.get("int8", {}).get(h["runtime"])
        if (h["target"], h.get("precision")) != ("host", "int8") or kept is None or set(kept) >= set(decomposed):
            continue
        merged = copy.deepcopy(model)
        merge_pairs_(merged, dense_model, kept)
        onnx = {"dense": stage / "dense.onnx", "compressed": None if kept else stage / "model.onnx"}
        timing = _time_int8_nets(run, stage / ".int8-check", dense_model, merged, rt, h["threads"],
                                 spec_of(decomposed), spec_of(kept), onnx)
        if timing is None:
            continue
        timing.update(precision="int8", kept_dense=timing["latency_speedup"] <= 1.0)
        if timing["kept_dense"]:
            kept_at["int8"][rt] = decomposed
            log.warning("%s INT8 here: the compressed net measured %.2fx of the dense one (whole net, side by side): "
                        "its INT8 builds keep every pair dense", rt, timing["latency_speedup"])
        out[rt] = timing
    return out


def _time_int8_nets(run: Any, work: Path, dense_model, merged, runtime: str, threads: int, dense_spec,
                    spec, onnx: dict[str, Path | None]) -> dict[str, Any] | None:
    """The dense and `merged` nets as `runtime`'s INT8 artifacts (its backend's int8_artifact: ORT quantizes the
    ONNX file, the staged one where `onnx` names one; TFLite converts the torch file), timed side by side here
    (profile.time_pair). None when the runtime builds no INT8 or its converter is missing."""
    from ..backends import capabilities, get
    from ..backends.base import ModelFiles, calibration_images
    from ..errors import ConversionError, MissingTool
    from ..export import export_onnx
    from ..models import save_compressed
    from ..profile import time_pair
    from ..targets import load_target

    def onnx_file(name: str, net) -> Path:  # the staged file, else exported now
        if onnx[name] is None:
            export_onnx(net, run.example, work / f"{name}.onnx")
        return onnx[name] or work / f"{name}.onnx"

    if not capabilities(runtime).int8:
        return None
    shape = tuple(run.example.shape)
    calib, host = calibration_images(shape), load_target("host")
    work.mkdir(exist_ok=True)
    files = {}
    try:
        for name, net, net_spec in (("dense", dense_model, dense_spec), ("compressed", merged, spec)):
            model = ModelFiles(onnx=lambda name=name, net=net: onnx_file(name, net),
                               torch=lambda name=name, net=net, net_spec=net_spec:
                               work / save_compressed(work, name, net, net_spec, run.example))
            files[name] = get(runtime).int8_artifact(model, work, name, shape, calib, host)
        return time_pair(get(runtime), files["dense"], files["compressed"], shape, replace(run.cfg.latency,
                                                                                      threads=threads))
    except (MissingTool, ConversionError) as e:
        log.warning("%s INT8 not checked on the whole net: %s", runtime, e)
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
