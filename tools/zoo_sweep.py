#!/usr/bin/env python
"""The zoo sweep: every classification builder in torchvision's registry, random init, through trp-edge's
decomposition and ONNX export.

For each model, at the smallest input of 32, 64, 128, 224 it runs at:
- every eligible conv and Linear at full rank (channel scheme): output equals dense within 1e-4 relative;
- decomposed to about 2x fewer MACs (channel scheme, energy by bisection; with --linear where the convs
  alone hold less than half the MACs: ConvNeXt's pointwise layers and transformers' MLPs are Linears);
- the decomposed model exported to ONNX and checked in onnxruntime against torch.

    tools/zoo_sweep.py [--models a,b] [--max-params 30] [--json out.json] [--readme docs/zoo.md]

prints one row per model and with --readme writes them into the table between the zoo markers of docs/zoo.md (rows of
models not run this time are kept). Models
above --max-params million parameters are listed as not run (the test suite's budget); pass 0 for all."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from trp_edge.config import DecomposeConfig
from trp_edge.errors import TrpEdgeError
from trp_edge.export import export_onnx
from trp_edge.flops import count_macs, param_count
from trp_edge.lowrank import conv_layers, make_pair
from trp_edge.models import build, builtin_spec, torchvision_builders
from trp_edge.models.zoo import build as build_builder
from trp_edge.models.zoo import builder_spec, signature_of
from trp_edge.planning import decompose_

SIZES = (32, 64, 128, 224)
CLASSES = 10
BEGIN, END = "<!-- zoo-sweep:begin -->", "<!-- zoo-sweep:end -->"


def _runs_at(model: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        return True
    except Exception:  # noqa: BLE001 - a model refuses a size in many ways
        return False


def millions_of_params(name: str) -> float:
    sig = signature_of(build_builder, builder_spec(name, 3, CLASSES))
    return sum(torch.Size(s).numel() for k, s in sig.items() if not k.endswith("num_batches_tracked")) / 1e6


def _full_rank_error(model: nn.Module, layers, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max relative error of the output with every eligible layer replaced by its full-rank pair."""
    full = copy.deepcopy(model)
    for la in layers:
        if la.reason is None:
            full.set_submodule(la.name, make_pair(la.module, "channel", min(la.matrix("channel").shape)))
    with torch.no_grad():
        return float((full(x) - ref).abs().max() / ref.abs().max())


def smallest_per_family() -> list[str]:
    """The builder with the fewest parameters from each module of torchvision.models (its families)."""
    from torchvision.models import get_model_builder

    best: dict[str, tuple[float, str]] = {}
    for name in torchvision_builders():
        fam, size = get_model_builder(name).__module__, millions_of_params(name)
        if fam not in best or size < best[fam][0]:
            best[fam] = (size, name)
    return sorted(name for _, name in best.values())


def check(name: str, tmp: Path) -> dict:
    """One model through the sweep; a failure is recorded with its reason, not raised."""
    row: dict = {"model": name}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build(builtin_spec(name, 3, CLASSES)).eval()
        with torch.no_grad():  # zero-initialised heads (ViT) give a zero output: nothing to compare
            for m in model.modules():
                if isinstance(m, nn.Linear | nn.Conv2d) and not m.weight.any():
                    m.weight.normal_(0, m.weight.shape[1] ** -0.5)
        row["params_m"] = param_count(model) / 1e6
        size = next((s for s in SIZES if _runs_at(model, s)), None)
        if size is None:
            raise TrpEdgeError(f"runs at none of {SIZES}")
        row["input"] = size
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            ref = model(x)
        dense = count_macs(model, x).total
        row.update(linear=False, full_rank_rel_err=0.0)
        for linear in (False, True):  # convs alone first; --linear where they hold less than half the MACs
            layers = conv_layers(model, x, DecomposeConfig(scheme="channel", linear=linear))
            if not linear:
                convs = layers
                row.update(convs=len(convs), eligible=sum(la.reason is None for la in convs),
                           dense_reasons=sorted({la.reason.split(" (")[0] for la in convs if la.reason}))
            else:
                row["linears"] = len(layers) - len(convs)
            new = [la for la in layers if linear == isinstance(la.module, nn.Linear)]
            row["full_rank_rel_err"] = max(row["full_rank_rel_err"], _full_rank_error(model, new, x, ref))
            cfg = DecomposeConfig(scheme="channel", target_speedup=2.0, linear=linear)
            other = dense - sum(la.macs_dense for la in layers)
            try:
                decompose_(model, cfg, x, other_macs=other)
                row["linear"] = linear
                break
            except TrpEdgeError as e:  # 2x out of reach
                row["note"] = str(e).split(":")[0] + (" (with --linear too)" if linear else "")
        else:
            decompose_(model, DecomposeConfig(scheme="channel", energy=0.999, linear=True), x, other_macs=other)
        if row["linear"]:
            row["note"] = "2x with --linear"
        row["mac_speedup"] = dense / count_macs(model, x).total
        row["onnx_max_abs_diff"] = export_onnx(model, x, tmp / f"{name}.onnx")
        with torch.no_grad():
            row["onnx_rel_diff"] = row["onnx_max_abs_diff"] / float(model(x).abs().max())
        (tmp / f"{name}.onnx").unlink()
        ok = row["full_rank_rel_err"] <= 1e-4 and row["mac_speedup"] >= 1.95
        row["result"] = "pass" if ok else "partial"
    except Exception as e:  # noqa: BLE001 - a sweep records a failure as data
        row["result"] = "fail"
        row["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        traceback.print_exc(file=sys.stderr)
    row["seconds"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | params (M) | input | convs: eligible / all | Linears | full-rank rel. err | MACs at ~2x | "
             "result |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        why = r.get("reason") or r.get("note") or ""
        if r.get("dense_reasons"):
            why = (why + "; " if why else "") + "dense: " + ", ".join(r["dense_reasons"])
        err = f"{r['full_rank_rel_err']:.1e}" if "full_rank_rel_err" in r else ""
        mac = f"{r['mac_speedup']:.2f}x" if "mac_speedup" in r else ""
        convs = f"{r['eligible']} / {r['convs']}" if "convs" in r else ""
        params = f"{r['params_m']:.1f}" if "params_m" in r else ""
        lines.append(f"| {r['model']} | {params} | {r.get('input', '')} | {convs} | {r.get('linears', '')} | {err} | "
                     f"{mac} | {r['result']}{' (' + why + ')' if why else ''} |")
    return "\n".join(lines)


def write_readme(readme: Path, rows: list[dict], header: str) -> None:
    """The table between the markers: these rows, and the table's rows for every model not run this time (a
    sweep in parts); the header's counts cover the merged table."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers to put the table between")
    head, rest = text.split(BEGIN, 1)
    old, tail = rest.split(END, 1)
    lines = {line.split("|")[1].strip(): line for line in old.splitlines() if line.startswith("| ")}
    lines.pop("model", None)
    lines.update({r["model"]: line for r, line in zip(rows, table(rows).splitlines()[2:], strict=True)})
    merged = table([])
    results = [line.rstrip(" |").rsplit("| ", 1)[-1] for line in lines.values()]
    counts = {k: sum(r.startswith(k) for r in results) for k in ("pass", "partial", "fail", "not run")}
    header += ": " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + "."
    body = "\n".join([merged, *(lines[k] for k in sorted(lines))])
    readme.write_text(f"{head}{BEGIN}\n{header}\n\n{body}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated builder names, or 'families' for the smallest of each "
                    "(default: the whole registry)")
    ap.add_argument("--max-params", type=float, default=0, help="skip models above this many million parameters")
    ap.add_argument("--json", type=Path, help="save the rows here")
    ap.add_argument("--readme", type=Path, help="rewrite the table between this file's zoo-sweep markers")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = (smallest_per_family() if args.models == "families" else args.models.split(",") if args.models
             else list(torchvision_builders()))
    tmp = Path(tempfile.mkdtemp(prefix="zoo-sweep-"))
    rows = []
    t0 = time.perf_counter()
    for name in names:
        if args.max_params and millions_of_params(name) > args.max_params:
            row = {"model": name, "params_m": millions_of_params(name), "result": "not run",
                   "reason": f"over {args.max_params:g}M parameters"}
        else:
            row = check(name, tmp)
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    counts = {k: sum(r["result"] == k for r in rows) for k in ("pass", "partial", "fail", "not run")}
    print(f"{len(rows)} models in {total:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "seconds": total, "rows": rows}, indent=1))
    if args.readme:
        import torchvision

        write_readme(args.readme, rows, f"`tools/zoo_sweep.py --readme docs/zoo.md` on {time.strftime('%Y-%m-%d')}, "
                                        f"torch {torch.__version__}, torchvision {torchvision.__version__}")


if __name__ == "__main__":
    main()
