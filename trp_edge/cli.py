"""The trp-edge command line: parse options into a config, call one library function, print."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import TrpEdgeError


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO if verbose == 0 else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    ours = logging.getLogger("trp_edge")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("trp-edge: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False


def _parse_ranks(value: str | None) -> dict[str, int] | None:
    """--ranks 'layer1.0.conv1=8,layer1.0.conv2=6' or a JSON file {name: rank}."""
    if not value:
        return None
    if Path(value).is_file():
        try:
            d = json.loads(Path(value).read_text())
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{value}: not JSON ({e})") from None
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trp-edge")
def main() -> None:
    """Trained Rank Pruning for CNNs, lowered to edge devices, with latency measured on the device."""


@main.command()
@click.argument("model")
@click.option("--scheme", type=click.Choice(["channel", "spatial", "auto"]), default="channel", show_default=True,
              help="channel: kh x kw conv then 1x1 (Zhang et al.); spatial: kh x 1 then 1 x kw (Jaderberg et al.); "
                   "auto: per layer the faster of the two and dense (by --latency-table, else by MACs)")
@click.option("--energy", "-e", type=float, default=0.02, show_default=True,
              help="TSVD energy e: keep the smallest rank whose dropped singular values hold <= e of the energy")
@click.option("--nuclear", type=float, default=0.0, show_default=True, help="nuclear-norm weight lambda (paper: 3e-4)")
@click.option("--period", "-m", type=int, default=20, show_default=True,
              help="TSVD projection every m steps (0: plain SGD)")
@click.option("--epochs", type=int, default=None, help="training epochs")
@click.option("--steps", type=int, default=None, help="training steps (overrides --epochs; 0: decompose directly)")
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--batch", type=int, default=128, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]")
@click.option("--svd-device", type=click.Choice(["auto", "cpu", "same"]), default="auto", show_default=True,
              help="where the TRP SVDs run (auto: on the training device)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="data loader workers (imagefolder)")
@click.option("--data", default=None, help="fashion-mnist[:DIR], cifar10:DIR, imagefolder:DIR or synthetic[:CxHxW]")
@click.option("--arch", default=None, help="architecture of a .pt state_dict (inferred from its keys when omitted)")
@click.option("--weights", default=None, type=click.Path(dir_okay=False), help="weights for a built-in model name")
@click.option("--trust-pickle", is_flag=True, help="allow a .pt holding a pickled nn.Module (runs code from the file)")
@click.option("--in-channels", type=int, default=None, help="input channels of a built-in model (default: the data's)")
@click.option("--num-classes", type=int, default=None, help="classes of a built-in model (default: the data's)")
@click.option("--input-size", type=int, default=None, help="input size without --data (default 32 CIFAR, 224 ImageNet)")
@click.option("--skip-stem", is_flag=True, help="leave the first conv dense")
@click.option("--ranks", default=None, help="explicit per-layer ranks: NAME=K,... or a JSON file")
@click.option("--target-speedup", type=float, default=None,
              help="choose e by bisection so the decomposed model has X times fewer MACs")
@click.option("--out", "-o", default=None, help="output directory (default trp-edge-out/<model-name>)")
@click.option("--force", is_flag=True, help="replace an existing --out")
@click.option("--resume", is_flag=True, help="go on from --out/checkpoint.pt")
@click.option("--latency-table", default=None, help="a trp-edge calibrate table (calibration/<target>/<runtime>/"
              "<model>.csv): round ranks up to the fastest measured ones, keep layers dense where the pair is slower")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="time dense.onnx vs model.onnx in onnxruntime on this machine for the report")
@click.option("--threads", type=int, default=1, show_default=True, help="threads for the latency check")
@click.option("--quiet", "-q", count=True, help="less output (no progress bars)")
@click.option("--verbose", "-v", count=True)
def compress(model, scheme, energy, nuclear, period, epochs, steps, lr, batch, momentum, weight_decay, schedule,
             device, svd_device, seed, workers, data, arch, weights, trust_pickle, in_channels, num_classes,
             input_size, skip_stem, ranks, target_speedup, out, force, resume, latency_table, latency, threads, quiet,
             verbose):
    """TRP-train MODEL, decompose it into low-rank convs, export ONNX and report what was gained.

    MODEL is a built-in name (resnet18/34/50, resnet20/32/56) or a .pt file (state_dict, checkpoint
    dict, or with --trust-pickle a pickled nn.Module)."""
    _setup_logging(verbose - quiet)
    from .compress import compress as run
    from .config import CompressConfig, DecomposeConfig, ProfileConfig, TRPConfig

    try:
        cfg = CompressConfig(
            model=model, arch=arch, weights=weights, trust_pickle=trust_pickle, in_channels=in_channels,
            num_classes=num_classes, input_size=input_size, data=data, out=out, force=force, resume=resume,
            latency=ProfileConfig(threads=threads) if latency else None,
            decompose=DecomposeConfig(scheme=scheme, energy=energy, ranks=_parse_ranks(ranks), skip_stem=skip_stem,
                                      target_speedup=target_speedup, latency_table=latency_table),
            trp=TRPConfig(period=period, nuclear=nuclear, epochs=epochs, steps=steps, lr=lr, batch=batch,
                          momentum=momentum, weight_decay=weight_decay, schedule=schedule, device=device,
                          seed=seed, workers=workers, svd_device=svd_device))
        result = run(cfg, progress=quiet == 0 and sys.stderr.isatty())
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    r = result.report

    def acc(v):
        return "n/a" if v is None else f"{v:.2f}%"

    left = sum(1 for la in r["layers"] if la["rank"] is None)
    scheme = r["scheme"]
    if scheme == "auto":
        chosen = [la["scheme"] if la["rank"] is not None else "dense" for la in r["layers"]]
        scheme += " (" + ", ".join(f"{n} {chosen.count(n)}" for n in ("channel", "spatial", "dense")
                                   if n in chosen) + ")"
    click.echo(f"{r['model']}: {scheme} scheme, e={r['energy']:.4g}: {r['mac_speedup']:.2f}x fewer MACs "
               f"({r['dense']['macs'] / 1e6:.1f}M -> {r['compressed']['macs'] / 1e6:.1f}M), "
               f"{len(r['layers']) - left}/{len(r['layers'])} convs decomposed")
    click.echo(f"accuracy: dense {acc(r['dense']['accuracy'])}, decomposed {acc(r['compressed']['accuracy'])}; "
               f"ONNX max abs diff {r['onnx']['max_abs_diff']:.2g}")
    if r["latency"]:
        lat = r["latency"]
        click.echo(f"latency here (onnxruntime, {lat['threads']} thread{'s' if lat['threads'] > 1 else ''}, batch 1): "
                   f"dense {lat['dense']['median_ms']:.2f} ms, compressed {lat['compressed']['median_ms']:.2f} ms: "
                   f"{lat['latency_speedup']:.2f}x for {r['mac_speedup']:.2f}x fewer MACs "
                   f"(efficiency {lat['efficiency']:.2f})")
    from .compress import ARTIFACTS

    click.echo(f"artifacts in {result.out}/ ({', '.join(ARTIFACTS)})")


@main.command()
@click.argument("model")
@click.option("--target", "-t", default="host", show_default=True,
              help="a name from `trp-edge targets` or a .toml file")
@click.option("--runtime", "-r", "runtimes", default="all", show_default=True,
              help="tvm, ort, tflite (comma-separated) or all (the target's runtimes)")
@click.option("--tune-trials", type=int, default=0, show_default=True,
              help="MetaSchedule trials for TVM (0: untuned); the tuning database is kept and reused")
@click.option("--tuning-db", default=None, help="TVM tuning database folder to use and extend, e.g. shared "
              "between models [default: OUT/<target>/tuning]")
@click.option("--out", "-o", default=None, help="output folder [default: MODEL/build]")
@click.option("--int8/--no-int8", default=True, show_default=True, help="also build INT8 artifacts (ORT, TFLite)")
@click.option("--calib", default=None,
              help="data for INT8 calibration and accuracy (as --data of compress) [default: the model's own data]")
@click.option("--calib-images", type=int, default=64, show_default=True)
@click.option("--eval-images", type=int, default=500, show_default=True)
@click.option("--gpu/--no-gpu", default=True, show_default=True, help="also build for the target's GPU (TVM)")
@click.option("--emulate/--no-emulate", default=True, show_default=True,
              help="validate foreign-CPU artifacts under qemu-user (correctness only)")
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
def build(model, target, runtimes, tune_trials, tuning_db, out, int8, calib, calib_images, eval_images, gpu, emulate,
          quiet, verbose) -> None:
    """Build MODEL (a `trp-edge compress` output folder, or an .onnx file) for a device target: the compressed
    and the dense model, per runtime, each artifact validated against torch. Writes OUT/<target>/<runtime>/
    with a manifest.json."""
    _setup_logging(verbose - quiet)
    from .build import build as run
    from .config import BuildConfig

    try:
        cfg = BuildConfig(model=model, target=target, runtimes=runtimes, out=out, tune_trials=tune_trials,
                          tuning_db=tuning_db, int8=int8,
                          calib=calib, calib_images=calib_images, eval_images=eval_images, gpu=gpu, emulate=emulate)
        result = run(cfg)
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    for rt, m in result.manifests.items():
        click.echo(f"{m['target']}/{rt}: {result.out / rt}/ ({m['build_seconds']:.1f} s)")
        for a in m["artifacts"]:
            v = a["validation"]
            what = v["status"]
            if "max_abs_diff" in v:
                what += f" ({v['where']}, max abs diff {v['max_abs_diff']:.2g})"
            elif v.get("reason"):
                what += f" ({v['reason']})"
            acc = a.get("accuracy")
            if acc and "quantized_top1" in acc:
                what += f"; top-1 {acc['fp32_top1']:.2f}% fp32 -> {acc['quantized_top1']:.2f}% {a['precision']}"
            elif acc:
                what += f"; agrees with fp32 on {acc['agreement'] * 100:.1f}% of {acc['images']} inputs"
            click.echo(f"  {a['file']:<28} {a['precision']:<5} {a['device']:<7} {what}")


def _protocol_options(f):
    f = click.option("--min-runs", type=int, default=20, show_default=True, help="timed runs per model, at least")(f)
    f = click.option("--min-seconds", type=float, default=1.0, show_default=True,
                     help="timed seconds per model, at least")(f)
    f = click.option("--threads", type=int, default=None, help="runtime threads [default: the target's]")(f)
    return f


def _echo_report(path: Path) -> None:
    r = json.loads(path.read_text())
    em = " [EMULATED: not device latency]" if r["emulated"] else ""
    slower = sum(1 for la in r["layers"] if la.get("slower"))
    click.echo(f"{r['target']}/{r['runtime']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''}): dense "
               f"{r['dense']['median_ms']:.3f} ms, compressed {r['compressed']['median_ms']:.3f} ms: "
               f"{r['latency_speedup']:.2f}x for {r['mac_speedup']:.2f}x fewer MACs (efficiency {r['efficiency']:.2f})"
               + (f"; {slower} layer(s) slower than dense" if slower else "") + em)
    click.echo(f"  report: {path} (+ .md, .png)")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--port", type=int, default=9090, show_default=True)
@click.option("--tracker", default=None, help="register with a TVM RPC tracker at HOST:PORT")
@click.option("--key", default="", help="the device key to register under (with --tracker)")
@click.option("--runtimes", default=None, help="offer only these runtimes (comma-separated)")
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
def serve(host, port, tracker, key, runtimes, quiet, verbose) -> None:
    """Device side: a TVM RPC server that also benchmarks ONNX Runtime and TFLite models. Needs numpy, the TVM
    runtime and the runtimes to offer; not torch."""
    _setup_logging(verbose - quiet)
    from .device.runner import runtime_versions
    from .device.serve import serve as start

    if tracker and not key:
        raise click.ClickException("--tracker needs --key (the name clients request the device by)")
    have = runtime_versions()
    click.echo("runtimes here: " + ", ".join(f"{k} {v}" if v else f"{k} (missing)" for k, v in have.items()))
    try:
        server = start(host, port, tracker, key, tuple(runtimes.split(",")) if runtimes else None)
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"trp-edge serve: listening on {host}:{server.port}" + (f", tracker {tracker} key {key}" if tracker
                                                                          else "") + " (Ctrl-C stops)")
    import signal

    def stop(*_):  # TVM runs the server in a worker process: take it down with us
        server.terminate()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.proc.join()
    except KeyboardInterrupt:
        server.terminate()


@main.command()
@click.option("--target", "-t", required=True, help="a name from `trp-edge targets` or a .toml file")
@click.option("--model", "-m", default=None, help="a trp-edge compress output [default: the latest in trp-edge-out/]")
@click.option("--runtime", "-r", "runtimes", default="all", show_default=True)
@click.option("--host", default=None, help="the device's trp-edge serve address")
@click.option("--port", type=int, default=None)
@click.option("--tracker", default=None, help="a TVM RPC tracker HOST:PORT")
@click.option("--key", default=None, help="the device key at the tracker [default: the target's]")
@click.option("--local", is_flag=True, help="run on this machine (target host)")
@click.option("--emulate", is_flag=True, help="run aarch64 artifacts under qemu here (correctness only)")
@click.option("--tune-trials", type=int, default=0, show_default=True, help="MetaSchedule trials when TVM is built")
@click.option("--tuning-db", default=None, help="TVM tuning database folder to use and extend")
@click.option("--timeout", type=float, default=900, show_default=True, help="seconds for one runtime's session")
@click.option("--reports", default="reports", show_default=True)
@click.option("--layers/--no-layers", default=True, show_default=True, help="per-layer breakdown")
@click.option("--compare", "-c", multiple=True, metavar="MODEL_DIR",
              help="another compress output to time side by side in the same run (repeatable), e.g. the same "
                   "model compressed without --latency-table")
@_protocol_options
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
def deploy(target, model, runtimes, host, port, tracker, key, local, emulate, tune_trials, tuning_db, timeout, reports,
           layers, compare, min_runs, min_seconds, threads, quiet, verbose) -> None:
    """Build (or reuse) the dense and compressed artifacts for a target, run them on the device and write
    reports/<target>/<model>-<runtime>-<time>.{json,md,png}. With --compare, every model is timed in the same
    alternating run and each report carries the side-by-side table."""
    _setup_logging(verbose - quiet)
    from .config import DeployConfig, ProfileConfig
    from .deploy import deploy as run

    try:
        cfg = DeployConfig(target=target, model=model, runtimes=runtimes, host=host, port=port, tracker=tracker,
                           key=key, local=local, emulate=emulate, threads=threads, tune_trials=tune_trials,
                           tuning_db=tuning_db, reports=reports, timeout=timeout, layers=layers, compare=compare,
                           protocol=ProfileConfig(min_runs=min_runs, min_seconds=min_seconds))
        paths = run(cfg)
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    shown = set()
    for p in paths:
        _echo_report(p)
        r = json.loads(p.read_text())
        key_ = (r["runtime"], r["target"])
        if r.get("comparison") and key_ not in shown:
            from .deploy import comparison_markdown

            shown.add(key_)
            click.echo(f"side by side ({r['target']}/{r['runtime']}, one run):")
            click.echo("\n".join(comparison_markdown(r["comparison"])))


@main.command()
@click.argument("artifact_dir")
@click.option("--target", "-t", default="host", show_default=True)
@click.option("--reports", default="reports", show_default=True)
@_protocol_options
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
def profile(artifact_dir, target, reports, min_runs, min_seconds, threads, quiet, verbose) -> None:
    """Time an existing build (OUT/<target>/<runtime>/) on this machine and write its report."""
    _setup_logging(verbose - quiet)
    from .config import DeployConfig, ProfileConfig
    from .deploy import profile_build

    try:
        cfg = DeployConfig(target=target, local=True, threads=threads, reports=reports,
                           protocol=ProfileConfig(min_runs=min_runs, min_seconds=min_seconds))
        path = profile_build(Path(artifact_dir), target, cfg)
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    _echo_report(path)


@main.command()
@click.argument("reports", default="reports")
def report(reports) -> None:
    """Every device and runtime in REPORTS/ in one table (REPORTS/summary.md) and one plot (summary.png)."""
    from .deploy import aggregate

    try:
        table, png, _ = aggregate(Path(reports))
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(table, nl=False)
    click.echo(f"wrote {Path(reports) / 'summary.md'} and {png}")


@main.command()
@click.option("--target", "-t", default="host", show_default=True)
@click.option("--model", "-m", required=True, help="a built-in name or a .pt file (as for compress)")
@click.option("--schemes", default="channel,spatial", show_default=True)
@click.option("--runtime", "-r", default="ort", show_default=True, help="the runtime to measure with (ort)")
@click.option("--local", is_flag=True, help="measure on this machine (target host)")
@click.option("--host", default=None, help="the device's trp-edge serve address (as for deploy)")
@click.option("--port", type=int, default=None)
@click.option("--tracker", default=None, help="a TVM RPC tracker HOST:PORT")
@click.option("--key", default=None, help="the device key at the tracker [default: the target's]")
@click.option("--timeout", type=float, default=1800, show_default=True, help="seconds for the device session")
@click.option("--threads", type=int, default=None, help="runtime threads [default: the target's]")
@click.option("--input-size", type=int, default=None)
@click.option("--data", default=None, help="take input size and channels from this data set (as compress --data)")
@click.option("--out", default="calibration", show_default=True)
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
def calibrate(target, model, schemes, runtime, local, host, port, tracker, key, timeout, threads, input_size, data,
              out, quiet, verbose) -> None:
    """Measure every eligible conv of MODEL dense and as low-rank pairs over a grid of ranks and schemes, on the
    device (over RPC, as deploy) or here (--local), and write calibration/<target>/<runtime>/<model>.csv with a
    JSON header."""
    _setup_logging(verbose - quiet)
    from .calibrate import calibrate as run

    try:
        r = run(model, target, schemes=tuple(s for s in schemes.split(",") if s), runtime=runtime, threads=threads,
                local=local, out=out, input_size=input_size, data=data, host=host, port=port, tracker=tracker,
                key=key, timeout=timeout)
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{r.rows} measurements in {r.seconds:.0f} s: {r.csv} (+ {r.header.name})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print every target as JSON")
def targets(as_json: bool) -> None:
    """List the device targets (targets/*.toml; more directories in $TRP_EDGE_TARGETS)."""
    from .targets import all_targets

    try:
        found = all_targets()
    except TrpEdgeError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in found], indent=2))
        return
    rows = [("target", "cpu", "gpu", "runtimes", "threads", "description")]
    for t in found:
        cpu = f"{t.cpu.mcpu} ({t.cpu.triple}, {t.cpu.cores} cores)"
        gpu = f"{t.gpu.api}:{t.gpu.device or t.gpu.arch or ''}".rstrip(":") if t.gpu else "-"
        rows.append((t.name, cpu, gpu, ",".join(t.runtimes), str(t.run_threads), t.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])


if __name__ == "__main__":
    main()
