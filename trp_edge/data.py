"""Data sets for TRP training and evaluation.

    fashion-mnist[:DIR]   IDX files (default DIR: Debian's dataset-fashion-mnist)
    cifar10:DIR           the python-pickle batches (data_batch_1..5, test_batch)
    imagefolder:DIR       DIR/train and DIR/val, one folder per class, resized to the model's input size
    synthetic[:CxHxW]     learnable random images (tests); without a shape, at the model's input size

Batches are deterministic given (seed, epoch, batch index): the order and the augmentation of an
epoch can be replayed from any batch, which makes --resume exact."""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _seed(*parts: int) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _Batching:
    """Batch counting and the epoch's order, shared by every split kind."""

    def num_batches(self, batch: int, drop_last: bool) -> int:
        return len(self) // batch if drop_last else math.ceil(len(self) / batch)  # type: ignore[arg-type]

    def _order(self, epoch: int, seed: int, shuffle: bool) -> torch.Tensor:
        n = len(self)  # type: ignore[arg-type]
        return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch))) if shuffle \
            else torch.arange(n)


@dataclass
class TensorSplit(_Batching):
    """A split held in memory as uint8 images (N, C, H, W) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    crop_pad: int = 4
    flip: bool = True

    def __len__(self) -> int:
        return len(self.y)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.crop_pad
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        oh = torch.randint(0, 2 * p + 1, (b,), generator=g)
        ow = torch.randint(0, 2 * p + 1, (b,), generator=g)
        rows = (oh[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ow[:, None] + torch.arange(w))[:, None, None, :]
        out = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
        if self.flip:
            flip = torch.rand(b, generator=g) < 0.5
            out[flip] = out[flip].flip(-1)
        return out

    def batches(self, batch: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = False, start: int = 0,
                part: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`part` (rank, world): each global batch's items rank, rank + world, ... (DistributedSampler's share),
        augmented as in the whole batch."""
        order = self._order(epoch, seed, shuffle)
        r, w = part
        for i in range(start, self.num_batches(batch, drop_last=shuffle)):
            idx = order[i * batch:(i + 1) * batch]
            x = self.x[idx]
            if self.augment:
                x = self._augment(x, torch.Generator().manual_seed(_seed(seed, epoch, i)))
            yield self._normalize(x[r::w]), self.y[idx][r::w]


@dataclass
class Dataset:
    name: str
    train: TensorSplit | FolderSplit
    test: TensorSplit | FolderSplit
    in_channels: int
    num_classes: int
    image_size: int

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(1, self.in_channels, self.image_size, self.image_size)


# ---- Fashion-MNIST (IDX) -------------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InputError(f"{path}: truncated IDX file ({data.size} bytes for shape {dims})")
    return data.reshape(dims)


def _find(d: Path, stem: str) -> Path:
    for cand in (d / stem, d / f"{stem}.gz"):
        if cand.exists():
            return cand
    raise InputError(f"{d}: missing {stem}[.gz] (install Debian's dataset-fashion-mnist or point "
                     "--data fashion-mnist:DIR at the IDX files)")


def fashion_mnist(root: str | None = None) -> Dataset:
    d = Path(root or FASHION_MNIST_DIR)
    if not d.is_dir():
        raise InputError(f"{d}: no such data directory (apt-get install dataset-fashion-mnist, or "
                         "--data fashion-mnist:DIR)")

    def split(prefix: str, augment: bool) -> TensorSplit:
        x = torch.from_numpy(_read_idx(_find(d, f"{prefix}-images-idx3-ubyte")).copy())[:, None]
        y = torch.from_numpy(_read_idx(_find(d, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
        if len(x) != len(y):
            raise InputError(f"{d}: {prefix} images and labels differ in count ({len(x)} vs {len(y)})")
        return TensorSplit(x, y, (0.2860,), (0.3530,), augment=augment)

    return Dataset("fashion-mnist", split("train", True), split("t10k", False), 1, 10, 28)


# ---- CIFAR-10 (python pickles) ------------------------------------------------------------------------

def cifar10(root: str) -> Dataset:
    d = Path(root)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    if not d.is_dir():
        raise InputError(f"{d}: no such data directory (expected the CIFAR-10 python batches)")

    def load(names: list[str], augment: bool) -> TensorSplit:
        xs, ys = [], []
        for n in names:
            p = d / n
            if not p.exists():
                raise InputError(f"{p}: missing CIFAR-10 batch")
            try:
                with open(p, "rb") as f:
                    b = pickle.load(f, encoding="bytes")  # noqa: S301 - the format is a pickle of arrays
                xs.append(np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(b[b"labels"], dtype=np.int64))
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise InputError(f"{p}: not a CIFAR-10 python batch ({e})") from e
        return TensorSplit(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=augment)

    return Dataset("cifar10", load([f"data_batch_{i}" for i in range(1, 6)], True), load(["test_batch"], False),
                   3, 10, 32)


# ---- synthetic -------------------------------------------------------------------------------------------

def synthetic(shape: str | None = None, n_train: int = 512, n_test: int = 256, classes: int = 10,
              seed: int = 0, size: int | None = None) -> Dataset:
    """Images whose class is a fixed random pattern plus noise: learnable in a few steps. Without a shape:
    3 x size x size (16 unless the model says otherwise)."""
    try:
        c, h, w = (int(v) for v in (shape or f"3x{size or 16}x{size or 16}").lower().split("x"))
    except ValueError:
        raise InputError(f"synthetic:{shape}: expected synthetic:CxHxW, e.g. synthetic:3x16x16") from None
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(classes, c, h, w, generator=g)

    def make(n: int, augment: bool) -> TensorSplit:
        y = torch.randint(0, classes, (n,), generator=g)
        x = 0.6 * patterns[y] + 0.4 * torch.rand(n, c, h, w, generator=g)
        return TensorSplit((x * 255).to(torch.uint8), y, (0.5,) * c, (0.25,) * c, augment=augment,
                           crop_pad=1, flip=False)

    return Dataset(f"synthetic-{c}x{h}x{w}", make(n_train, True), make(n_test, False), c, classes, h)


# ---- ImageFolder -------------------------------------------------------------------------------------------

class FolderSplit(_Batching):
    """An ImageFolder split decoded on the fly; each item's augmentation is seeded by
    (seed, epoch, index) so an epoch replays exactly, whichever worker decodes it.

    One DataLoader serves every epoch and every batch size: its batch sampler (`_Plan`) is handed the
    epoch's batches of keys (index, seed, epoch) at each `batches` call, so `workers` processes start once
    and persist (persistent_workers), each keeping `prefetch` batches in flight; batches are pinned for
    the copy to the GPU when CUDA is available (`pin_memory`, None: then)."""

    def __init__(self, root: Path, size: int, augment: bool, workers: int = 0, *, prefetch: int = 2,
                 pin_memory: bool | None = None):
        from torchvision import datasets, transforms

        self.ds = datasets.ImageFolder(str(root))
        self.size, self.augment, self.workers, self.prefetch = size, augment, workers, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        if augment:
            self.tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                          transforms.ToTensor(), norm])
        else:
            self.tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                                          transforms.ToTensor(), norm])
        self._loader: torch.utils.data.DataLoader | None = None
        self._plan = _Plan()
        self._generation = 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getstate__(self):  # what a worker process gets: the images and transforms, not the loader
        return {**self.__dict__, "_loader": None, "_plan": _Plan()}

    def loader(self) -> torch.utils.data.DataLoader:
        """The one DataLoader of this split, made at the first use."""
        if self._loader is None:
            more = dict(persistent_workers=True, prefetch_factor=self.prefetch) if self.workers else {}
            self._loader = torch.utils.data.DataLoader(_Items(self), batch_sampler=self._plan,
                                                       num_workers=self.workers, pin_memory=self.pin_memory, **more)
        return self._loader

    def close(self) -> None:
        """Stops the worker processes (a later `batches` starts them again)."""
        self._loader = None

    def batches(self, batch: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = False, start: int = 0,
                part: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`part` (rank, world): this rank's share of each global batch, items rank, rank + world, ... (the
        share a DistributedSampler without shuffling gives), batch / world a batch."""
        nb = self.num_batches(batch, drop_last=shuffle)
        order = self._order(epoch, seed, shuffle).tolist()
        r, w = part
        plan = [[(i, seed, epoch) for i in order[b * batch:(b + 1) * batch][r::w]] for b in range(start, nb)]
        return self._run(plan)

    def _run(self, plan: list[list[tuple[int, int, int]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._generation += 1
        mine = self._generation
        self._plan.batches = plan
        for xy in self.loader():
            if self._generation != mine:
                raise RuntimeError("FolderSplit.batches: a later batches() call took over this split's loader")
            yield xy


class _Plan(torch.utils.data.Sampler):
    """The batch sampler of a FolderSplit's loader: the batches of the current `batches` call."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Items(torch.utils.data.Dataset):
    """Decodes the item of key (index, seed, epoch), its augmentation seeded by the key."""

    def __init__(self, split: FolderSplit):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        i, seed, epoch = key
        img, label = self.split.ds[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(seed, epoch, i))
            return self.split.tf(img), label


def imagefolder(root: str, size: int = 224, workers: int = 2) -> Dataset:
    d = Path(root)
    for sub in ("train", "val"):
        if not (d / sub).is_dir():
            raise InputError(f"{d / sub}: no such directory (imagefolder:DIR needs DIR/train and DIR/val)")
    train = FolderSplit(d / "train", size, True, workers)
    test = FolderSplit(d / "val", size, False, workers)
    # torchvision's ImageFolder loader converts every image to RGB
    return Dataset(f"imagefolder-{d.name}", train, test, 3, len(train.ds.classes), size)


def free_size(spec: str) -> bool:
    """Whether a --data spec leaves the image size to the model (imagefolder resizes; synthetic without a
    shape is made at it)."""
    kind, _, arg = spec.partition(":")
    return kind == "imagefolder" or (kind == "synthetic" and not arg)


def load_data(spec: str, *, workers: int = 2, seed: int = 0, size: int | None = None) -> Dataset:
    """A data set from a --data spec (see the module docstring); `size` is the image size for the specs
    that leave it free (`free_size`)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return fashion_mnist(arg or None)
    if kind == "cifar10":
        if not arg:
            raise InputError("cifar10 needs a directory: --data cifar10:DIR")
        return cifar10(arg)
    if kind == "imagefolder":
        if not arg:
            raise InputError("imagefolder needs a directory: --data imagefolder:DIR")
        return imagefolder(arg, size=size or 224, workers=workers)
    if kind == "synthetic":
        return synthetic(arg or None, seed=seed, size=size)
    raise InputError(f"unknown data set {spec!r}: use fashion-mnist[:DIR], cifar10:DIR, imagefolder:DIR or synthetic")
