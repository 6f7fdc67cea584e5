#!/usr/bin/env python3
"""Which one bounds training: the data loader or the training step? Images/s of each alone, and of the two
together, for each loader worker count.

- imagefolder: trp_edge.data.FolderSplit (decode, RandomResizedCrop, flip, normalize) over synthetic JPEGs
  that tools/make_jpegs.py writes to a temporary folder (or --dir DIR, DIR/train in ImageFolder layout);
  timed over --epochs epochs after one warm epoch (which starts the persistent workers).
- fashion-mnist: the in-memory split (crop + flip on uint8 tensors in this process: no workers), when
  /usr/share/datasets/fashion-mnist (or --fmnist DIR) is there.
- step: forward + backward + SGD step of --model (torchvision names or resnet20...) on one fixed batch on
  --device, --amp off|bf16, after --warmup steps.
- together: the loader feeding the step (copy to the device included), one epoch after the timings above.

Prints a table and saves --out (JSON).

    python tools/bench_data.py --model resnet50 --size 224 --batch 64 --device cuda --workers 0,2,4,8 \\
        --images 1024 --out bench-out/data.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_jpegs import make_jpegs  # noqa: E402

from trp_edge.data import FASHION_MNIST_DIR, FolderSplit, fashion_mnist  # noqa: E402
from trp_edge.models import build, builtin_spec  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """Forward + backward + SGD step of one model on one device."""

    def __init__(self, model_name: str, in_channels: int, classes: int, device: torch.device, amp: str):
        torch.manual_seed(0)
        self.model = build(builtin_spec(model_name, in_channels=in_channels, num_classes=classes)).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.device, self.amp = device, amp

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp == "bf16"
               else contextlib.nullcontext())
        with ctx:
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def images_per_s(self, shape: tuple[int, ...], classes: int, warmup: int, steps: int) -> float:
        x = torch.randn(*shape).to(self.device)
        y = torch.randint(0, classes, (shape[0],)).to(self.device)
        for _ in range(warmup):
            self(x, y)
        sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self(x, y)
        sync(self.device)
        return shape[0] * steps / (time.perf_counter() - t)


def time_loader(batches) -> tuple[float, int]:
    """(seconds, images) to draw every batch of an iterator."""
    t, n = time.perf_counter(), 0
    for _, y in batches:
        n += len(y)
    return time.perf_counter() - t, n


def time_together(batches, step: Step, limit: int) -> float:
    """Images/s of the loader feeding the step, over at most `limit` batches."""
    sync(step.device)
    t, n = time.perf_counter(), 0
    for i, (x, y) in enumerate(batches):
        if i >= limit:
            break
        step(x, y)
        n += len(y)
    sync(step.device)
    return n / (time.perf_counter() - t)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bound(loader: float, step: float) -> str:
    return "loader" if loader < step else "step"


def imagefolder_rows(args, device: torch.device) -> list[dict]:
    with contextlib.ExitStack() as stack:
        root = Path(args.dir) if args.dir else make_jpegs(stack.enter_context(tempfile.TemporaryDirectory()),
                                                          args.images, 0, size=args.size)
        train = root / "train"
        classes = len([d for d in train.iterdir() if d.is_dir()])
        step = Step(args.model, 3, classes, device, args.amp)
        step_ips = step.images_per_s((args.batch, 3, args.size, args.size), classes, args.warmup, args.steps)
        rows = []
        for w in args.workers:
            split = FolderSplit(train, args.size, True, workers=w)
            t0 = time.perf_counter()
            first = next(split.batches(args.batch, epoch=0, seed=0, shuffle=True))
            first_s = time.perf_counter() - t0
            time_loader(split.batches(args.batch, epoch=0, seed=0, shuffle=True))  # warm: workers up, files cached
            secs, n = 0.0, 0
            for e in range(args.epochs):
                s, k = time_loader(split.batches(args.batch, epoch=1 + e, seed=0, shuffle=True))
                secs, n = secs + s, n + k
            together = time_together(split.batches(args.batch, epoch=99, seed=0, shuffle=True), step, args.steps)
            split.close()
            del first
            rows.append({"data": f"imagefolder {args.size}px", "model": args.model, "workers": w,
                         "loader_images_per_s": n / secs, "first_batch_s": first_s, "step_images_per_s": step_ips,
                         "together_images_per_s": together, "bound": bound(n / secs, step_ips)})
            print_row(rows[-1])
        return rows


def fmnist_rows(args, device: torch.device) -> list[dict]:
    ds = fashion_mnist(args.fmnist)
    step = Step(args.fmnist_model, 1, 10, device, args.amp)
    b = args.fmnist_batch
    step_ips = step.images_per_s((b, 1, 28, 28), 10, args.warmup, args.steps)
    epoch = ds.train.batches(b, epoch=0, seed=0, shuffle=True)
    secs, n = time_loader(xy for _, xy in zip(range(args.fmnist_batches), epoch))
    together = time_together(ds.train.batches(b, epoch=1, seed=0, shuffle=True), step, args.steps)
    row = {"data": "fashion-mnist 28px (in memory)", "model": args.fmnist_model, "workers": None,
           "loader_images_per_s": n / secs, "first_batch_s": None, "step_images_per_s": step_ips,
           "together_images_per_s": together, "bound": bound(n / secs, step_ips)}
    print_row(row)
    return [row]


HEADER = f"| {'data':<30} | {'model':<9} | workers | loader img/s | step img/s | together img/s | bound  |"


def print_row(r: dict) -> None:
    w = "-" if r["workers"] is None else r["workers"]
    print(f"| {r['data']:<30} | {r['model']:<9} | {w:>7} | {r['loader_images_per_s']:>12.1f} | "
          f"{r['step_images_per_s']:>10.1f} | {r['together_images_per_s']:>14.1f} | {r['bound']:<6} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="the model of the imagefolder step (default resnet18)")
    ap.add_argument("--size", type=int, default=224, help="imagefolder image size (default 224)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=256, help="synthetic JPEGs to make (default 256)")
    ap.add_argument("--dir", help="an existing ImageFolder root (DIR/train) instead of synthetic JPEGs")
    ap.add_argument("--workers", default="0,1,2", help="loader worker counts, comma-separated (default 0,1,2)")
    ap.add_argument("--epochs", type=int, default=1, help="loader epochs timed after a warm one (default 1)")
    ap.add_argument("--fmnist", default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder ('' to skip)")
    ap.add_argument("--fmnist-model", default="resnet20")
    ap.add_argument("--fmnist-batch", type=int, default=128)
    ap.add_argument("--fmnist-batches", type=int, default=100, help="loader batches timed (default 100)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast of the step (default off)")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    print(HEADER)
    print("|" + "|".join("-" * (len(c)) for c in HEADER.split("|")[1:-1]) + "|")
    rows = imagefolder_rows(args, device)
    if args.fmnist and Path(args.fmnist).is_dir():
        rows += fmnist_rows(args, device)
    meta = {"date": datetime.date.today().isoformat(), "device": str(device), "amp": args.amp,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "command": " ".join(sys.argv)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
