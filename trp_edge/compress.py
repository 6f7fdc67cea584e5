"""`trp-edge compress`: load -> TRP training -> decompose_ -> ONNX export -> report.

Artifacts go to a staging folder inside --out and replace the old ones only when everything has
been written and validated, so a failed run loses nothing already there."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CompressConfig
from .errors import InputError
from .flops import count_macs, param_count
from .lowrank import LayerPlan, conv_layers, decompose_

log = logging.getLogger(__name__)

ARTIFACTS = ("compressed.pt", "dense.pt", "dense.onnx", "model.onnx", "report.json", "ranks.png")


@dataclass
class CompressResult:
    out: Path
    report: dict[str, Any]


def default_out(name: str) -> Path:
    return Path("trp-edge-out") / name


def _prepare_out(cfg: CompressConfig, name: str) -> Path:
    out = Path(cfg.out) if cfg.out else default_out(name)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (cfg.force or cfg.resume):
        raise InputError(f"--out {out}: already holds a result; pass --force to replace it or --resume to go on")
    if cfg.force and (out / "checkpoint.pt").exists():
        (out / "checkpoint.pt").unlink()
    return out


def compress(cfg: CompressConfig, *, progress: bool = True, on_step=None) -> CompressResult:
    from .data import load_data
    from .export import export_onnx, onnx_macs
    from .models import compressed_payload, default_input_size, load_model
    from .trp import TRPTrainer, evaluate, resolve_device

    data = load_data(cfg.data, workers=cfg.trp.workers, seed=cfg.trp.seed) if cfg.data else None
    in_ch = cfg.in_channels or (data.in_channels if data else None)
    n_cls = cfg.num_classes or (data.num_classes if data else None)
    torch.manual_seed(cfg.trp.seed)  # random init of built-in models is part of the run's identity
    loaded = load_model(cfg.model, arch=cfg.arch, weights=cfg.weights, trust_pickle=cfg.trust_pickle,
                        in_channels=in_ch, num_classes=n_cls)
    if loaded.lowrank is not None:
        raise InputError(f"{cfg.model}: already a trp-edge compressed model; compress its dense source instead")
    model, spec = loaded.model, loaded.spec
    if data is not None:
        if spec["in_channels"] != data.in_channels:
            raise InputError(f"{cfg.model}: takes {spec['in_channels']}-channel input but {data.name} has "
                             f"{data.in_channels} channels")
        if spec["num_classes"] != data.num_classes:
            raise InputError(f"{cfg.model}: has {spec['num_classes']} classes but {data.name} has {data.num_classes}")
        example = data.example
    else:
        size = cfg.input_size or default_input_size(spec)
        example = torch.zeros(1, spec["in_channels"], size, size)
    out = _prepare_out(cfg, loaded.name)
    out.mkdir(parents=True, exist_ok=True)

    dcfg, tcfg = cfg.decompose, cfg.trp
    dense_macs = count_macs(model, example)
    layers = conv_layers(model, example, dcfg)
    other_macs = dense_macs.total - sum(la.macs_dense for la in layers)
    device = resolve_device(tcfg.device)

    initial_acc = evaluate(model.to(device), data.test, device) if data is not None and tcfg.trains else None
    train = last_iterate_acc = final_ranks = None
    if tcfg.trains:
        trainer = TRPTrainer(model, data, tcfg, dcfg, checkpoint=out / "checkpoint.pt", other_macs=other_macs,
                             progress=progress, on_step=on_step)
        train = trainer.train(resume=cfg.resume)
        log.info("TRP: %d steps in %.1f s (%.1f ms/step, of which SVD %.1f ms)", train.steps, train.train_seconds,
                 train.step_ms, train.svd_ms_per_step)
        last_iterate_acc = evaluate(model, data.test, device)
        final_ranks = trainer.finalize_()
        if final_ranks is not None:  # decompose at exactly the ranks of TRP's last TSVD(W, e)
            dcfg = dataclasses.replace(dcfg, ranks={**final_ranks, **(dcfg.ranks or {})}, target_speedup=None,
                                       layer_schemes=dict(trainer.layer_scheme) if dcfg.scheme == "auto" else None)
    model = model.cpu().eval()
    dense_acc = evaluate(model, data.test, torch.device("cpu")) if data is not None else None
    dense_model = copy.deepcopy(model)

    plans, energy = decompose_(model, dcfg, example, other_macs=other_macs)
    if final_ranks is not None:  # the ranks came from TRP's last TSVD, at the energy it used
        energy = trainer.energy
    comp_macs = count_macs(model, example)
    comp_acc = evaluate(model, data.test, torch.device("cpu")) if data is not None else None

    stage = out / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        diff_dense = export_onnx(dense_model, example, stage / "dense.onnx")
        diff_model = export_onnx(model, example, stage / "model.onnx")
        onnx_count = {"dense": onnx_macs(stage / "dense.onnx"), "compressed": onnx_macs(stage / "model.onnx")}
        latency = None
        if cfg.latency is not None:  # what the MACs became in milliseconds, here, from day one
            from .profile import time_onnx_pair

            latency = time_onnx_pair(stage / "dense.onnx", stage / "model.onnx", tuple(example.shape), cfg.latency)
            latency["efficiency"] = latency["latency_speedup"] / (dense_macs.total / comp_macs.total)
        report = _report(cfg, loaded.name, spec, energy, plans, dense_macs, comp_macs, dense_model, model,
                         initial_acc, last_iterate_acc, dense_acc, comp_acc, train,
                         {"dense": diff_dense, "compressed": diff_model},
                         onnx_count, example, latency)
        ranks = {p.name: p.rank for p in plans if p.rank is not None}
        payload = compressed_payload(model, spec, dcfg.scheme, ranks, {p.name: p.scheme for p in plans},
                                     {"energy": energy, "input_shape": list(example.shape)})
        torch.save(payload, stage / "compressed.pt")
        torch.save(dense_model.state_dict(), stage / "dense.pt")  # the trained dense model, before decomposition
        from .report import plot_ranks, write_json

        write_json(stage / "report.json", report)
        plot_ranks(report, stage / "ranks.png")
        for name in ARTIFACTS:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote %s", ", ".join(str(out / n) for n in ARTIFACTS))
    return CompressResult(out, report)


def _report(cfg: CompressConfig, name, spec, energy, plans: list[LayerPlan], dense_macs, comp_macs, dense_model,
            model, initial_acc, last_iterate_acc, dense_acc, comp_acc, train, diffs, onnx_count,
            example, latency) -> dict[str, Any]:
    dcfg, tcfg = cfg.decompose, cfg.trp
    layers = []
    for p in plans:
        d = p.to_dict()
        # per-layer MACs as torch.utils.flop_counter counts them on the built modules
        d["macs_dense"] = dense_macs.per_module.get(p.name, p.macs_dense)
        d["macs_lowrank"] = comp_macs.per_module.get(p.name) if p.rank is not None else p.macs_lowrank
        layers.append(d)
    rel = {k: abs(onnx_count[k] - v) / max(v, 1) for k, v in (("dense", dense_macs.total),
                                                                ("compressed", comp_macs.total))}
    return {
        "model": name,
        "arch": spec,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "scheme": dcfg.scheme,
        "energy": energy,
        "nuclear": tcfg.nuclear,
        "period": tcfg.period,
        "target_speedup": dcfg.target_speedup,
        "input_shape": list(example.shape),
        "data": cfg.data,
        "dense": {"macs": dense_macs.total, "params": param_count(dense_model), "accuracy": dense_acc},
        "compressed": {"macs": comp_macs.total, "params": param_count(model), "accuracy": comp_acc},
        "initial_accuracy": initial_acc,
        "mac_speedup": dense_macs.total / comp_macs.total,
        "param_ratio": param_count(dense_model) / param_count(model),
        "layers": layers,
        "onnx": {"max_abs_diff": max(diffs.values()), "max_abs_diff_dense": diffs["dense"],
                 "max_abs_diff_compressed": diffs["compressed"], "macs_dense": onnx_count["dense"],
                 "macs_compressed": onnx_count["compressed"], "macs_rel_diff": max(rel.values())},
        "training": None if train is None else {
            "steps": train.steps, "epochs": train.epochs_done, "seconds": train.train_seconds,
            "step_ms": train.step_ms, "svd_ms_per_step": train.svd_ms_per_step, "device": str(tcfg.device),
            "train_accuracy_last_epoch": train.train_accuracy,
            # accuracy of the last SGD iterate, before TRP's final TSVD (dense.accuracy is after it)
            "last_iterate_accuracy": last_iterate_acc},
        # host latency in onnxruntime (batch 1): a first look; `trp-edge deploy` measures on the device
        "latency": latency,
        "trajectory": [] if train is None else train.history,
        "config": cfg.to_dict(),
    }
