#!/usr/bin/env python
"""Models beyond ResNets end to end, latency-calibrated: for each source, `trp-edge calibrate` (this machine,
ONNX Runtime, 1 thread), `compress` with TRP steps, `--target-speedup` and the table, `build --target host
--runtime all`, then `deploy --local --runtime ort,tflite`. Prints and saves MAC speedup, latency speedup and
efficiency per model and runtime (from deploy's reports: dense and compressed timed side by side).

Sources: torchvision state_dicts (random init: no weights can be downloaded here) given with no --arch, and a
user-defined CNN through the Python API, as a torch.export .pt2 and as a pickled module (--trust-pickle).

    tools/bench_zoo.py [--models mobilenet_v2,efficientnet_b0,vgg11_bn,regnet_x_400mf,api,pt2,pickle]
                       [--speedup 2.5] [--out bench-out/zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from usercnn import UserCNN  # noqa: E402 - next to this script; the CLI below gets it on PYTHONPATH too

TORCHVISION = ("mobilenet_v2", "efficientnet_b0", "vgg11_bn", "regnet_x_400mf")
USER = ("api", "pt2", "pickle")
CLI = [sys.executable, "-m", "trp_edge.cli"]


def sh(*args: str) -> str:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env)
    print(f"  $ trp-edge {' '.join(args)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if r.returncode:
        raise SystemExit(f"failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def source(name: str, d: Path) -> tuple[str, list[str]]:
    """The model argument and the data options for one source (files written into d)."""
    torch.manual_seed(0)
    if name in TORCHVISION:
        from trp_edge.models import build, builtin_spec

        path = d / f"{name}.pt"
        torch.save(build(builtin_spec(name, 3, 10)).state_dict(), path)  # inferred: no --arch below
        return str(path), ["--data", "synthetic"]
    net = UserCNN().eval()
    if name == "pt2":
        path = d / "usercnn.pt2"
        x = torch.randn(2, 1, 28, 28)
        torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
        return str(path), ["--data", "fashion-mnist"]
    path = d / "usercnn.pt"
    torch.save(net, path)
    return str(path), ["--data", "fashion-mnist", "--trust-pickle"]


def run_one(name: str, args, root: Path) -> dict:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = d / "out"
    steps = ["--steps", str(args.steps), "--batch", "16", "--lr", "0.01"]
    if name == "api":  # the Python API: the same options as keywords; the table from the .pt2 of the same net
        model, data = source("pt2", d)
        sh("calibrate", "--target", "host", "--local", "--model", model, "--schemes", "channel",
           "--data", "fashion-mnist", "--out", str(d / "calibration"), "-q")
        import trp_edge

        table = next((d / "calibration" / "host" / "ort").glob("*.csv"))
        trp_edge.compress(UserCNN(), data="fashion-mnist", scheme="channel", steps=args.steps, batch=16, lr=0.01,
                          target_speedup=args.speedup, latency_table=str(table), out=str(out), force=True)
    else:
        model, data = source(name, d)
        sh("calibrate", "--target", "host", "--local", "--model", model, "--schemes", "channel", *data,
           "--out", str(d / "calibration"), "-q")
        table = next((d / "calibration" / "host" / "ort").glob("*.csv"))
        sh("compress", model, *data, *steps, "--scheme", "channel", "--target-speedup", str(args.speedup),
           "--latency-table", str(table), "-o", str(out), "--force", "-q")
    sh("build", str(out), "--target", "host", "--runtime", "all")
    sh("deploy", "--target", "host", "--local", "--runtime", "ort,tflite", "--precision", "fp32", "-m", str(out),
       "--reports", str(d / "reports"))
    report = json.loads((out / "report.json").read_text())
    row = {"model": name, "source": Path(model).name, "mac_speedup": report["mac_speedup"],
           "input": report["input_shape"], "decomposed": sum(la["rank"] is not None for la in report["layers"]),
           "convs": len(report["layers"]), "accuracy": [report["dense"]["accuracy"], report["compressed"]["accuracy"]]}
    for rt in ("ort", "tflite"):
        from trp_edge.workflows.deploy_report import summary_row

        row[rt] = summary_row(json.loads(max((d / "reports" / "host").glob(f"*-{rt}-*.json")).read_text()))
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(TORCHVISION + USER))
    ap.add_argument("--speedup", type=float, default=3.5,
                    help="--target-speedup (bisected on the plans as the table rounds and guards them)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("bench-out/zoo"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        print(name, flush=True)
        rows.append(run_one(name, args, args.out))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread\n")
    print("| model | source | input | convs decomposed | MACs | ORT dense / compressed ms | ORT speedup (eff.) "
          "| TFLite dense / compressed ms | TFLite speedup (eff.) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, t = r["ort"], r["tflite"]
        print(f"| {r['model']} | {r['source']} | {r['input'][-1]} | {r['decomposed']}/{r['convs']} | "
              f"{r['mac_speedup']:.2f}x | {o['dense_ms']:.2f} / {o['compressed_ms']:.2f} | "
              f"{o['latency_speedup']:.2f}x ({o['efficiency']:.2f}) | {t['dense_ms']:.2f} / {t['compressed_ms']:.2f} | "
              f"{t['latency_speedup']:.2f}x ({t['efficiency']:.2f}) |")
    (args.out / "bench_zoo.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
