"""--finetune, --distill, --eval-every / --keep, metrics.jsonl and --amp: the loop's parts on a tiny net (fast),
and whole compress runs (slow)."""

import copy
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from trp_edge.api import compress
from trp_edge.cli import main
from trp_edge.config import DecomposeConfig, TRPConfig
from trp_edge.data import synthetic
from trp_edge.errors import Interrupted
from trp_edge.models import load_model
from trp_edge.planning import decompose_
from trp_edge.trp import TRPTrainer
from trp_edge.trp_loop import Loop, LoopOptions, distill_loss
from trp_edge.trp_metrics import MetricsLog

from .conftest import TinyNet


def _data():
    return synthetic("3x16x16", n_train=128, n_test=64, classes=4)


def test_distill_loss_by_hand():
    torch.manual_seed(0)
    s, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(s, y)
    # identical logits: KL 0, so only (1 - a) CE is left, at any temperature
    assert torch.allclose(distill_loss(s, s.clone(), y, 4.0, 0.5), 0.5 * ce)
    assert torch.allclose(distill_loss(s, s.clone(), y, 2.0, 1.0), torch.tensor(0.0), atol=1e-6)
    t = torch.randn(8, 5)
    p, q = torch.softmax(t / 2, 1), torch.softmax(s / 2, 1)  # teacher, student at T = 2
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(distill_loss(s, t, y, 2.0, 0.25), 0.75 * ce + 0.25 * 4 * kl, atol=1e-6)
    assert distill_loss(s, t, y, 2.0, 0.0).item() == pytest.approx(ce.item())


def test_finetune_trains_the_pairs_at_fixed_ranks():
    """The fine-tune is the trainer at period 0 on the decomposed model: shapes (ranks) stay, weights move."""
    data = _data()
    model = TinyNet(3, 4)
    dcfg = DecomposeConfig(scheme="channel", energy=0.2)
    decompose_(model, dcfg, data.example)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = TRPTrainer(model, data, TRPConfig(period=0, epochs=1, batch=32, device="cpu"), dcfg, progress=False)
    tr.train()
    after = model.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert any(k.startswith("conv2.") for k in after)  # the pairs: conv2 is a LowRankConv2d
    assert type(model.conv2).__name__ == "LowRankConv2d"
    assert not torch.equal(before["conv2.second.weight"], after["conv2.second.weight"])


def test_amp_bf16_on_cpu_autocasts_the_forward_and_keeps_fp32_weights():
    data = _data()
    tr = TRPTrainer(TinyNet(3, 4), data, TRPConfig(period=2, nuclear=1e-3, steps=3, batch=32, device="cpu",
                                                     amp="bf16", channels_last=True),
                    DecomposeConfig(scheme="channel", energy=0.2), progress=False)
    assert tr.loop.amp == "bf16"
    x, y = next(iter(data.train.batches(32)))
    out, loss, _ = tr._step(x, y)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert tr.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    auto = TRPTrainer(TinyNet(3, 4), data, TRPConfig(steps=1, batch=32, device="cpu"),
                      DecomposeConfig(scheme="channel"), progress=False)
    assert auto.loop.amp == "off"  # auto: off on a CPU


def test_eval_every_writes_metrics_and_keep_best_restores_the_best_epoch(tmp_path, monkeypatch):
    """Held-out top-1 at every epoch's end goes to metrics.jsonl; --keep best brings back the weights of the best
    epoch, truncated at its ranks (as they would ship), with the TRP state they were truncated at."""
    data = _data()
    scores = iter([40.0, 80.0, 60.0])
    seen = []

    def fake_evaluate(self):
        seen.append(copy.deepcopy(self.tr.model.state_dict()))
        return next(scores)

    monkeypatch.setattr(Loop, "evaluate", fake_evaluate)
    log = MetricsLog(tmp_path / "metrics.jsonl", fresh=True)
    dcfg = DecomposeConfig(scheme="channel", energy=0.1)
    tr = TRPTrainer(TinyNet(3, 4), data, TRPConfig(period=2, epochs=3, batch=32, device="cpu", eval_every=1,
                                                     keep="best"), dcfg, progress=False,
                    loop=LoopOptions(metrics=log, dense_macs=10**6))
    tr.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"], r["test_accuracy"]) for r in rows] == [("trp", 1, 40.0), ("trp", 2, 80.0),
                                                                           ("trp", 3, 60.0)]
    assert all(r["total_rank"] > 0 and r["mac_speedup"] >= 1 and r["images_per_s"] > 0 for r in rows)
    assert tr.loop.kept == {"epoch": 2, "accuracy": 80.0}
    best = seen[1]
    assert all(torch.equal(best[k], v) for k, v in tr.model.state_dict().items())
    assert tr.history[-1]["step"] <= 2 * tr.steps_per_epoch  # the TRP state of epoch 2, not 3
    ranks = tr.history[-1]["ranks"]
    m = tr.model.conv2.weight.detach().reshape(16, -1)  # the channel form of conv2
    assert torch.linalg.matrix_rank(m) <= ranks["conv2"]


@pytest.mark.parametrize("args, message", [(["--finetune", "-1"], "--finetune must be >= 0"),
                                           (["--keep", "other"], "unknown --keep 'other'"),
                                           (["--amp", "fp8"], "unknown --amp 'fp8'"),
                                           (["--keep", "best"], "pass --eval-every"),
                                           (["--distill", "0"], "temperature must be > 0")])
def test_bad_training_options_are_one_line(args, message):
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16", *args])
    assert res.exit_code == 1 and message in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_distill_without_a_value_is_temperature_4(monkeypatch):
    got = {}

    def fake(cfg, **kw):
        got["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("trp_edge.api.compress", fake)
    CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16", "--distill", "--finetune", "2"])
    assert got["cfg"].trp.distill == 4.0 and got["cfg"].trp.finetune == 2
    CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16", "--distill", "2.5"])
    assert got["cfg"].trp.distill == 2.5 and got["cfg"].trp.distill_weight == 0.5
    CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16"])
    assert got["cfg"].trp.distill is None


def _run(out, **kw):
    return compress("resnet20", data="synthetic:1x16x16", scheme="channel", target_speedup=2, batch=128,
                    out=str(out), latency=False, calibrate=False, progress=False, **kw)


# one compress (ResNet-20, 16x16): a direct TSVD fine-tuned with a teacher, in bf16
@pytest.mark.slow
def test_finetune_after_a_direct_tsvd_with_distillation_in_bf16(tmp_path):
    res = _run(tmp_path, steps=0, finetune=1, distill=4.0, eval_every=1, amp="bf16")
    r = json.loads((tmp_path / "report.json").read_text())
    ft = r["training"]["finetune"]
    assert ft["epochs"] == 1 and ft["steps"] == 4 and ft["accuracy_after"] == r["compressed"]["accuracy"]
    assert r["training"]["distill"] == {"temperature": 4.0, "weight": 0.5} and r["training"]["amp"] == "bf16"
    assert r["training"]["images_per_s"] > 0 and r["training"]["eval_images_per_s"] > 0
    assert r["onnx"]["max_abs_diff_compressed"] < 1e-3  # export validated the fine-tuned weights
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["phase"], x["epoch"]) for x in rows] == [("finetune", 1)] and rows[0]["test_accuracy"] is not None
    assert (tmp_path / "training.png").exists()
    sd = load_model(str(tmp_path)).model.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    direct = load_model(str(tmp_path)).lowrank["layers"]
    assert direct and res.report.mac_speedup == pytest.approx(2.0, rel=0.05)


# three compresses (ResNet-20, 16x16): straight, interrupted in the fine-tune, resumed
@pytest.mark.slow
def test_a_run_interrupted_in_the_finetune_resumes(tmp_path):
    straight = _run(tmp_path / "a", steps=4, period=2, finetune=2)

    def stop(tr):
        if tr.loop.opts.phase == "finetune" and tr.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="finetune.pt"):
        _run(tmp_path / "b", steps=4, period=2, finetune=2, on_step=stop)
    resumed = _run(tmp_path / "b", steps=4, period=2, finetune=2, resume=True)
    assert resumed.report.training["finetune"]["steps"] == straight.report.training["finetune"]["steps"] == 8
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_a_fraction_of_an_epoch_finetunes_that_share_of_its_steps(tmp_path):
    _run(tmp_path, steps=0, finetune=0.5)  # 512 images in batches of 128: 4 steps an epoch
    ft = json.loads((tmp_path / "report.json").read_text())["training"]["finetune"]
    assert (ft["epochs"], ft["steps"]) == (0.5, 2)
