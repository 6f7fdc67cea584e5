"""`trp-edge build`: a compressed model and its dense source -> artifacts for one target, per runtime,
each validated numerically before it is called built.

Layout: OUT/<target>/reference.npz (the input and torch's output per model) and
OUT/<target>/<runtime>/{artifacts..., manifest.json}. A runtime's folder is built in a staging folder
and replaces the old one only when every artifact has been written and validated."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import importlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import tuning_device
from ..backends import capabilities, get, int8_runtimes
from ..backends.base import Artifact, Runtime, Samples, Source, Variant, sha256
from ..config import BuildConfig
from ..contracts import CompressReport, Manifest
from ..errors import ConfigError, InputError, ValidationError
from ..targets import RUNTIMES, Target, load_target, resolve_threads

log = logging.getLogger(__name__)



def resolve_source(model: str | os.PathLike) -> Source:
    """A `trp-edge compress` output folder (dense + compressed) or a single ONNX file."""
    from ..export import onnx_macs

    p = Path(model)
    if p.is_dir():
        if not (p / "report.json").is_file():
            raise InputError(f"{p}: not a trp-edge compress output (no report.json); pass it or an .onnx file")
        report = CompressReport.read(p / "report.json")
        variants = []
        from ..models import model_file

        for name, onnx_file in (("dense", "dense.onnx"), ("compressed", "model.onnx")):
            if not (p / onnx_file).is_file():
                raise InputError(f"{p}: {onnx_file} is missing; run trp-edge compress again")
            variants.append(Variant(name, p / onnx_file, model_file(p, name), getattr(report, name)["macs"]))
        for rt in int8_runtimes():
            int8 = report.at_precision("int8", rt)
            if int8.get("onnx"):  # a model of its own for INT8, pairs slower there merged back
                stem = Path(int8["model"]).stem
                if not (p / int8["onnx"]).is_file() or model_file(p, stem) is None:
                    raise InputError(f"{p}: {int8['onnx']} or {int8['model']} (the {rt} INT8 builds' model) is "
                                     "missing; run trp-edge compress again")
                variants[1].int8[rt] = Variant("compressed", p / int8["onnx"], model_file(p, stem), int8["macs"])
        return Source(report.model, p, variants, tuple(report.input_shape), report.data, report)
    if p.suffix == ".onnx" and p.is_file():
        onnx = importlib.import_module("onnx")
        try:
            m = onnx.load(str(p))
            dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{p}: not a loadable ONNX model ({str(e).splitlines()[0][:160]})") from e
        if not dims or any(d <= 0 for d in dims):
            raise InputError(f"{p}: the input shape must be static, got {dims} (export with fixed sizes)")
        return Source(p.stem, p.parent, [Variant(p.stem, p, None, onnx_macs(p))], tuple(dims))
    raise InputError(f"{model}: not a trp-edge compress output folder or an .onnx file")


def source_digests(src: Source, runtime: str) -> dict[str, str]:
    """sha256 of the ONNX files a runtime's build reads: each variant's, and "<variant>/int8" for the model its
    INT8 artifacts come from when that is another one (pairs slower there merged back)."""
    out = {v.name: sha256(v.onnx) for v in src.variants}
    out.update({f"{v.name}/int8": sha256(v.int8[runtime].onnx) for v in src.variants if runtime in v.int8})
    return out


def default_out(src: Source) -> Path:
    return src.path / "build" if src.report is not None else src.path / f"{src.name}-build"


# ---------------------------------------------------------------------------------------------- data


def reference(src: Source, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each model's output on a fixed input: from torch when the model is a torch file (the truth every
    runtime must match), else from onnxruntime on the source ONNX."""
    out = {"input": x}
    for v in src.variants:
        if v.torch is not None:
            import torch

            from ..models import load_model

            m = load_model(str(v.torch)).model.eval()
            with torch.no_grad():
                out[v.name] = m(torch.from_numpy(x)).numpy()
        else:
            out[v.name] = get("ort").load(str(v.onnx))(x)
    return out


def reference_source(src: Source) -> str:
    return "torch" if all(v.torch is not None for v in src.variants) else "onnxruntime (source ONNX)"


def samples(src: Source, cfg: BuildConfig) -> Samples:
    spec = cfg.calib or src.data
    if spec:
        import torch

        from ..data import load_data

        data = load_data(spec, size=src.input_shape[-1])  # synthetic / imagefolder: at the model's size
        if tuple(data.example.shape[1:]) != tuple(src.input_shape[1:]):
            raise InputError(f"calibration data {spec}: images {tuple(data.example.shape[1:])} do not fit the "
                             f"model's input {tuple(src.input_shape[1:])}")
        calib, _ = next(iter(data.train.batches(cfg.calib_images, epoch=0, seed=0, shuffle=True)))
        xs, ys = [], []
        for x, y in data.test.batches(256, epoch=0, seed=0, shuffle=False):
            xs.append(x)
            ys.append(y)
            if sum(len(b) for b in xs) >= cfg.eval_images:
                break
        ex, ey = torch.cat(xs)[: cfg.eval_images], torch.cat(ys)[: cfg.eval_images]
        return Samples(calib.numpy(), ex.numpy(), ey.numpy(), spec)
    rng = np.random.default_rng(1)
    shape = src.input_shape[1:]
    return Samples(rng.standard_normal((cfg.calib_images, *shape)).astype(np.float32),
                   rng.standard_normal((min(cfg.eval_images, 64), *shape)).astype(np.float32), None,
                   "synthetic (no data set known: pass --calib DATA for calibration on real images)")


def accuracy_vs_fp32(fp32_file: Path, q_file: Path, runtime: str, s: Samples) -> dict[str, Any]:
    """Top-1 of the fp32 and quantized artifacts on the evaluation images (run here: both formats are
    portable), and how often they agree."""
    from ..device.runner import load

    f, q = load(str(fp32_file), runtime), load(str(q_file), runtime)
    pf, pq = [], []
    for x in s.eval_x:
        pf.append(int(f(x[None]).argmax()))
        pq.append(int(q(x[None]).argmax()))
    a, b = np.array(pf), np.array(pq)
    out: dict[str, Any] = {"images": len(a), "data": s.origin, "agreement": float((a == b).mean())}
    if s.eval_y is not None:
        out["fp32_top1"] = float((a == s.eval_y).mean() * 100)
        out["quantized_top1"] = float((b == s.eval_y).mean() * 100)
        out["drop_pt"] = out["fp32_top1"] - out["quantized_top1"]
    return out


# ---------------------------------------------------------------------------------------- validation


def validate(folder: Path, artifacts: list[Artifact], target: Target, ref_file: Path, *, emulate: bool = True,
             atol: float = 1e-4, rtol: float = 1e-5, quant_rel_l2: float = 0.25) -> None:
    """Run every artifact on the reference input where this machine can (natively, or under qemu for a
    foreign CPU) and fill in `a.validation`. Raises ValidationError when one runs and does not match."""
    runnable, skipped = [], []
    for a in artifacts:
        why = compile_only_reason(a, target, emulate)
        (skipped if why else runnable).append((a, why))
    for a, why in skipped:
        a.validation = {"status": "compile-only", "reason": why}
    if not runnable:
        return
    on_host = [target.native or bool(capabilities(a.runtime).host_validates) for a, _ in runnable]
    here = [a for (a, _), h in zip(runnable, on_host) if h]
    away = [a for (a, _), h in zip(runnable, on_host) if not h]
    results: list[tuple[Artifact, dict[str, Any], str]] = []
    if here:
        from ..device.runner import check

        hosted = "native" if target.native else f"this host ({capabilities(here[0].runtime).host_validates})"
        results += [(a, r, hosted) for a, r in zip(here, check(_check_job(here, folder, ref_file), folder))]
    if away:
        from ..emulate import run_check

        emulated = f"emulated ({target.cpu.arch} under qemu-user)"
        results += [(a, r, emulated) for a, r in zip(away, run_check(_check_job(away, folder, ref_file), folder,
                                                                     target))]
    failures = []
    for a, r, where in results:
        v: dict[str, Any] = {"where": where}
        if "error" in r:
            v.update(status="failed", error=r["error"])
            failures.append(f"{a.file}: {r['error']}")
        elif a.precision == "fp32":
            bound = atol + rtol * r["max_abs_ref"]
            ok = r["max_abs_diff"] <= bound
            v.update(status="passed" if ok else "failed", max_abs_diff=r["max_abs_diff"], tolerance=bound)
            if not ok:
                failures.append(f"{a.file}: max abs diff {r['max_abs_diff']:.3g} > {bound:.3g}")
        else:
            ok = r["rel_l2"] <= quant_rel_l2
            v.update(status="passed" if ok else "failed", max_abs_diff=r["max_abs_diff"], rel_l2=r["rel_l2"],
                     tolerance_rel_l2=quant_rel_l2)
            if not ok:
                failures.append(f"{a.file}: relative L2 error {r['rel_l2']:.3g} > {quant_rel_l2}")
        a.validation = v
    if failures:
        raise ValidationError(f"{folder.name}: {len(failures)} artifact(s) fail validation: " + "; ".join(failures))


def _check_job(artifacts: list[Artifact], folder: Path, ref_file: Path) -> dict[str, Any]:
    return {"reference": os.path.relpath(ref_file, folder), "threads": 1,
            "artifacts": [{"file": a.file, "runtime": a.runtime, "variant": a.variant, "device": a.device}
                          for a in artifacts]}


def compile_only_reason(a: Artifact, target: Target, emulate: bool) -> str | None:
    if a.extra.get("linked") is False:
        return "object files, not linked here: " + a.extra.get("link_note", "link them on the device")
    if a.device != "cpu":
        from ..backends.tvm import tvm_device

        try:
            if tvm_device(a.device).exist and target.native:
                return None
        except Exception:  # noqa: BLE001 - a runtime built without that API
            pass
        return f"no {a.device} device runs {target.name} code on this machine"
    if target.native or capabilities(a.runtime).host_validates:
        return None
    if not emulate:
        return "foreign CPU and emulation turned off"
    from ..emulate import can_emulate

    return can_emulate(target)


# ------------------------------------------------------------------------------------------- build


def parse_runtimes(value: str | tuple[str, ...], target: Target) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return target.runtimes
    for r in items:
        if r not in RUNTIMES:
            raise ConfigError(f"unknown runtime {r!r}: use {', '.join(RUNTIMES)} or all")
        if r not in target.runtimes:
            raise ConfigError(f"target {target.name} does not support runtime {r} "
                              f"(it has {', '.join(target.runtimes)})")
    return tuple(dict.fromkeys(items))


@dataclass
class BuildResult:
    out: Path
    manifests: dict[str, Manifest]


def build(cfg: BuildConfig | str | None = None, /, **options: Any) -> BuildResult:
    """`trp-edge build`: every runtime's artifacts of a compress output (or one ONNX file) for a target, each
    validated against torch; `cfg` a BuildConfig, or its options as keywords. Returns where they are."""
    cfg = BuildConfig.of(cfg, **options)
    target = load_target(cfg.target)
    # the threads the model will run at, resolved once: TVM tuning measures at them, the manifest records them
    cfg = dataclasses.replace(cfg, threads=resolve_threads(cfg.threads, target))
    measurer = functools.partial(tuning_device.measurer, target, cfg, cfg.threads)
    runtimes = parse_runtimes(cfg.runtimes, target)
    src = resolve_source(cfg.model)
    out = Path(cfg.out) if cfg.out else default_out(src)
    tdir = out / target.name
    tdir.mkdir(parents=True, exist_ok=True)
    backends = {rt: get(rt) for rt in runtimes}
    for mod in backends.values():
        mod.check_available(target, src)  # fail before any work for a missing tool
    # validation input: a real test image when the data is known (quantized models are calibrated for it)
    smp = samples(src, cfg)
    x = smp.eval_x[:1] if smp.eval_y is not None else \
        np.random.default_rng(0).standard_normal(src.input_shape).astype(np.float32)
    ref_file = tdir / "reference.npz"
    _atomic_npz(ref_file, reference(src, x))
    manifests = {}
    for rt, mod in backends.items():
        manifests[rt] = _build_runtime(rt, mod, src, target, tdir, cfg, smp, measurer)
    return BuildResult(tdir, manifests)


def _build_runtime(rt: str, mod: Runtime, src: Source, target: Target, tdir: Path, cfg: BuildConfig,
                   smp: Samples, measurer: Callable[[], Any]) -> Manifest:
    """One runtime's folder: built in a staging folder, validated against the reference, its manifest
    written, and put in place of the old one. Returns the manifest."""
    ref_file = tdir / "reference.npz"
    t0 = time.perf_counter()
    final = tdir / rt
    stage = tdir / f".{rt}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        log.info("%s: building %s for %s", src.name, rt, target.name)
        arts, info = mod.build(src, target, stage, cfg, smp, measurer=measurer)
        validate(stage, arts, target, ref_file, emulate=cfg.emulate)
        for a in arts:
            if a.precision != "fp32" and smp is not None and a.extra.get("fp32_file"):
                a.accuracy = accuracy_vs_fp32(stage / a.extra.pop("fp32_file"), stage / a.file, rt, smp)
        manifest = Manifest(
            model=src.name, source=str(src.path), target=target.name, target_spec=target.to_dict(), runtime=rt,
            created=dt.datetime.now().isoformat(timespec="seconds"), config=cfg.to_dict(),
            input={"shape": list(src.input_shape), "dtype": "float32"},
            reference={"file": "../reference.npz", "from": reference_source(src)},
            macs={v.name: v.macs for v in src.variants}, mac_speedup=src.mac_speedup,
            source_sha256=source_digests(src, rt), artifacts=[a.to_dict(stage) for a in arts],
            build_seconds=round(time.perf_counter() - t0, 2), extra=info)
        manifest.write(stage / "manifest.json")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _replace_dir(stage, final)
    status = ", ".join(f"{a['file']} {a['validation'].get('status')}" for a in manifest["artifacts"])
    log.info("%s/%s: %s (%.1f s)", target.name, rt, status, manifest["build_seconds"])
    return manifest


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _replace_dir(new: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def load_manifest(folder: Path) -> Manifest:
    """The build folder's manifest.json, read through its contract (another format or a newer version: one
    error line)."""
    return Manifest.read(folder)


def revalidate(folder: Path, *, emulate: bool = True) -> dict[str, Any]:
    """Check an existing build folder again: files against their sha256 and each artifact's output against
    the reference. Raises ValidationError on a mismatch."""
    folder = Path(folder)
    m = load_manifest(folder)
    target = load_target(m["target"]) if m["target"] != "host" else load_target("host")
    arts = []
    for a in m["artifacts"]:
        f = folder / a["file"]
        if not f.is_file():
            raise ValidationError(f"{f}: missing")
        if sha256(f) != a["sha256"]:
            log.warning("%s: sha256 differs from the manifest (the file was changed after the build)", f.name)
        arts.append(Artifact(a["variant"], a["file"], m["runtime"], a["precision"], a["device"],
                             {k: a[k] for k in ("linked", "link_note") if k in a}))
    validate(folder, arts, target, folder / m["reference"]["file"], emulate=emulate)
    return {a.file: a.validation for a in arts}
