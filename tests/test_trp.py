import dataclasses
import json
import os
import signal

import pytest
import torch

from trp_edge.api import compress
from trp_edge.config import CompressConfig, DecomposeConfig, TRPConfig
from trp_edge.data import synthetic
from trp_edge.errors import InputError
from trp_edge.lowrank import energy_rank, get_scheme
from trp_edge.models import build, builtin_spec, load_model
from trp_edge.trp import Interrupted, TRPTrainer


# 60 TRP steps of ResNet-20 per scheme (about 70 s of CPU each)
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_rank_never_increases_across_tsvd_iterations(scheme):
    """Theorem 2's regime: with a small step size the rank after each projection never rises."""
    data = synthetic("1x16x16", n_train=256, classes=4)
    model = build(builtin_spec("resnet20", in_channels=1, num_classes=4))
    tr = TRPTrainer(model, data, TRPConfig(steps=60, period=5, lr=1e-3, batch=32, nuclear=3e-4),
                    DecomposeConfig(scheme=scheme, energy=0.05), progress=False)
    res = tr.train()
    assert len(res.history) == 12
    for prev, cur in zip(res.history, res.history[1:]):
        for name, k in cur["ranks"].items():
            assert k <= prev["ranks"][name], (name, prev["step"], cur["step"])
    first, last = sum(res.history[0]["ranks"].values()), sum(res.history[-1]["ranks"].values())
    assert last < first  # and it does fall


def test_nuclear_term_is_lambda_u_vt(tiny):
    data = synthetic("3x16x16", n_train=64, classes=4)
    tr = TRPTrainer(tiny, data, TRPConfig(steps=1, nuclear=0.5, batch=16), DecomposeConfig(scheme="channel"),
                    progress=False)
    for p in tiny.parameters():
        p.grad = torch.zeros_like(p)
    tr.add_nuclear_grad_(cached=False)
    w = tiny.conv3.weight.detach()
    u, s, vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
    expected = 0.5 * (u @ vh).reshape(w.shape)
    assert torch.allclose(tiny.conv3.weight.grad, expected, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (tools/gpu_trp_session.sh on a lent GPU)")
@pytest.mark.parametrize("solver", ["svd", "newton-schulz"])
def test_the_nuclear_term_on_cuda_is_the_cpus(tiny, solver):
    """TRP's nuclear term on the GPU (each solver) equals lambda * U V^T computed on the CPU."""
    data = synthetic("3x16x16", n_train=64, classes=4)
    tr = TRPTrainer(tiny, data, TRPConfig(steps=1, nuclear=0.5, batch=16, device="cuda", nuclear_solver=solver,
                                          svd_device="same"), DecomposeConfig(scheme="channel"), progress=False)
    for p in tiny.parameters():
        p.grad = torch.zeros_like(p)
    tr.add_nuclear_grad_(cached=False)
    w = tiny.conv3.weight.detach().cpu().double()
    u, _, vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
    expected = 0.5 * (u @ vh).reshape(w.shape)
    assert tiny.conv3.weight.grad.is_cuda
    assert torch.allclose(tiny.conv3.weight.grad.cpu().double(), expected, atol=1e-4)


def test_newton_schulz_gives_the_svd_polar_factor_for_every_shape_in_one_batch():
    """U V^T by matrix products, for matrices of several shapes (wide and tall) padded into one batch."""
    from trp_edge.trp_nuclear import polar_factors

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(3, 48, 96, generator=g), torch.randn(2, 96, 48, generator=g),
            torch.randn(4, 20, 20, generator=g) + 3 * torch.eye(20)]
    for m, got in zip(mats, polar_factors(mats)):
        u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
        assert got.shape == m.shape
        assert torch.allclose(got.double(), u @ vh, atol=2e-5), (got.double() - u @ vh).abs().max()


def test_newton_schulz_on_a_low_rank_matrix_is_a_nuclear_sub_gradient():
    """Right after a projection the weights are rank-deficient: on the non-zero singular directions the result is
    U_k V_k^T exactly, and no singular value of it exceeds 1 (a sub-gradient of the nuclear norm)."""
    from trp_edge.trp_nuclear import polar_factors

    g = torch.Generator().manual_seed(1)
    m = torch.randn(2, 40, 5, generator=g) @ torch.randn(2, 5, 72, generator=g)
    (got,) = polar_factors([m])
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    uk, vk = u[..., :5], vh[..., :5, :].mT
    assert torch.allclose(got.double() @ vk, uk, atol=2e-5)
    assert torch.allclose(uk.mT @ got.double(), vk.mT, atol=2e-5)
    assert torch.linalg.matrix_norm(got.double(), ord=2).max() <= 1 + 1e-4


@pytest.mark.parametrize("solver", ["svd", "newton-schulz"])
def test_the_nuclear_term_is_the_same_by_either_solver(solver):
    model = build(builtin_spec("resnet20", in_channels=1, num_classes=4))
    data = synthetic("1x16x16", n_train=64, classes=4)
    tr = TRPTrainer(model, data, TRPConfig(steps=1, batch=16, nuclear=1.0, device="cpu", nuclear_solver=solver),
                    DecomposeConfig(scheme="spatial"), progress=False)
    assert tr.nuclear_solver == solver
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tr.add_nuclear_grad_(cached=False)
    for la in tr.layers:
        m = get_scheme("spatial").to_matrix(la.module.weight.detach().double())
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        got = get_scheme("spatial").to_matrix(la.module.weight.grad.double())
        assert torch.allclose(got, u @ vh, atol=5e-5), la.name


def test_projection_keeps_the_energy_and_batches_by_shape():
    model = build(builtin_spec("resnet20", in_channels=1, num_classes=4))
    data = synthetic("1x16x16", n_train=64, classes=4)
    tr = TRPTrainer(model, data, TRPConfig(steps=1, batch=16), DecomposeConfig(scheme="spatial", energy=0.1),
                    progress=False)
    assert len(tr.groups) < len(tr.layers)  # one SVD call per distinct shape
    before = {la.name: la.module.weight.detach().clone() for la in tr.layers}
    ranks = tr.project_()
    for la in tr.layers:
        sch = get_scheme(tr.layer_scheme[la.name])
        m0 = sch.to_matrix(before[la.name])
        m1 = sch.to_matrix(la.module.weight.detach())
        assert torch.linalg.matrix_rank(m1) == ranks[la.name]
        assert (m0 - m1).norm() ** 2 <= 0.1 * m0.norm() ** 2 + 1e-6


def test_auto_truncates_each_layer_in_its_cheaper_form():
    """Without a latency table, scheme 'auto' takes per layer the form whose pair at the energy rank has fewer
    MACs, and the TSVD keeps 1-e of the energy in that form."""
    model = build(builtin_spec("resnet20", in_channels=1, num_classes=4))
    data = synthetic("1x16x16", n_train=64, classes=4)
    tr = TRPTrainer(model, data, TRPConfig(steps=1, batch=16), DecomposeConfig(scheme="auto", energy=0.3),
                    progress=False)
    before = {la.name: la.module.weight.detach().clone() for la in tr.layers}
    ranks = tr.project_()
    assert set(tr.layer_scheme.values()) == {"channel", "spatial"}  # both forms win somewhere on ResNet-20
    for la in tr.layers:
        cost = {}
        for name in ("channel", "spatial"):
            s = torch.linalg.svdvals(get_scheme(name).to_matrix(before[la.name]).double())
            cost[name] = get_scheme(name).pair_macs(la.module, la.in_hw, la.out_hw, int(energy_rank(s, 0.3)))
        chosen = tr.layer_scheme[la.name]
        assert cost[chosen] == min(cost.values()), la.name
        sch = get_scheme(chosen)
        m0, m1 = sch.to_matrix(before[la.name]), sch.to_matrix(la.module.weight.detach())
        assert torch.linalg.matrix_rank(m1) == ranks[la.name]
        assert (m0 - m1).norm() ** 2 <= 0.3 * m0.norm() ** 2 + 1e-6
    assert {g.scheme.name for g in tr.groups} == {"channel", "spatial"}  # the nuclear term follows the choice


def _cfg(out, **kw):
    return CompressConfig(model="resnet20", data="synthetic:1x16x16", out=str(out),
                          decompose=DecomposeConfig(scheme="channel", energy=0.05),
                          trp=TRPConfig(epochs=2, batch=64, lr=0.05, period=3, nuclear=3e-4, device="cpu"),
                          latency=None, **kw)


# three compresses with TRP training
@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    straight = compress(_cfg(tmp_path / "a"), progress=False)

    def stop_at_5(tr):
        if tr.step == 5:  # a real Ctrl-C: the handler lets the step finish, then checkpoints
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="--resume"):
        compress(_cfg(tmp_path / "b"), progress=False, on_step=stop_at_5)
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "model.onnx").exists()
    resumed = compress(_cfg(tmp_path / "b", resume=True), progress=False)
    a = load_model(str(tmp_path / "a")).model.state_dict()
    b = load_model(str(tmp_path / "b")).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert straight.report["trajectory"] == resumed.report["trajectory"]


# a compress with TRP training first
@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path):
    compress(_cfg(tmp_path / "a"), progress=False)
    cfg = _cfg(tmp_path / "a", resume=True)
    cfg = dataclasses.replace(cfg, trp=dataclasses.replace(cfg.trp, lr=0.1))
    with pytest.raises(InputError, match="other settings.*trp.lr"):
        compress(cfg, progress=False)


# three compresses with TRP training
@pytest.mark.slow
def test_a_python_api_checkpoint_resumes_from_the_cli(tmp_path):
    """The CLI's defaults are the config's: a run interrupted through the API goes on with `--resume`, and the
    data loader's workers (which change no number) may differ."""
    from click.testing import CliRunner

    from trp_edge.cli import main

    def stop_at_5(tr):
        if tr.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    api = CompressConfig(model="resnet20", data="synthetic:1x16x16", out=str(tmp_path / "b"), latency=None,
                         trp=TRPConfig(steps=9, batch=64, period=3))
    with pytest.raises(Interrupted):
        compress(api, progress=False, on_step=stop_at_5)
    straight = compress(dataclasses.replace(api, out=str(tmp_path / "a")), progress=False)
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16", "--steps", "9",
                                    "--batch", "64", "--period", "3", "--workers", "1", "--no-latency", "-q",
                                    "--resume", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "b" / "report.json").read_text())
    assert r["trajectory"] == straight.report.trajectory and r["training"]["steps"] == 9
