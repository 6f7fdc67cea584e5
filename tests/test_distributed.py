"""torchrun: `python -m torch.distributed.run --nproc-per-node 2 -m trp_edge compress` on CPU (gloo) against one
process with the same global batch and seed; sharded SVDs; each rank's share of a batch; a rank that dies."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trp_edge.data import synthetic
from trp_edge.errors import ConfigError
from trp_edge.models import load_model
from trp_edge.trp_distributed import Dist, plan_chunks

ROOT = Path(__file__).resolve().parents[1]
# ResNet-20 on 512 synthetic 16x16 images, global batch 32: 16 steps an epoch, a TSVD every 5 steps
ARGS = ["resnet20", "--data", "synthetic:3x16x16", "--steps", "24", "--period", "5", "--batch", "32", "--lr", "0.01",
        "--nuclear", "3e-4", "--target-speedup", "2", "--no-calibrate", "--no-latency", "-q"]
OUTPUTS = {"checkpoint.pt", "compressed.pt", "dense.pt", "dense.onnx", "model.onnx", "report.json", "ranks.png",
           "metrics.jsonl", "training.png"}  # the training log (rank 0 alone writes it too)


def trp_edge(out: Path, ranks: int, *extra: str, env: dict | None = None, timeout: float = 300):
    """`trp-edge compress` in one process (ranks 0) or under torchrun with `ranks` workers."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks else [sys.executable]
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        full.pop(k, None)
    return subprocess.run([*launcher, "-m", "trp_edge", "compress", *ARGS, "--out", str(out), *extra], env=full,
                          capture_output=True, text=True, timeout=timeout)


def hashes(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"weights-rank{rank}.jsonl").read_text().splitlines()]


def train_loss(path: Path) -> float:
    model = load_model(str(path)).model.eval()
    data = synthetic("3x16x16")
    with torch.no_grad():
        x, y = next(data.train.batches(len(data.train)))
        return float(torch.nn.functional.cross_entropy(model(x), y))


def test_chunks_cover_every_layer_once_and_balance_the_ranks():
    sizes, costs = [6, 1, 3, 2], [10.0, 50.0, 1.0, 4.0]
    chunks = plan_chunks(sizes, costs, 2)
    for j, n in enumerate(sizes):
        covered = sorted(i for c in chunks if c.job == j for i in range(c.lo, c.hi))
        assert covered == list(range(n))
    load = [sum((c.hi - c.lo) * costs[c.job] for c in chunks if c.rank == r) for r in range(2)]
    assert max(load) <= 0.6 * sum(load)  # the 6-layer shape is cut; neither rank holds most of the work
    assert plan_chunks(sizes, costs, 2) == chunks  # every rank plans the same


def test_one_process_runs_every_job_itself():
    out = Dist().spread([2, 3], [1.0, 1.0], lambda cs: [(torch.full((c.hi - c.lo,), float(c.job)),) for c in cs],
                        lambda c: [(c.hi - c.lo,)], torch.device("cpu"), torch.float32)
    assert [t.tolist() for (t,) in out] == [[0.0, 0.0], [1.0, 1.0, 1.0]]


def test_each_rank_takes_its_share_of_the_global_batch():
    split = synthetic("3x8x8", n_train=64).train
    whole = list(split.batches(16, epoch=1, seed=3, shuffle=True))
    parts = [list(split.batches(16, epoch=1, seed=3, shuffle=True, part=(r, 2))) for r in range(2)]
    for i, (x, y) in enumerate(whole):  # augmented as in the whole batch, interleaved as DistributedSampler does
        assert torch.equal(torch.stack([parts[0][i][0], parts[1][i][0]], 1).flatten(0, 1), x)
        assert torch.equal(torch.stack([parts[0][i][1], parts[1][i][1]], 1).flatten(0, 1), y)
    with pytest.raises(ConfigError, match="--batch 33 is the global batch"):
        Dist(0, 2).check_batch(33)


@pytest.mark.slow
def test_two_ranks_train_as_one_process_and_only_rank_0_writes(tmp_path):
    runs = {}
    for ranks in (0, 2):
        dbg = tmp_path / f"debug{ranks}"
        dbg.mkdir()
        res = trp_edge(tmp_path / f"out{ranks}", ranks, env={"TRP_EDGE_DEBUG_DIR": str(dbg)})
        assert res.returncode == 0, res.stderr[-2000:]
        runs[ranks] = json.loads((tmp_path / f"out{ranks}" / "report.json").read_text())
    one, two = runs[0]["trajectory"], runs[2]["trajectory"]
    assert [e["step"] for e in two] == [e["step"] for e in one] == [0, 5, 10, 15, 20, 24]
    for a, b in zip(one, two):  # the same ranks after every projection
        assert a["ranks"] == b["ranks"], a["step"]
    # the weights of both ranks agree after every projection (and the first equals one process's: same init)
    r0, r1 = hashes(tmp_path / "debug2", 0), hashes(tmp_path / "debug2", 1)
    assert [h["step"] for h in r0] == [0, 5, 10, 15, 20, 24] and r0 == r1
    assert r0[0]["sha256"] == hashes(tmp_path / "debug0", 0)[0]["sha256"]
    # only rank 0 wrote: the same files as one process, nothing else
    assert {p.name for p in (tmp_path / "out2").iterdir()} == {p.name for p in (tmp_path / "out0").iterdir()} \
        == OUTPUTS
    # the loss of the trained (dense) weights on the training set: batch-norm statistics over half batches make
    # the two runs differ slightly, within 5 %
    a, b = train_loss(tmp_path / "out0" / "dense.pt"), train_loss(tmp_path / "out2" / "dense.pt")
    assert abs(a - b) <= 0.05 * a, (a, b)
    # metrics.jsonl splits the sharded SVDs' broadcasts out as comm_ms: none in one process, some on two ranks
    comm = {r: [json.loads(x)["comm_ms"] for x in (tmp_path / f"out{r}" / "metrics.jsonl").read_text().splitlines()]
            for r in (0, 2)}
    assert set(comm[0]) == {0.0} and all(c > 0 for c in comm[2])


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(2, 0), (0, 2)])
def test_a_killed_rank_ends_the_job_and_its_checkpoint_resumes_at_another_world_size(tmp_path, first, then):
    out = tmp_path / "out"
    kill = {"TRP_EDGE_TEST_KILL_RANK": "1" if first else "0", "TRP_EDGE_TEST_KILL_STEP": "20"}
    res = trp_edge(out, first, env=kill, timeout=240)  # a hang fails here, at the timeout
    assert res.returncode != 0
    if first:  # the surviving rank says so, in one line
        lines = [ln for ln in res.stderr.splitlines() if re.match(r"Error: rank \d+:", ln)]
        assert len(lines) == 1 and lines[0].startswith("Error: rank 0: "), res.stderr[-2000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # the end of epoch 1, intact
    assert state["step"] == 16 and state["epoch"] == 1
    assert not any(k.startswith("module.") for k in state["model"])
    assert not (out / "report.json").exists()
    res = trp_edge(out, then, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 24
    assert [e["step"] for e in report["trajectory"]] == [0, 5, 10, 15, 20, 24]
