"""The trp-edge command line: parse options into a config, call one library function, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .cli_options import (
    boards_option,
    connection_options,
    default,
    library_errors,
    opt,
    parse_ranks,
    protocol_options,
    serve_limit_options,
)
from .config import (
    ALLOCATIONS,
    NUCLEAR_SOLVERS,
    PRECISIONS,
    SCHEME_NAMES,
    BuildConfig,
    CalibrateConfig,
    CompressConfig,
    DecomposeConfig,
    DeployConfig,
    ProfileConfig,
    TRPConfig,
)
from .summary import artifact_status, compress_lines, deploy_lines
from .targets import RUNTIMES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trp-edge")
def main() -> None:
    """Trained Rank Pruning for CNNs, lowered to edge devices, with latency measured on the device."""


# the configs whose field defaults the options take
D, T, C, P, B, Dp, Ca = (DecomposeConfig, TRPConfig, CompressConfig, ProfileConfig, BuildConfig, DeployConfig,
                         CalibrateConfig)


@main.command()
@click.argument("model")
@opt(D, "scheme", "--scheme", type=click.Choice([*SCHEME_NAMES, "auto"]),
     help="channel: kh x kw conv then 1x1 (Zhang et al.); spatial: kh x 1 then 1 x kw (Jaderberg et al.); "
          "auto: per layer the faster of the two and dense (by --latency-table, else by MACs)")
@opt(D, "energy", "--energy", "-e", type=float,
     help="TSVD energy e: keep the smallest rank whose dropped singular values hold <= e of the energy")
@opt(T, "nuclear", "--nuclear", type=float, help="nuclear-norm weight lambda (paper: 3e-4)")
@opt(T, "period", "--period", "-m", type=int, help="TSVD projection every m steps (0: plain SGD)")
@opt(T, "epochs", "--epochs", type=int, help="training epochs")
@opt(T, "steps", "--steps", type=int, help="training steps (overrides --epochs; 0: decompose directly)")
@opt(T, "lr", "--lr", type=float)
@opt(T, "batch", "--batch", type=int)
@opt(T, "momentum", "--momentum", type=float)
@opt(T, "weight_decay", "--weight-decay", type=float)
@opt(T, "schedule", "--schedule", type=click.Choice(["cosine", "step", "constant"]))
@opt(T, "device", "--device", help="auto, cpu or cuda[:N]")
@opt(T, "svd_device", "--svd-device", type=click.Choice(["auto", "cpu", "same"]),
     help="where the TRP SVDs run (auto: on the training device)")
@opt(T, "nuclear_solver", "--nuclear-solver", type=click.Choice(NUCLEAR_SOLVERS),
     help="how the nuclear-norm sub-gradient is found: svd, newton-schulz (matrix products; auto: on CUDA)")
@opt(T, "seed", "--seed", type=int)
@opt(T, "workers", "--workers", type=int, help="data loader workers (imagefolder; 0: in this process)")
@opt(T, "finetune", "--finetune", type=float, help="after decomposition, train the low-rank model N epochs (ranks "
     "fixed; plain SGD, the run's lr and schedule; 0.5: half an epoch's steps); also after --steps 0")
@opt(T, "distill", "--distill", type=float, is_flag=False, flag_value=4.0,
     help="distil from the dense input model (frozen) at temperature T [T without a value: 4]")
@opt(T, "distill_weight", "--distill-weight", type=float, help="a: loss = (1-a) CE + a T^2 KL")
@opt(T, "eval_every", "--eval-every", type=int, help="held-out top-1 every N epochs (0: off), in metrics.jsonl")
@opt(T, "keep", "--keep", help="last, or best: the epoch with the best held-out top-1 (needs --eval-every; under "
     "TRP scored truncated at its ranks)")
@opt(T, "amp", "--amp", help="mixed precision of forward and loss: auto (bf16 on CUDA where supported, else off), "
     "bf16, fp16 or off; SVDs and weights stay fp32")
@opt(T, "channels_last", "--channels-last/--no-channels-last", help="NHWC memory format for model and inputs")
@opt(C, "data", "--data", help="fashion-mnist[:DIR], cifar10:DIR, imagefolder:DIR or synthetic[:CxHxW]")
@opt(C, "arch", "--arch", help="architecture of a .pt state_dict (inferred from its keys when omitted)")
@opt(C, "weights", "--weights", type=click.Path(dir_okay=False), help="weights for a built-in model name")
@click.option("--trust-pickle", is_flag=True, help="allow a .pt holding a pickled nn.Module (runs code from the file)")
@opt(C, "in_channels", "--in-channels", type=int, help="input channels of a built-in model (default: the data's)")
@opt(C, "num_classes", "--num-classes", type=int, help="classes of a built-in model (default: the data's)")
@opt(C, "input_size", "--input-size", type=int,
     help="input size without --data or with synthetic / imagefolder data (default: the model's: 32 CIFAR, "
          "224 ImageNet)")
@click.option("--skip-stem", is_flag=True, help="leave the first conv dense")
@click.option("--linear", is_flag=True, help="also factorize nn.Linear layers into two (channel scheme; VGG's "
              "classifier holds most of its weights)")
@click.option("--ranks", default=None, help="explicit per-layer ranks: NAME=K,... or a JSON file")
@opt(D, "target_speedup", "--target-speedup", type=float,
     help="choose e by bisection so the decomposed model has X times fewer MACs")
@opt(D, "allocate", "--allocate", type=click.Choice(ALLOCATIONS),
     help="with --target-speedup and a latency table: latency spreads the ranks over layers for the lowest "
     "table latency, dropping no more energy in all than one e would; uniform keeps one e")
@opt(C, "out", "--out", "-o", help="output directory (default trp-edge-out/<model-name>)")
@click.option("--force", is_flag=True, help="replace an existing --out")
@click.option("--resume", is_flag=True, help="go on from --out/checkpoint.pt")
@opt(C, "target", "--target", "-t", help="the deployment the ranks are chosen for: a name from `trp-edge "
     "targets` [default: host]")
@opt(C, "runtime", "--runtime", "-r", help="its runtime: ort, tflite, tvm (untuned; fp32), or several "
     "comma-separated (a pair must then be faster than dense in each) [default: ort]")
@opt(C, "precision", "--precision", help="fp32, int8, or fp32,int8 [default: fp32]")
@opt(C, "threads", "--threads", type=int, help="its threads, also for the latency check [default: the target's]")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="measure the deployment's latency table first when it is missing or stale and the target "
              "can be reached (host, or a board over RPC); without a table ranks are MAC-based")
@opt(C, "calibration", "--calibration", help="where latency tables are found and written [default: "
     "$TRP_EDGE_CALIBRATION, else ./calibration]")
@opt(D, "latency_table", "--latency-table", help="use this trp-edge calibrate table (calibration/<target>/<runtime>/"
     "<model>.csv) instead of the deployment's: round ranks up to the fastest measured ones, keep layers dense "
     "where the pair is slower")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="time dense.onnx vs model.onnx in onnxruntime on this machine for the report")
@click.option("--quiet", "-q", count=True, help="less output (no progress bars)")
@click.option("--verbose", "-v", count=True)
@library_errors
def compress(model, scheme, energy, nuclear, period, epochs, steps, lr, batch, momentum, weight_decay, schedule,
             device, svd_device, nuclear_solver, seed, workers, finetune, distill, distill_weight, eval_every, keep,
             amp, channels_last, data, arch, weights, trust_pickle, in_channels,
             num_classes, input_size, skip_stem, linear, ranks, target_speedup, allocate, out, force, resume, target,
             runtime, precision, threads, calibrate, calibration, latency_table, latency, quiet, verbose):
    """TRP-train MODEL, decompose it into low-rank convs, export ONNX and report what was gained.

    MODEL is a built-in name (resnet18/34/50, resnet20/32/56), any torchvision classification model name
    (mobilenet_v3_small, efficientnet_b0, ...), a .pt file (a state_dict or checkpoint dict of any of those,
    architecture inferred; with --trust-pickle a pickled nn.Module of any class) or a torch.export program
    (.pt2, loaded without running code from the file)."""
    from .api import compress as run

    cfg = CompressConfig(
        model=model, arch=arch, weights=weights, trust_pickle=trust_pickle, in_channels=in_channels,
        num_classes=num_classes, input_size=input_size, data=data, out=out, force=force, resume=resume,
        latency=ProfileConfig() if latency else None, target=target, runtime=runtime, precision=precision,
        threads=threads, calibrate=calibrate, calibration=calibration,
        decompose=DecomposeConfig(scheme=scheme, energy=energy, ranks=parse_ranks(ranks), skip_stem=skip_stem,
                                  linear=linear, target_speedup=target_speedup, latency_table=latency_table,
                                  allocate=allocate),
        trp=TRPConfig(period=period, nuclear=nuclear, epochs=epochs, steps=steps, lr=lr, batch=batch,
                      momentum=momentum, weight_decay=weight_decay, schedule=schedule, device=device,
                      seed=seed, workers=workers, svd_device=svd_device,
                      nuclear_solver=nuclear_solver, finetune=finetune, distill=distill,
                      distill_weight=distill_weight, eval_every=eval_every, keep=keep, amp=amp,
                      channels_last=channels_last))
    from .trp_distributed import launched

    with launched(cfg.trp.device) as dist:  # a torchrun job's rank (one process otherwise)
        result = run(cfg, progress=quiet == 0 and sys.stderr.isatty() and dist.is_main)
    if result is not None:  # None on a torchrun job's ranks other than 0
        click.echo("\n".join(compress_lines(result)))


@main.command()
@click.argument("model")
@opt(B, "target", "--target", "-t", help="a name from `trp-edge targets` or a .toml file")
@opt(B, "runtimes", "--runtime", "-r", "runtimes",
     help="tvm, ort, tflite (comma-separated) or all (the target's runtimes)")
@opt(B, "tune_trials", "--tune-trials", type=int,
     help="MetaSchedule trials for TVM (0: untuned); the tuning database is kept and reused")
@opt(B, "tune_minutes", "--tune-minutes", type=float,
     help="TVM tuning time budget per model (with --tune-trials: whichever ends first; alone: until time is up)")
@opt(B, "tuning_db", "--tuning-db", help="TVM tuning database folder to use and extend, e.g. shared "
     "between models [default: OUT/<target>/tuning]")
@opt(B, "out", "--out", "-o", help="output folder [default: MODEL/build]")
@opt(B, "int8", "--int8/--no-int8", help="also build INT8 artifacts (ORT, TFLite)")
@opt(B, "calib", "--calib", help="data for INT8 calibration and accuracy (as --data of compress) [default: the model's "
     "own data]")
@opt(B, "calib_images", "--calib-images", type=int)
@opt(B, "eval_images", "--eval-images", type=int)
@opt(B, "gpu", "--gpu/--no-gpu", help="also build for the target's GPU (TVM)")
@opt(B, "emulate", "--emulate/--no-emulate", help="validate foreign-CPU artifacts under qemu-user (correctness only)")
@opt(B, "threads", "--threads", type=int, help="the threads the model will run at, which TVM tuning measures at "
     "[default: the target's]")
@connection_options
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
@library_errors
def build(model, target, runtimes, tune_trials, tune_minutes, tuning_db, out, int8, calib, calib_images, eval_images,
          gpu, emulate, threads, host, port, tracker, key, quiet, verbose) -> None:
    """Build MODEL (a `trp-edge compress` output folder, or an .onnx file) for a device target: the compressed
    and the dense model, per runtime, each artifact validated against torch. Writes OUT/<target>/<runtime>/
    with a manifest.json. --tune-trials tunes TVM on the device named by --host/--port or --tracker/--key (else
    the target's [rpc]; a native target without one tunes here)."""
    from .workflows.build import build as run

    result = run(BuildConfig(model=model, target=target, runtimes=runtimes, out=out, tune_trials=tune_trials,
                             tune_minutes=tune_minutes, tuning_db=tuning_db, int8=int8, calib=calib,
                             calib_images=calib_images, eval_images=eval_images, gpu=gpu, emulate=emulate,
                             threads=threads, host=host, port=port, tracker=tracker, key=key))
    for rt, m in result.manifests.items():
        click.echo(f"{m['target']}/{rt}: {result.out / rt}/ ({m['build_seconds']:.1f} s)")
        for a in m["artifacts"]:
            click.echo(f"  {a['file']:<28} {a['precision']:<5} {a['device']:<7} {artifact_status(a)}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--port", type=int, default=9090, show_default=True)
@click.option("--tracker", default=None, help="register with a TVM RPC tracker at HOST:PORT")
@click.option("--key", default="", help="the device key to register under (with --tracker)")
@click.option("--runtimes", default=None, help="offer only these runtimes (comma-separated)")
@serve_limit_options
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
@library_errors
def serve(host, port, tracker, key, runtimes, token, max_upload_mb, job_seconds, quiet, verbose) -> None:
    """Device side: a TVM RPC server that also benchmarks ONNX Runtime and TFLite models. Needs numpy, the TVM
    runtime and the runtimes to offer; not torch."""
    from .device.runner import runtime_versions, tvm_device_apis
    from .device.serve import Limits, wait
    from .device.serve import serve as start

    if tracker and not key:
        raise click.ClickException("--tracker needs --key (the name clients request the device by)")
    have = runtime_versions()
    click.echo("runtimes here: " + ", ".join(f"{k} {v}" if v else f"{k} (missing)" for k, v in have.items()))
    click.echo("TVM device APIs here: " + (", ".join(tvm_device_apis()) or "none (no TVM runtime)"))
    server = start(host, port, tracker, key, tuple(runtimes.split(",")) if runtimes else None,
                   limits=Limits(token, max_upload_mb, job_seconds))
    if server.token_generated:  # printed once, here only (Jupyter's way): never logged or written
        click.echo(f"trp-edge serve: clients need this token (--token or $TRP_EDGE_TOKEN): {server.token}")
    click.echo(f"trp-edge serve: listening on {host}:{server.port}" + (f", tracker {tracker} key {key}" if tracker
                                                                          else "") + " (Ctrl-C stops)")
    wait(server)


@main.command()
@click.option("--target", "-t", required=True, help="a name from `trp-edge targets` or a .toml file")
@opt(Dp, "model", "--model", "-m", help="a trp-edge compress output [default: the latest in trp-edge-out/]")
@opt(Dp, "runtimes", "--runtime", "-r", "runtimes")
@opt(Dp, "precision", "--precision", help="fp32, int8 or both comma-separated (INT8 for ORT and TFLite; INT8 "
     "dense against INT8 compressed, with the fp32 dense model as the reference line) [default: the precisions "
     "the model was compressed for, compress --precision]")
@connection_options
@click.option("--local", is_flag=True, help="run on this machine (target host)")
@click.option("--emulate", is_flag=True, help="run aarch64 artifacts under qemu here (correctness only)")
@opt(Dp, "tune_trials", "--tune-trials", type=int, help="MetaSchedule trials when TVM is built")
@opt(Dp, "tune_minutes", "--tune-minutes", type=float, help="TVM tuning time budget per model when TVM is built")
@opt(Dp, "tuning_db", "--tuning-db", help="TVM tuning database folder to use and extend")
@opt(Dp, "timeout", "--timeout", type=float, help="seconds for one runtime's session")
@opt(Dp, "reports", "--reports")
@opt(Dp, "layers", "--layers/--no-layers", help="per-layer breakdown")
@click.option("--compare", "-c", multiple=True, metavar="MODEL_DIR",
              help="another compress output to time side by side in the same run (repeatable), e.g. the same "
                   "model compressed without --latency-table")
@protocol_options
@boards_option
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
@library_errors
def deploy(target, model, runtimes, precision, host, port, tracker, key, local, emulate, tune_trials, tune_minutes,
           tuning_db, timeout, reports, layers, compare, min_runs, min_seconds, threads, boards, quiet,
           verbose) -> None:
    """Build (or reuse) the dense and compressed artifacts for a target, run them on the device and write
    reports/<target>/<model>-<runtime>[-int8]-<time>.{json,md,png}. With --compare, every model is timed in the same
    alternating run and each report carries the side-by-side table."""
    from .report import comparison_markdown, read_report
    from .workflows.deploy import deploy as run

    paths = run(DeployConfig(target=target, model=model, runtimes=runtimes, precision=precision, host=host, port=port,
                             tracker=tracker, key=key, local=local, emulate=emulate, threads=threads,
                             tune_trials=tune_trials, tune_minutes=tune_minutes, tuning_db=tuning_db, reports=reports,
                             timeout=timeout, layers=layers, compare=compare,
                             protocol=ProfileConfig(min_runs=min_runs, min_seconds=min_seconds)), boards=boards)
    shown = set()
    for p in paths:
        click.echo("\n".join(deploy_lines(p)))
        r = read_report(p)
        if r.get("comparison") and (r["runtime"], r["target"]) not in shown:
            shown.add((r["runtime"], r["target"]))
            click.echo(f"side by side ({r['target']}/{r['runtime']}, one run):")
            click.echo("\n".join(comparison_markdown(r["comparison"])))
    if paths.fastest:
        from .workflows.deploy import fastest_line

        click.echo(fastest_line(paths.fastest))


@main.command()
@click.argument("artifact_dir")
@click.option("--target", "-t", default="host", show_default=True)
@opt(Dp, "reports", "--reports")
@protocol_options
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
@library_errors
def profile(artifact_dir, target, reports, min_runs, min_seconds, threads, quiet, verbose) -> None:
    """Time an existing build (OUT/<target>/<runtime>/) on this machine and write its report."""
    from .workflows.deploy import profile_build

    cfg = DeployConfig(target=target, local=True, threads=threads, reports=reports,
                       protocol=ProfileConfig(min_runs=min_runs, min_seconds=min_seconds))
    click.echo("\n".join(deploy_lines(profile_build(Path(artifact_dir), target, cfg))))


@main.command()
@click.argument("reports", default="reports")
@library_errors
def report(reports) -> None:
    """Every device and runtime in REPORTS/ in one table (REPORTS/summary.md) and one plot (summary.png)."""
    from .report import aggregate

    table, png, _ = aggregate(Path(reports))
    click.echo(table, nl=False)
    click.echo(f"wrote {Path(reports) / 'summary.md'} and {png}")


@main.command()
@opt(Ca, "target", "--target", "-t")
@click.option("--model", "-m", required=True, help="a model name, a .pt or .pt2 file (as for compress)")
@click.option("--schemes", default=",".join(default(Ca, "schemes")), show_default=True)
@opt(Ca, "runtime", "--runtime", "-r", type=click.Choice(RUNTIMES), help="the runtime to measure with")
@opt(Ca, "precision", "--precision", type=click.Choice(PRECISIONS),
     help="int8: quantized layers (ORT: static QDQ; TFLite: full-integer)")
@click.option("--local", is_flag=True, help="measure on this machine (target host)")
@connection_options
@opt(Ca, "timeout", "--timeout", type=float, help="seconds for the device session")
@opt(Ca, "threads", "--threads", type=int, help="runtime threads [default: the target's]")
@opt(Ca, "input_size", "--input-size", type=int)
@opt(Ca, "data", "--data", help="take input size and channels from this data set (as compress --data)")
@click.option("--trust-pickle", is_flag=True, help="allow a .pt holding a pickled nn.Module (as for compress)")
@opt(Ca, "out", "--out")
@boards_option
@click.option("-q", "--quiet", count=True)
@click.option("-v", "--verbose", count=True)
@library_errors
def calibrate(target, model, schemes, runtime, precision, local, host, port, tracker, key, timeout, threads,
              input_size, data, trust_pickle, out, boards, quiet, verbose) -> None:
    """Measure every eligible conv of MODEL dense and as low-rank pairs over a grid of ranks and schemes, on the
    device (over RPC, as deploy) or here (--local), and write calibration/<target>/<runtime>/<model>.csv with a
    JSON header (<model>-int8, <model>-<N>t for INT8 and N threads)."""
    from .workflows.calibrate import calibrate as run

    r = run(CalibrateConfig(model=model, target=target, schemes=tuple(s for s in schemes.split(",") if s),
                            runtime=runtime, precision=precision, threads=threads, local=local, out=out,
                            input_size=input_size, data=data, trust_pickle=trust_pickle, host=host, port=port,
                            tracker=tracker, key=key, timeout=timeout),
            progress=quiet == 0 and sys.stderr.isatty(), boards=boards)
    click.echo(f"{r.rows} measurements in {r.seconds:.0f} s: {r.csv} (+ {r.header.name})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print every target as JSON")
@library_errors
def targets(as_json: bool) -> None:
    """List the device targets (targets/*.toml; more directories in $TRP_EDGE_TARGETS)."""
    from .targets import all_targets

    found = all_targets()
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
