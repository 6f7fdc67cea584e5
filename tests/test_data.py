import gzip
import pickle

import numpy as np
import pytest
import torch

from trp_edge.data import fashion_mnist, load_data, synthetic
from trp_edge.errors import InputError


def _write_idx(path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def test_fashion_mnist_idx_files_are_read(fmnist_dir):
    ds = load_data(f"fashion-mnist:{fmnist_dir}")
    assert (ds.in_channels, ds.num_classes, ds.image_size) == (1, 10, 28)
    assert len(ds.train) == 64 and len(ds.test) == 32
    x, y = next(ds.test.batches(8))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_truncated_idx_is_a_clear_error(fmnist_dir):
    p = fmnist_dir / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(InputError, match="truncated"):
        fashion_mnist(str(fmnist_dir))


def test_missing_data_directory_names_the_package(tmp_path):
    with pytest.raises(InputError, match="dataset-fashion-mnist"):
        load_data(f"fashion-mnist:{tmp_path / 'nowhere'}")
    with pytest.raises(InputError, match="unknown data set"):
        load_data("mnist-ish")
    with pytest.raises(InputError, match="imagefolder needs"):
        load_data("imagefolder")


def test_cifar10_batches_are_read(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8),
                         b"labels": list(rng.integers(0, 10, 10))}, f)
    ds = load_data(f"cifar10:{tmp_path}")
    assert len(ds.train) == 50 and len(ds.test) == 10 and ds.in_channels == 3


def test_batches_replay_exactly_from_any_position():
    ds = synthetic("3x16x16", n_train=100)
    full = list(ds.train.batches(16, epoch=3, seed=7, shuffle=True))
    tail = list(ds.train.batches(16, epoch=3, seed=7, shuffle=True, start=2))
    assert len(full) == 6 and len(tail) == 4
    for (xa, ya), (xb, yb) in zip(full[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = next(ds.train.batches(16, epoch=4, seed=7, shuffle=True))
    assert not torch.equal(other[0], full[0][0])  # a new epoch reshuffles and re-augments


def test_imagefolder_train_and_val(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    ds = load_data(f"imagefolder:{tmp_path}", workers=0)
    assert (ds.in_channels, ds.num_classes) == (3, 2)
    from trp_edge.data import FolderSplit

    train = FolderSplit(tmp_path / "train", 16, True, workers=0)
    a = [x for x, _ in train.batches(4, epoch=1, seed=3, shuffle=True)]
    b = [x for x, _ in train.batches(4, epoch=1, seed=3, shuffle=True)]
    assert a[0].shape == (4, 3, 16, 16) and torch.equal(a[0], b[0])  # augmentation replays exactly
    x, y = next(FolderSplit(tmp_path / "val", 16, False).batches(6))
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.fixture
def jpeg_dir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.jpg")
    return tmp_path


def _epoch(split, **kw):
    return [(x.clone(), y.clone()) for x, y in split.batches(4, seed=5, shuffle=True, **kw)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_imagefolder_batches_do_not_depend_on_the_worker_count(jpeg_dir):
    from trp_edge.data import FolderSplit

    one, two = FolderSplit(jpeg_dir, 16, True, workers=0), FolderSplit(jpeg_dir, 16, True, workers=2)
    for epoch in (0, 1):
        a, b = _epoch(one, epoch=epoch), _epoch(two, epoch=epoch)
        assert len(a) == 5 and _same(a, b)  # 21 images, batches of 4, the last partial one dropped
    assert not _same(_epoch(two, epoch=0), _epoch(two, epoch=1))  # each epoch reshuffles and re-augments
    val = FolderSplit(jpeg_dir, 16, False, workers=2)
    assert _same(list(val.batches(8)), list(FolderSplit(jpeg_dir, 16, False).batches(8)))
    assert [len(y) for _, y in val.batches(8)] == [8, 8, 5]  # evaluation keeps the partial batch
    two.close()
    val.close()


def test_imagefolder_workers_persist_across_epochs_and_batch_sizes(jpeg_dir):
    from trp_edge.data import FolderSplit

    split = FolderSplit(jpeg_dir, 16, True, workers=2)
    _epoch(split, epoch=0)
    loader = split.loader()
    assert loader.persistent_workers and loader.prefetch_factor == 2
    pids = [w.pid for w in loader._iterator._workers]
    _epoch(split, epoch=1)
    next(split.batches(3, epoch=2, seed=5, shuffle=True))  # abandoned mid-epoch, as evaluation's next() does
    assert _same(_epoch(split, epoch=3), _epoch(FolderSplit(jpeg_dir, 16, True), epoch=3))
    assert split.loader() is loader and [w.pid for w in loader._iterator._workers] == pids
    split.close()


def test_imagefolder_resumes_from_a_batch(jpeg_dir):
    from trp_edge.data import FolderSplit

    split = FolderSplit(jpeg_dir, 16, True, workers=2)
    full, tail = _epoch(split, epoch=4), _epoch(split, epoch=4, start=3)
    assert len(tail) == 2 and _same(full[3:], tail)
    assert _epoch(split, epoch=4, start=5) == []
    split.close()


def test_a_superseded_imagefolder_iteration_fails_loudly(jpeg_dir):
    from trp_edge.data import FolderSplit

    split = FolderSplit(jpeg_dir, 16, False, workers=0)
    old = split.batches(4)
    next(old)
    next(split.batches(4))
    with pytest.raises(RuntimeError, match="took over"):
        next(old)


def test_imagefolder_ranks_share_each_global_batch(jpeg_dir):
    """Under torchrun each rank takes items rank, rank + world, ... of every global batch: together the two
    ranks' batches are the one-process batches, item for item."""
    from trp_edge.data import FolderSplit

    whole = _epoch(FolderSplit(jpeg_dir, 16, True), epoch=1)
    halves = [_epoch(FolderSplit(jpeg_dir, 16, True), epoch=1, part=(r, 2)) for r in (0, 1)]
    assert [len(y) for _, y in halves[0]] == [2] * 5
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
