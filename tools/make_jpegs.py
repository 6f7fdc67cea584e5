#!/usr/bin/env python3
"""Synthetic JPEGs in ImageFolder layout, for timing the imagefolder loader (tools/bench_data.py,
tools/gpu_session.sh) where no image set can be fetched:

    DIR/train/class_00/00000.jpg ... DIR/val/class_09/...

Each class is a smooth colour field of its own plus noise, so the JPEGs decode like photographs
(not like white noise, which compresses badly and decodes slowly) and a model can learn them.

    python tools/make_jpegs.py DIR --train 512 --val 128 --size 224
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_jpegs(root: str | Path, train: int = 512, val: int = 128, *, classes: int = 10, size: int = 224,
               seed: int = 0, quality: int = 90) -> Path:
    """Writes `train` + `val` JPEGs of size x size under root/train and root/val, one folder per class, round
    robin over the classes; returns root."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    fields = []
    for _ in range(classes):  # per class: a colour gradient at its own angle and frequency
        angle, freq = rng.uniform(0, np.pi), rng.uniform(1, 4)
        phase = rng.uniform(0, 2 * np.pi, 3)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        fields.append(np.stack([127 + 80 * np.sin(2 * np.pi * freq * t + p) for p in phase], -1))
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            (root / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % classes
            img = fields[c] + rng.normal(0, 24, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / split / f"class_{c:02d}" / f"{i:05d}.jpg", quality=quality)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--train", type=int, default=512, help="training images (default 512)")
    ap.add_argument("--val", type=int, default=128, help="validation images (default 128)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=224, help="width and height in pixels (default 224)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = make_jpegs(args.dir, args.train, args.val, classes=args.classes, size=args.size, seed=args.seed)
    print(f"{root}: {args.train} training and {args.val} validation JPEGs of {args.size}x{args.size}, "
          f"{args.classes} classes")


if __name__ == "__main__":
    main()
