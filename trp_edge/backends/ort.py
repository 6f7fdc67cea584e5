"""ONNX Runtime: the graph optimized for the target and saved (fp32), and a static INT8 (QDQ) model
calibrated on real images; loading and per-op profiling on the device.

Every onnxruntime session trp-edge creates comes from `session()`: one thread count, inter-op 1, intra-op
workers spinning within a run and stopping when it ends (SPINNING), graph optimizations at ORT_ENABLE_ALL
unless saving a portable graph. Spinning within a run is how onnxruntime runs by default: a worker that sleeps
between ops pays a wake-up per op, which thin low-rank pairs (twice the ops) feel most (measured: ResNet-18 at
3x fewer MACs, 2 threads, 4.58 -> 3.98 ms; dense 11.30 -> 10.96). Stopping at the end of a run keeps idle
workers from stealing the core from whatever runs next (spinning left on between calls: 2-thread runs slower
than 1-thread ones in an alternating timing).

Graph optimizations are saved at ORT_ENABLE_ALL only for the host itself: that level adds layout
transforms (NCHWc) specific to this CPU; a foreign target gets the portable ORT_ENABLE_EXTENDED level
and finishes optimizing when it loads the file."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ConversionError, MissingTool
from ..latency_table import CALL, NET
from .base import (
    PROFILE_RUNS,
    Artifact,
    Capabilities,
    Lowered,
    ModelFiles,
    Run,
    Samples,
    Source,
    calibration_images,
    layer_stats,
    lower_nets,
    write_onnx,
)

if TYPE_CHECKING:
    from ..config import BuildConfig, CalibrateConfig
    from ..targets import Target

log = logging.getLogger(__name__)

# how session() runs its intra-op workers, recorded in a device identity (trp_edge.device.runner.session_modes):
# a latency table measured at 2+ threads with workers run another way is stale (latency_table.stale)
SPINNING = "spin within a run, stop after it"

OPS_NOTE = None
CAPABILITIES = Capabilities(int8=True, in_net=True, version_key="onnxruntime", session_mode=SPINNING,
                            ops_note=OPS_NOTE)


def check_available(target: Target, src: Source) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise MissingTool("onnxruntime is not installed: pip install 'trp-edge[onnx]'") from None


def session(model: str | bytes | Path, threads: int = 1, *, level_all: bool = True,
            optimized_path: Path | None = None, profile_prefix: str | None = None):
    """The one place an onnxruntime InferenceSession is made (`model`: a file, or the model as bytes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level_all
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        so.log_severity_level = 3  # the NCHWc warning is the point of level_all on the host
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, so,
                                providers=["CPUExecutionProvider"])


def load(path: str | bytes, threads: int = 1, device: str = "cpu") -> Run:
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def load_signature(path: str, signature: str, threads: int = 1) -> Run:
    raise ConfigError(f"{Path(path).name}: an ONNX model has no signatures (ORT calibrates one model per variant)")


def _kernel_events(path: str, x: np.ndarray, threads: int, runs: int) -> list[dict[str, Any]]:
    """`runs` calls of the model in a profiling session of its own; the profiler's kernel events, in order."""
    sess = session(path, threads, profile_prefix=os.path.join(tempfile.gettempdir(), f"trp-edge-ort-{os.getpid()}"))
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(runs):
        sess.run(None, feed)
    prof = sess.end_profiling()
    try:
        events = json.loads(Path(prof).read_text())
    finally:
        Path(prof).unlink(missing_ok=True)
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def profile_ops(path: str, x: np.ndarray, threads: int = 1, device: str = "cpu",
                runs: int = PROFILE_RUNS) -> list[dict[str, Any]]:
    """onnxruntime's own profiler (enable_profiling), in a separate session after the timing: per kernel of
    the optimized graph (fused node names), median over runs."""
    per: dict[str, dict[str, Any]] = {}
    for e in _kernel_events(path, x, threads, runs):
        a = e.get("args", {})
        shapes = [next(iter(t.values())) for t in a.get("input_type_shape", [])]
        outs = [next(iter(t.values())) for t in a.get("output_type_shape", [])]
        d = per.setdefault(e["name"][: -len("_kernel_time")],
                           {"op": a.get("op_name", "?"), "weight": shapes[1] if len(shapes) > 1 else None,
                            "output": outs[0] if outs else None, "us": []})
        d["us"].append(float(e["dur"]))
    return [{"name": n, "op": d["op"], "weight": d["weight"], "output": d["output"],
             "ms": float(np.median(d["us"])) / 1000.0} for n, d in per.items()]


LAYER_TAG = re.compile(r"__L(\d+)__")  # how tag_layers marks a node (and every tensor) with its layer
CONV_KERNELS = {"Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger"}


def tag_layers(path: Path, tags: list[int]) -> None:
    """Rename, in place, every node and tensor of an ONNX model after the layer it belongs to: the i-th Conv node
    (graph order) gets layer `tags[i]` (a pair's two convs share one), any other node the latest layer among its
    inputs'. onnxruntime names a fused or re-laid-out kernel after its node or output, so its profile can be
    summed per layer (layer_profile) whatever it fuses: a Conv with its activation, NCHWc, QDQ into QLinearConv.
    Refuses a model whose Conv count is not len(tags)."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    n_convs = sum(n.op_type == "Conv" for n in g.node)
    if n_convs != len(tags):
        raise ConversionError(f"{path.name}: {n_convs} Conv nodes, {len(tags)} expected")
    kept = {t.name for t in g.input} | {t.name for t in g.initializer} | {t.name for t in g.output}
    owner: dict[str, int] = {}
    renamed: dict[str, str] = {}
    convs = iter(tags)
    for i, node in enumerate(g.node):
        for j, t in enumerate(node.input):
            node.input[j] = renamed.get(t, t)
        owners = [owner[t] for t in node.input if t in owner]
        tag = next(convs) if node.op_type == "Conv" else max(owners) if owners else None
        if tag is None:
            continue
        node.name = f"__L{tag}__n{i}"
        for j, t in enumerate(node.output):
            if t and t not in kept:
                renamed[t] = node.output[j] = f"__L{tag}__t{i}_{j}"
            owner[node.output[j]] = tag
    onnx.save(model, str(path))


def layer_profile(path: str, x: np.ndarray, threads: int = 1, runs: int = 2 * PROFILE_RUNS) -> dict[str, Any]:
    """onnxruntime's profiler on a model tagged by tag_layers: per layer tag, the conv kernels' time summed per
    run ("median_ms": the mean of the middle half of the runs; p10, p90), and each run's whole time ("total_ms",
    every kernel, for scaling to the model's timed latency)."""
    per_node: dict[str, tuple[str, list[float]]] = {}
    for e in _kernel_events(path, x, threads, runs + 2):
        per_node.setdefault(e["name"], (e.get("args", {}).get("op_name"), []))[1].append(e["dur"] / 1000.0)
    total = np.zeros(runs)
    layers: dict[str, np.ndarray] = {}
    for name, (op, ms) in per_node.items():
        last = np.asarray(ms[-runs:])  # the warm-up runs left out
        total[-len(last):] += last
        tag = LAYER_TAG.search(name)
        if tag and op in CONV_KERNELS:
            acc = layers.setdefault(tag.group(1), np.zeros(runs))
            acc[-len(last):] += last
    return layer_stats(total, layers)


def optimize(src_onnx: Path, dst: Path, level_all: bool) -> None:
    try:
        session(src_onnx, level_all=level_all, optimized_path=dst)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{src_onnx}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from e


def weights_7bit(target: Target) -> bool:
    """Whether INT8 weights keep 7 bits on `target` (quantize_int8): on x86 CPUs."""
    return target.cpu.triple.startswith(("x86_64", "i686"))


def quantize_int8(src_onnx: Path, dst: Path, calib: np.ndarray, workdir: Path, reduce_range: bool = False) -> None:
    """Static INT8, QDQ format, per-channel weights (s8), u8 activations, calibrated with MinMax. `reduce_range`:
    7-bit weights, for x86 CPUs, where u8 x s8 products can saturate without VNNI (measured on the demo's
    ResNet-20: top-1 0.55 pt below fp32 without it, 0.18 pt with it)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(src_onnx), load_external_data=False).graph.input[0].name
    pre = workdir / f".{dst.stem}.pre.onnx"
    quant_pre_process(str(src_onnx), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib[i: i + 1] for i in range(len(calib)))

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.items, None)
            return None if x is None else {name: x}

    try:
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    finally:
        pre.unlink(missing_ok=True)
        for f in workdir.glob("augmented_model*.onnx"):
            f.unlink()


def build(src: Source, target: Target, folder: Path, cfg: BuildConfig, samples: Samples | None,
          measurer: Any = None) -> tuple[list[Artifact], dict[str, Any]]:
    """`measurer` (where TVM tuning times kernels) is not used: nothing here is tuned."""
    arts = []
    level = "all" if target.native else "extended"
    for v in src.variants:
        fp32 = f"{v.name}.onnx"
        optimize(v.onnx, folder / fp32, level_all=target.native)
        arts.append(Artifact(v.name, fp32, "ort", extra={"optimization": level}))
        if cfg.int8 and samples is not None:
            q = f"{v.name}.int8.onnx"
            log.info("ort: quantizing %s to INT8 (QDQ) on %d images from %s", v.name, len(samples.calib),
                     samples.origin)
            src_onnx = v.int8.get("ort", v).onnx.resolve()  # INT8 may come from a model with pairs merged back
            cwd, dst, work = os.getcwd(), (folder / q).resolve(), folder.resolve()
            try:  # the quantizer writes its scratch models into the working directory
                os.chdir(work)
                quantize_int8(src_onnx, dst, samples.calib, work,
                              reduce_range=weights_7bit(target))
            finally:
                os.chdir(cwd)
            arts.append(Artifact(v.name, q, "ort", precision="int8",
                                 extra={"fp32_file": fp32, "quantization": "static QDQ, s8 per-channel weights "
                                        "(7-bit range on x86), u8 activations, MinMax calibration",
                                        **v.int8_extra("ort")}))
    import onnxruntime

    return arts, {"runtime_version": {"onnxruntime": onnxruntime.__version__}}


def int8_artifact(model: ModelFiles, work: Path, name: str, shape: tuple[int, ...], calib: np.ndarray,
                  target: Target) -> Path:
    """The net as build quantizes it (static QDQ, from its ONNX file), in `work`: <name>.int8.onnx."""
    dst = work / f"{name}.int8.onnx"
    quantize_int8(model.onnx(), dst, calib, work, reduce_range=weights_7bit(target))
    return dst


# ---- calibration: each variant one small ONNX model, and the whole nets that time the layers in place ----


def lower_calibration(groups: dict[str, dict[str, Any]], cfg: CalibrateConfig,
                      tmp: Path) -> dict[str, tuple[list, Lowered]]:
    """Each variant one small ONNX model (INT8: quantized to QDQ as build does, on random activations: the
    latency of integer kernels does not depend on the values). {group: (artifacts, files)}, each file a function
    that writes it when its group's call comes (workflows.in_net.written)."""
    from functools import partial

    out = {}
    for gi, (key, g) in enumerate(groups.items()):
        if key == NET and "grid" in g:
            out[key] = _lower_nets(g, cfg, tmp)
            continue
        arts, files = [], {}
        for vi, (variant, module) in enumerate(g["variants"].items()):
            int8 = cfg.precision == "int8" and variant != CALL
            name = _onnx_name(f"{gi}-{vi}", int8)
            files[name] = partial(_lower_model, module, g["input_shape"], tmp / name, int8)
            arts.append({"variant": variant, "file": name})
        out[key] = (arts, files)
    return out


def _onnx_name(stem: str, int8: bool) -> str:
    return f"{stem}{'.int8' if int8 else ''}.onnx"


def _lower_model(module, shape, path: Path, int8: bool, tags: list[int] | None = None) -> Path:
    """`module` exported to `path` (named by _onnx_name); with `tags`, its nodes tagged by layer first
    (tag_layers); INT8: quantized to QDQ from the fp32 export, which goes."""
    fp32 = path.with_name(path.name.replace(".int8", "")) if int8 else path
    write_onnx(module, shape, fp32)
    if tags is not None:
        tag_layers(fp32, tags)
    if int8:
        quantize_int8(fp32, path, calibration_images(shape), path.parent)
        fp32.unlink()
    return path


def _lower_nets(g: dict[str, Any], cfg: CalibrateConfig, tmp: Path) -> tuple[list, Lowered]:
    """The whole nets of the NET group's grid as ONNX models whose nodes are tagged with their layer (tag_layers;
    INT8: quantized afterwards, as a layer's models are): base.lower_nets."""
    int8 = cfg.precision == "int8"

    def lower(stem: str, model, tags: list[int] | None) -> Path:
        return _lower_model(model, g["input_shape"], tmp / _onnx_name(stem, int8), int8, tags)

    return lower_nets(g, int8, lower, _onnx_name)
