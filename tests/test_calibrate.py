"""trp-edge calibrate: a latency table per layer, scheme and rank; a table for another target, runtime or
shape is refused."""

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from trp_edge.backends import capabilities
from trp_edge.cli import main
from trp_edge.errors import InputError
from trp_edge.latency_table import load_table, stale
from trp_edge.models import load_model
from trp_edge.workflows.calibrate import rank_grid


def test_rank_grid_stays_below_break_even():
    assert rank_grid(48, 48) == [1, 2, 4, 8, 16, 24, 32, 48]
    assert rank_grid(64, 40) == [1, 2, 4, 8, 16, 24, 32, 40]  # the break-even rank itself is measured
    assert rank_grid(3, 3) == [1, 2, 3]


@pytest.mark.slow
def test_calibrate_writes_a_table_and_refuses_a_mismatch(tmp_path):
    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--local", "--model", "resnet20", "--input-size",
                                    "16", "--threads", "1", "--out", str(tmp_path / "cal"), "-q"])
    assert res.exit_code == 0, res.output
    table = tmp_path / "cal" / "host" / "ort" / "resnet20.csv"
    rows = list(csv.DictReader(table.open()))
    layers = {r["layer"] for r in rows}
    assert "layer1.0.conv1" in layers and {"dense", "channel", "spatial"} <= {r["scheme"] for r in rows}
    for r in rows:
        assert float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"]) and int(r["runs"]) >= 9
        assert (r["scheme"] in ("dense", "call")) == (r["rank"] == "0")
    t = load_table(table, target="host", runtime="ort")
    assert t.latency("layer1.0.conv1", "dense", 0) > 0 and t.header["input_shape"] == [1, 3, 16, 16]
    with pytest.raises(InputError, match="measured on target host, not rpi4"):
        load_table(table, target="rpi4")
    with pytest.raises(InputError, match="measured with ort, not tvm"):
        load_table(table, runtime="tvm")
    other = {n: s.replace("x16x16", "x32x32") for n, s in t.header["layers"].items()}
    with pytest.raises(InputError, match="stale or for another model"):
        load_table(table, layers=other)


def test_calibrate_needs_local_on_a_native_target_or_a_connection(monkeypatch):
    monkeypatch.delenv("TRP_EDGE_TRACKER", raising=False)
    monkeypatch.delenv("TRP_EDGE_RPC", raising=False)
    res = CliRunner().invoke(main, ["calibrate", "--target", "rpi4", "--local", "--model", "resnet20"])
    assert res.exit_code == 1 and "not rpi4" in res.output
    res = CliRunner().invoke(main, ["calibrate", "--model", "resnet20"])
    assert res.exit_code == 1 and "cannot open a session" in res.output and "with --local" in res.output


# Slow: the tests that measure a latency table (the `table` fixture is about 30 s of CPU, paid by whichever of its
# users runs first) or compress ResNet-20 against one (up to 40 s of CPU each, one core). The rest are unit tests of
# the grid, the rounding and the lowering.
@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal")
    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--local", "--model", "resnet20", "--input-size",
                                    "16", "--threads", "1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out / "host" / "ort" / "resnet20.csv"


@pytest.mark.slow
def test_calibrate_over_rpc_measures_the_same_grid(table, server, tmp_path):
    """The device side runs in `trp-edge serve` (a real RPC server on 127.0.0.1), one layer per call."""
    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--host", "127.0.0.1", "--port", str(server),
                                    "--model", "resnet20", "--input-size", "16", "--threads", "1", "--schemes",
                                    "spatial", "--out", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    remote = load_table(tmp_path / "host" / "ort" / "resnet20.csv", target="host", runtime="ort")
    local = load_table(table)
    assert remote.header["transport"].startswith("rpc (127.0.0.1") and local.header["transport"] == "local"
    assert remote.header["layers"] == local.header["layers"]
    assert {(r["layer"], r["scheme"], r["rank"]) for r in remote.rows} == \
        {(r["layer"], r["scheme"], r["rank"]) for r in local.rows if r["scheme"] != "channel"}
    assert remote.header["device"]["runtimes"]["onnxruntime"]
    assert all(r["median_ms"] > 0 and r["runs"] >= 9 for r in remote.rows)
    assert remote.header["in_net"] is True  # the whole nets went over RPC too (device job in_net)


def rewrite(src, dst, fn):
    rows = list(csv.DictReader(src.open()))
    for r in rows:
        r["median_ms"] = str(fn(r))
    with dst.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    dst.with_suffix(".json").write_text(src.with_suffix(".json").read_text())


def compress(tmp_path, table_path, name, scheme="spatial"):
    res = CliRunner().invoke(main, ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--energy", "0.3",
                                    "--scheme", scheme, "--latency-table", str(table_path), "--out",
                                    str(tmp_path / name), "--no-latency", "-q"])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / name / "report.json").read_text())


def mixed(r):
    """layer1.0.conv1: the channel pair is fastest; layer1.0.conv2: dense is; elsewhere the spatial pair."""
    fast = {"layer1.0.conv1": "channel", "layer1.0.conv2": "dense"}.get(r["layer"], "spatial")
    return 0.001 if r["scheme"] == fast else 10.0 if r["scheme"] == "dense" else 1.0


@pytest.mark.slow
def test_auto_takes_the_fastest_form_per_layer(table, tmp_path):
    t = tmp_path / "mixed.csv"
    rewrite(table, t, mixed)
    rep = compress(tmp_path, t, "auto", scheme="auto")
    layers = {la["name"]: la for la in rep["layers"]}
    assert layers["layer1.0.conv1"]["scheme"] == "channel" and layers["layer1.0.conv1"]["rank"] is not None
    assert layers["layer1.0.conv2"]["rank"] is None and layers["layer1.0.conv2"]["reason"].startswith("calibrated")
    assert layers["layer2.0.conv2"]["scheme"] == "spatial" and layers["layer2.0.conv2"]["rank"] is not None
    for la in rep["layers"]:
        if la["rank"] is not None:
            assert la["kept_energy"] >= 1 - 0.3 - 1e-9
    assert rep["onnx"]["max_abs_diff"] < 1e-4
    spec = load_model(str(tmp_path / "auto" / "compressed.pt")).lowrank  # both forms in one model, rebuilt
    assert {la["scheme"] for la in spec["layers"].values()} == {"channel", "spatial"}


@pytest.mark.slow
def test_auto_needs_a_table_of_both_schemes(table, tmp_path):
    t = tmp_path / "spatial.csv"
    rewrite(table, t, lambda r: float(r["median_ms"]))
    head = json.loads(t.with_suffix(".json").read_text())
    t.with_suffix(".json").write_text(json.dumps({**head, "schemes": ["spatial"]}))
    res = CliRunner().invoke(main, ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--scheme", "auto",
                                    "--latency-table", str(t), "--out", str(tmp_path / "x"), "--no-latency"])
    assert res.exit_code == 1 and "not channel" in res.output and "--schemes channel,spatial" in res.output


@pytest.mark.slow
def test_trp_with_auto_decomposes_in_the_forms_of_its_last_tsvd(table, tmp_path):
    t = tmp_path / "mixed.csv"
    rewrite(table, t, mixed)
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:3x16x16", "--steps", "8", "--period",
                                    "4", "--batch", "16", "--energy", "0.3", "--scheme", "auto", "--nuclear", "1e-3",
                                    "--latency-table", str(t), "--out", str(tmp_path / "trp"), "--no-latency"])
    assert res.exit_code == 0, res.output
    assert "auto (channel 1, spatial" in res.output and "dense" in res.output
    rep = json.loads((tmp_path / "trp" / "report.json").read_text())
    last = rep["trajectory"][-1]
    assert last["final"] and last["schemes"]["layer1.0.conv1"] == "channel"
    for la in rep["layers"]:
        if la["rank"] is not None:
            assert la["scheme"] == last["schemes"][la["name"]] and la["rank"] == last["ranks"][la["name"]]
    assert rep["compressed"]["accuracy"] == rep["dense"]["accuracy"]  # exact: TRP ended on these low-rank forms
    # dense is fastest for layer1.0.conv2: TRP still truncates it at every TSVD, the decomposition keeps it dense
    slow = next(la for la in rep["layers"] if la["name"] == "layer1.0.conv2")
    assert slow["rank"] is None and slow["reason"].startswith("calibrated")
    full = {"channel": 16, "spatial": 48}  # 16 -> 16 channels, 3x3: 16 x 144 and 48 x 48 matrices
    assert all(step["ranks"]["layer1.0.conv2"] < full[step["schemes"]["layer1.0.conv2"]] for step in rep["trajectory"])


@pytest.mark.slow
def test_rank_rounding_never_keeps_less_energy(table, tmp_path):
    # a table where the largest measured rank is always the fastest pair: every rank moves up
    t = tmp_path / "up.csv"
    rewrite(table, t, lambda r: 10.0 if r["scheme"] == "dense" else 1.0 / (1 + int(r["rank"])))
    rep = compress(tmp_path, t, "up")
    moved = [la for la in rep["layers"] if la["rank"] is not None and la["planned_rank"] is not None]
    assert moved and any(la["rank"] > la["planned_rank"] for la in moved)
    for la in moved:
        assert la["rank"] >= la["planned_rank"] == la["energy_rank"]
        assert la["kept_energy"] >= 1 - 0.3 - 1e-9
        assert la["rank"] == la["planned_rank"] or la["predicted_ms"] is not None
    assert rep["onnx"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_guard_keeps_a_layer_dense_when_the_table_says_dense_is_faster(table, tmp_path):
    t = tmp_path / "slow.csv"
    slow = "layer1.0.conv1"
    rewrite(table, t, lambda r: (0.001 if r["scheme"] == "dense" else 1.0) if r["layer"] == slow
            else (10.0 if r["scheme"] == "dense" else 1.0))
    rep = compress(tmp_path, t, "guard")
    layers = {la["name"]: la for la in rep["layers"]}
    assert layers[slow]["rank"] is None and layers[slow]["reason"].startswith("calibrated:")
    assert layers["layer1.0.conv2"]["rank"] is not None


@pytest.mark.slow
def test_a_table_for_another_shape_is_refused(table, tmp_path):
    res = CliRunner().invoke(main, ["compress", "resnet20", "--input-size", "32", "--steps", "0", "--scheme", "spatial",
                                    "--latency-table", str(table), "--out", str(tmp_path / "x"), "--no-latency"])
    assert res.exit_code == 1 and "stale or for another model" in res.output
    assert not (tmp_path / "x" / "report.json").exists()


@pytest.mark.slow
def test_trp_rounds_every_tsvd_to_the_table(table, tmp_path):
    t = tmp_path / "up.csv"
    rewrite(table, t, lambda r: 10.0 if r["scheme"] == "dense" else 1.0 / (1 + int(r["rank"])))
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:3x16x16", "--steps", "8", "--period",
                                    "4", "--batch", "16", "--energy", "0.3", "--scheme", "spatial", "--latency-table",
                                    str(t), "--out", str(tmp_path / "trp"), "--no-latency", "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "trp" / "report.json").read_text())
    tab = load_table(t)
    moved = 0
    for step in rep["trajectory"]:  # every projection kept a measured rank, unless none was measured above it
        for name, k in step["ranks"].items():
            measured = tab.ranks(name, "spatial")
            full = next(la["full_rank"] for la in rep["layers"] if la["name"] == name)
            assert k in measured or k == full or not any(r >= k for r in measured), (step["step"], name, k)
            moved += k in measured
    assert moved > 0
    assert rep["compressed"]["accuracy"] == rep["dense"]["accuracy"]  # the decomposition is still exact


@pytest.mark.slow
def test_trp_reaches_the_target_speedup_on_the_plan_it_ships(table, tmp_path):
    """With a table that keeps the first stage dense, TRP's energy is chosen on the guarded plan: the shipped
    model has the asked MAC speedup, not only the plan trained on."""
    t = tmp_path / "guarded.csv"
    rewrite(table, t, lambda r: (0.001 if r["scheme"] == "dense" else 1.0) if r["layer"].startswith("layer1.")
            else (10.0 if r["scheme"] == "dense" else 0.01 * (1 + int(r["rank"]))))
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:3x16x16", "--steps", "8", "--period",
                                    "4", "--batch", "16", "--scheme", "spatial", "--target-speedup", "2",
                                    "--latency-table", str(t), "--out", str(tmp_path / "trp"), "--no-latency", "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "trp" / "report.json").read_text())
    assert all(la["rank"] is None for la in rep["layers"] if la["name"].startswith("layer1."))
    assert rep["mac_speedup"] >= 1.99 and rep["allocate"] == "latency"  # TRP trained toward the allocated ranks
    assert rep["compressed"]["accuracy"] == rep["dense"]["accuracy"]


def test_latency_rank_rounds_up_only_to_a_pair_faster_than_dense():
    from trp_edge.latency_table import LatencyTable
    from trp_edge.planning_latency import latency_rank

    ms = {0: 1.0, 8: 0.4, 16: 0.4, 23: 1.2}  # rank 0: the dense conv; 23 is slower than dense
    rows = [{"layer": "c", "scheme": "dense" if r == 0 else "spatial", "rank": r, "median_ms": v}
            for r, v in ms.items()]
    t = LatencyTable({}, rows)
    assert latency_rank(t, "c", "spatial", 5, 48) == (8, 0.4)  # the fastest rank >= 5; a tie goes to the lower
    assert latency_rank(t, "c", "spatial", 17, 48) == (None, 1.0)  # the guard: dense
    assert latency_rank(t, "c", "spatial", 17, 48, guard=False) == (17, None)  # training: keep the energy rank
    assert latency_rank(t, "c", "spatial", 30, 48) == (30, None)  # nothing measured at or above 30


@pytest.mark.slow
def test_a_table_for_another_precision_or_thread_count_is_refused(table, tmp_path):
    t = load_table(table, precision="fp32", threads=1)
    assert t.header["precision"] == "fp32" and t.header["net_ms"] > 0
    with pytest.raises(InputError, match="measured at fp32, not int8"):
        load_table(table, precision="int8")
    with pytest.raises(InputError, match=r"measured at 1 thread\(s\), not 2"):
        load_table(table, threads=2)
    for flags, msg in ((["--threads", "2"], "not 2: calibrate with --threads 2"),
                       (["--precision", "int8"], "not int8: calibrate with --precision int8")):
        res = CliRunner().invoke(main, ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--latency-table",
                                        str(table), *flags, "--out", str(tmp_path / "x"), "--no-latency"])
        assert res.exit_code == 1 and msg in res.output, res.output
        assert not (tmp_path / "x" / "report.json").exists()


@pytest.mark.slow
def test_every_layer_of_a_shape_is_measured_once_alone_then_each_in_place(table):
    t = load_table(table)
    same = [n for n, s in t.header["layers"].items() if s == t.header["layers"]["layer1.0.conv1"]]
    assert len(same) > 1  # resnet20's stage 1: six 16->16 convs of one shape
    rows = {n: {(r["scheme"], r["rank"]): r["median_ms"] for r in t.rows if r["layer"] == n} for n in same}
    assert all(rows[n].keys() == rows[same[0]].keys() for n in same)
    assert len({rows[n][("call", 0)] for n in same}) == 1  # the per-call overhead: one model, timed once
    # ORT's convs and pairs are timed in place: each layer in the whole net, its kernels summed and scaled to
    # the net's timed latency, so the dense convs together take less than the dense net
    assert t.header["in_net"] is True
    dense = [t.dense(n) for n in t.header["layers"]]
    assert all(d > 0 for d in dense) and sum(dense) < t.header["net_ms"]


@pytest.mark.slow
def test_default_compress_picks_up_the_deployment_table(table, tmp_path, monkeypatch):
    cal = tmp_path / "cal"
    dst = cal / "host" / "ort" / "resnet20.csv"
    dst.parent.mkdir(parents=True)
    for suffix in (".csv", ".json"):
        dst.with_suffix(suffix).write_bytes(table.with_suffix(suffix).read_bytes())
    before = dst.stat().st_mtime_ns
    monkeypatch.setenv("TRP_EDGE_CALIBRATION", str(cal))
    res = CliRunner().invoke(main, ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--energy", "0.3",
                                    "--scheme", "spatial", "--out", str(tmp_path / "c"), "--no-latency"])
    assert res.exit_code == 0, res.output
    assert f"ranks from latency table {dst}" in res.output and "predicted for host/ort fp32" in res.output
    assert dst.stat().st_mtime_ns == before  # found and fresh: not measured again
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert rep["config"]["decompose"]["latency_table"] == str(dst)
    assert rep["config"]["target"] == "host" and rep["config"]["threads"] == 1
    (pred,) = rep["predictions"]
    assert pred["runtime"] == "ort" and pred["precision"] == "fp32" and pred["compressed_ms"] < pred["dense_ms"]
    # every decomposed layer's pair is faster than its dense conv in the table (the guard, by default)
    tab = load_table(dst)
    for la in rep["layers"]:
        if la["rank"] is not None:
            assert tab.latency(la["name"], la["scheme"], la["rank"]) < tab.dense(la["name"])


@pytest.mark.slow
def test_compress_measures_a_missing_table_first_unless_told_not_to(tiny, tmp_path, monkeypatch):
    import torch

    cal = tmp_path / "cal"
    monkeypatch.setenv("TRP_EDGE_CALIBRATION", str(cal))
    model = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(tiny.eval(), (torch.zeros(2, 3, 16, 16),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), model)
    args = ["compress", str(model), "--steps", "0", "--energy", "0.3", "--out", str(tmp_path / "c"), "--no-latency",
            "--force"]
    res = CliRunner().invoke(main, [*args, "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert "ranks are MAC-based" in res.output and not cal.exists()
    res = CliRunner().invoke(main, [*args, "--runtime", "ort", "--precision", "fp32,int8"])
    assert res.exit_code == 0, res.output
    made = sorted(p.name for p in (cal / "host" / "ort").glob("*.csv"))
    assert made == ["tiny-int8.csv", "tiny.csv"]
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert {p["precision"] for p in rep["predictions"]} == {"fp32", "int8"}
    int8 = load_table(cal / "host" / "ort" / "tiny-int8.csv").header
    assert int8["precision"] == "int8" and int8["in_net"] is True  # QDQ whole nets keep the layers' tags


@pytest.mark.slow
def test_int8_keeps_dense_the_pairs_slower_there_without_vetoing_fp32(table, tmp_path, monkeypatch):
    """Compressed for fp32 and INT8: ranks come from the fp32 table; a pair slower than dense in INT8 (here
    layer1.0.conv1's) stays a pair for fp32 and is merged back into one conv in the INT8 builds' model."""
    import onnx
    import torch

    cal = tmp_path / "cal"
    fp32, int8 = cal / "host" / "ort" / "resnet20.csv", cal / "host" / "ort" / "resnet20-int8.csv"
    fp32.parent.mkdir(parents=True)
    slow = "layer1.0.conv1"
    rewrite(table, fp32, lambda r: 10.0 if r["scheme"] == "dense" else 1.0)
    rewrite(table, int8, lambda r: (0.001 if r["scheme"] == "dense" else 1.0) if r["layer"] == slow
            else (10.0 if r["scheme"] == "dense" else 1.0))
    header = {**json.loads(fp32.with_suffix(".json").read_text()), "net_ms": 1000.0}  # the net as its 10 ms convs
    fp32.with_suffix(".json").write_text(json.dumps(header))
    int8.with_suffix(".json").write_text(json.dumps({**header, "precision": "int8"}))
    monkeypatch.setenv("TRP_EDGE_CALIBRATION", str(cal))
    args = ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--energy", "0.3", "--scheme", "spatial",
            "--runtime", "ort", "--precision", "fp32,int8", "--out", str(tmp_path / "c"), "--no-latency", "--force"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "INT8 builds keep 1 of the" in res.output
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    layers = {la["name"]: la for la in rep["layers"]}
    assert layers[slow]["rank"] is not None  # INT8 did not veto the fp32 pair
    p = rep["precisions"]["int8"]
    assert p["dense_layers"] == [slow] and p["onnx"] == "model-int8.onnx" and p["model"] == "compressed-int8.pt"
    assert rep["compressed"]["macs"] < p["macs"] < rep["dense"]["macs"]
    pred = {x["precision"]: x for x in rep["predictions"]}
    n = sum(la["rank"] is not None for la in rep["layers"])  # each pair saves 9 ms in both tables, but slow's INT8
    assert pred["fp32"]["compressed_ms"] == pytest.approx(pred["fp32"]["dense_ms"] - 9.0 * n)
    assert pred["int8"]["compressed_ms"] == pytest.approx(pred["int8"]["dense_ms"] - 9.0 * (n - 1))
    # the INT8 model is the compressed one with that pair merged back: the same function
    comp, merged = (load_model(str(tmp_path / "c" / f)).model.eval() for f in ("compressed.pt", "compressed-int8.pt"))
    assert isinstance(merged.get_submodule(slow), torch.nn.Conv2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), comp(x), rtol=1e-4, atol=1e-4)
    n_conv = {f: sum(n.op_type == "Conv" for n in onnx.load(str(tmp_path / "c" / f)).graph.node)
              for f in ("model.onnx", "model-int8.onnx")}
    assert n_conv["model-int8.onnx"] == n_conv["model.onnx"] - 1
    # INT8 artifacts are built from it, and the INT8 report counts its MACs
    res = CliRunner().invoke(main, ["build", str(tmp_path / "c"), "--target", "host", "--runtime", "ort,tflite", "-q"])
    assert res.exit_code == 0, res.output
    for rt, source in (("ort", "model-int8.onnx"), ("tflite", "compressed-int8.pt")):
        folder = tmp_path / "c" / "build" / "host" / rt
        m = json.loads((folder / "manifest.json").read_text())
        q = next(a for a in m["artifacts"] if a["variant"] == "compressed" and a["precision"] == "int8")
        assert q["source"] == source and q["macs"] == p["macs"] and q["validation"]["status"] == "passed"
        assert sorted(f.name for f in folder.iterdir() if "int8" in f.name) == sorted(
            f"{v}.int8.{'onnx' if rt == 'ort' else 'tflite'}" for v in ("compressed", "dense"))
    # compressed again with an INT8 table where every pair is faster: no INT8 model, the old one removed
    rewrite(fp32, int8, lambda r: 10.0 if r["scheme"] == "dense" else 1.0)
    int8.with_suffix(".json").write_text(json.dumps({**json.loads(fp32.with_suffix(".json").read_text()),
                                                     "precision": "int8"}))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "report.json").read_text())["precisions"] is None
    assert not (tmp_path / "c" / "model-int8.onnx").exists() and not (tmp_path / "c" / "compressed-int8.pt").exists()


@pytest.mark.slow
def test_int8_models_per_runtime_when_their_tables_disagree(table, tmp_path, monkeypatch):
    """A pair slower than dense in ORT's INT8 table but faster in TFLite's: ORT's INT8 builds get a model of
    their own with it merged back, TFLite's quantize the compressed model as it is (no veto across runtimes);
    a build is reused while its sources are unchanged and rebuilt when ORT's INT8 model changes."""
    from trp_edge.config import DeployConfig
    from trp_edge.targets import load_target
    from trp_edge.workflows.deploy import ensure_built

    cal, header = tmp_path / "cal", {**json.loads(table.with_suffix(".json").read_text()), "net_ms": 1000.0}

    def tables(slow: str) -> None:
        for rt in ("ort", "tflite"):
            for prec in ("fp32", "int8"):
                path = cal / "host" / rt / f"resnet20{'-int8' if prec == 'int8' else ''}.csv"
                path.parent.mkdir(parents=True, exist_ok=True)
                veto = slow if rt == "ort" and prec == "int8" else None
                rewrite(table, path, lambda r, veto=veto: 1.0 if r["scheme"] != "dense" else
                        0.001 if r["layer"] == veto else 10.0)
                path.with_suffix(".json").write_text(json.dumps({**header, "runtime": rt, "precision": prec}))

    tables("layer1.0.conv1")
    monkeypatch.setenv("TRP_EDGE_CALIBRATION", str(cal))
    out = tmp_path / "c"
    args = ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--energy", "0.3", "--scheme", "spatial",
            "--runtime", "ort,tflite", "--precision", "fp32,int8", "--out", str(out), "--no-latency", "--force"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "INT8 ort builds keep 1 of the" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["precisions"]) == ["int8/ort"]
    own = rep["precisions"]["int8/ort"]
    assert own["dense_layers"] == ["layer1.0.conv1"] and own["onnx"] == "model-int8-ort.onnx"
    assert own["model"] == "compressed-int8-ort.pt" and not (out / "model-int8.onnx").exists()
    n = sum(la["rank"] is not None for la in rep["layers"])
    pred = {(x["runtime"], x["precision"]): x for x in rep["predictions"]}
    assert pred["tflite", "int8"]["compressed_ms"] == pytest.approx(pred["tflite", "int8"]["dense_ms"] - 9.0 * n)
    assert pred["ort", "int8"]["compressed_ms"] == pytest.approx(pred["ort", "int8"]["dense_ms"] - 9.0 * (n - 1))
    res = CliRunner().invoke(main, ["build", str(out), "--target", "host", "--runtime", "ort,tflite", "-q"])
    assert res.exit_code == 0, res.output
    quantized = {}
    for rt in ("ort", "tflite"):
        m = json.loads((out / "build" / "host" / rt / "manifest.json").read_text())
        quantized[rt] = next(a for a in m["artifacts"] if a["variant"] == "compressed" and a["precision"] == "int8")
    assert quantized["ort"]["source"] == "model-int8-ort.onnx" and quantized["ort"]["macs"] == own["macs"]
    assert "source" not in quantized["tflite"] and quantized["tflite"]["validation"]["status"] == "passed"

    manifest = out / "build" / "host" / "ort" / "manifest.json"
    built = manifest.read_text()
    cfg, host = DeployConfig(target="host", local=True), load_target("host")
    ensure_built(out, host, "ort", cfg, int8=True)
    assert manifest.read_text() == built  # reused: the same sources
    tables("layer1.0.conv2")  # ORT's INT8 model changes, the fp32 ones do not
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["precisions"]["int8/ort"]["dense_layers"] == ["layer1.0.conv2"]
    ensure_built(out, host, "ort", cfg, int8=True)
    assert manifest.read_text() != built


@pytest.mark.slow
def test_int8_whole_net_measured_slower_keeps_every_pair_dense_for_that_runtime_only(table, tmp_path, monkeypatch):
    """Every table says every pair is faster; compress then times the whole INT8 nets of each runtime here (ORT
    QDQ, TFLite converted), and where the compressed one is not faster, that runtime's INT8 builds get a model
    with every pair merged back. The nets are really built and timed; the speedups the decision reads are set by
    the test: both at 1.00x (not faster: both keep every pair dense), then ORT's at 0.90x and TFLite's at 1.10x."""
    import trp_edge.profile

    cal, header = tmp_path / "cal", {**json.loads(table.with_suffix(".json").read_text()), "net_ms": 1000.0}
    for rt in ("ort", "tflite"):
        for prec in ("fp32", "int8"):
            path = cal / "host" / rt / f"resnet20{'-int8' if prec == 'int8' else ''}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            rewrite(table, path, lambda r: 10.0 if r["scheme"] == "dense" else 1.0)
            path.with_suffix(".json").write_text(json.dumps({**header, "runtime": rt, "precision": prec}))
    monkeypatch.setenv("TRP_EDGE_CALIBRATION", str(cal))
    out = tmp_path / "c"
    args = ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--energy", "0.3", "--scheme", "spatial",
            "--runtime", "ort,tflite", "--precision", "fp32,int8", "--out", str(out), "--force"]

    def compressed(res):
        assert res.exit_code == 0, res.output
        rep = json.loads((out / "report.json").read_text())
        assert not list(out.glob(".*"))  # the check's files are gone
        return rep, [la["name"] for la in rep["layers"] if la["rank"] is not None], rep["latency"]["int8"]

    real = trp_edge.profile.time_pair

    def timed_at(speedups):
        """The real time_pair, with the whole INT8 nets' speedup replaced by `speedups`[runtime]."""
        def time_pair(backend, dense, comp, shape, cfg):
            t = real(backend, dense, comp, shape, cfg)
            rt = backend.__name__.rpartition(".")[2]
            return {**t, "latency_speedup": speedups[rt]} if ".int8." in str(comp) else t
        return time_pair

    monkeypatch.setattr(trp_edge.profile, "time_pair", timed_at({"ort": 1.0, "tflite": 1.0}))
    rep, pairs, checked = compressed(CliRunner().invoke(main, args))
    assert sorted(checked) == ["ort", "tflite"] and pairs
    for q in checked.values():
        assert q["dense"]["median_ms"] > 0 and q["compressed"]["median_ms"] > 0 and q["threads"] == 1
        assert q["kept_dense"] and q["latency_speedup"] == 1.0  # not faster: kept dense
    assert {k: p["dense_layers"] for k, p in rep["precisions"].items()} == {"int8": pairs}  # one model for both

    monkeypatch.setattr(trp_edge.profile, "time_pair", timed_at({"ort": 0.9, "tflite": 1.1}))
    res = CliRunner().invoke(main, args)
    rep, pairs, checked = compressed(res)
    assert checked["ort"]["kept_dense"] and not checked["tflite"]["kept_dense"]
    assert "ort INT8 here" in res.output and "its INT8 builds keep every pair dense" in res.output
    assert list(rep["precisions"]) == ["int8/ort"] and rep["precisions"]["int8/ort"]["dense_layers"] == pairs
    assert rep["precisions"]["int8/ort"]["mac_speedup"] == pytest.approx(1.0)


@pytest.mark.slow
def test_a_table_of_another_machine_is_kept_and_this_machines_measured_beside_it(tiny, tmp_path, monkeypatch):
    import torch

    from trp_edge.device.bench import device_identity
    from trp_edge.latency_table import cpu_slug

    cal = tmp_path / "cal"
    monkeypatch.setenv("TRP_EDGE_CALIBRATION", str(cal))
    model = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(tiny.eval(), (torch.zeros(1, 3, 16, 16),)), model)
    args = ["compress", str(model), "--steps", "0", "--energy", "0.3", "--out", str(tmp_path / "c"), "--no-latency",
            "--force", "--runtime", "ort"]
    theirs = cal / "host" / "ort" / "tiny.json"
    res = CliRunner().invoke(main, args)  # this machine's table, measured at the deployment's path
    assert res.exit_code == 0, res.output
    header = json.loads(theirs.read_text())
    header["device"] = {**header["device"], "cpu": "Some Other CPU", "cores": 64}
    theirs.write_text(json.dumps(header))  # now it is another machine's table
    kept = {p: p.read_bytes() for p in (theirs, theirs.with_suffix(".csv"))}

    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    mine = cal / "host" / "ort" / cpu_slug(device_identity()) / "tiny.csv"
    assert "none for this machine yet" in res.output and "Some Other CPU" in res.output
    assert all(p.read_bytes() == b for p, b in kept.items())  # the other machine's table is untouched
    assert load_table(mine).header["device"]["cpu"] == device_identity()["cpu"]
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert rep["config"]["decompose"]["latency_table"] == str(mine)

    before = mine.stat().st_mtime_ns
    res = CliRunner().invoke(main, args)  # found beside the other machine's: not measured again
    assert res.exit_code == 0, res.output
    assert "calibrating" not in res.output and mine.stat().st_mtime_ns == before
    assert f"ranks from latency table {mine}" in res.output

    # `trp-edge calibrate` itself writes this machine's table beside the other machine's too
    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--local", "--model", str(model), "--runtime",
                                    "ort", "--out", str(cal), "-q"])
    assert res.exit_code == 0, res.output
    assert all(p.read_bytes() == b for p, b in kept.items()) and mine.stat().st_mtime_ns > before


@pytest.mark.slow
def test_tvm_tables_compile_one_library_per_layer_shape_and_compress_reads_them(table, server, tmp_path):
    """TVM's grid over RPC on loopback: each layer shape's variants are the functions of one library (lowered as
    the untuned build lowers a model); compress --runtime tvm plans with that table. INT8 is not TVM's."""
    cal = tmp_path / "cal"
    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--host", "127.0.0.1", "--port", str(server),
                                    "--model", "resnet20", "--input-size", "16", "--threads", "1", "--schemes",
                                    "spatial", "--runtime", "tvm", "--out", str(cal), "-q"])
    assert res.exit_code == 0, res.output
    tvm_table = load_table(cal / "host" / "tvm" / "resnet20.csv", target="host", runtime="tvm", precision="fp32")
    assert {(r["layer"], r["scheme"], r["rank"]) for r in tvm_table.rows} == \
        {(r["layer"], r["scheme"], r["rank"]) for r in load_table(table).rows if r["scheme"] != "channel"}
    assert all(r["median_ms"] > 0 for r in tvm_table.rows) and tvm_table.header["net_ms"] > 0
    assert tvm_table.header["device"]["runtimes"]["tvm"] and tvm_table.header["transport"].startswith("rpc")
    res = CliRunner().invoke(main, ["compress", "resnet20", "--input-size", "16", "--steps", "0", "--scheme",
                                    "spatial", "--target-speedup", "1.5", "--runtime", "tvm", "--calibration",
                                    str(cal), "--out", str(tmp_path / "c"), "--no-latency", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert [p["runtime"] for p in report["predictions"]] == ["tvm"]
    assert report["config"]["decompose"]["latency_table"] == str(cal / "host" / "tvm" / "resnet20.csv")
    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--local", "--model", "resnet20", "--runtime",
                                    "tvm", "--precision", "int8", "--out", str(cal)])
    assert res.exit_code == 1 and "tvm is built at fp32 only" in res.output


@pytest.mark.slow
def test_a_multi_thread_table_measured_with_workers_run_another_way_is_stale(table, tmp_path):
    from trp_edge.backends.ort import SPINNING, session
    from trp_edge.device.bench import device_identity

    here = device_identity()
    assert here["sessions"]["onnxruntime"] == SPINNING
    opts = session(_tiny_onnx(tmp_path), 2).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    header = {**load_table(table).header, "device": here}
    caps = capabilities("ort")
    assert stale(header, here, caps) is None
    before = {**here, "sessions": {}}  # a table from a runner whose workers slept between ops
    assert stale({**header, "device": before}, here, caps) is None  # one thread: no workers, still good
    why = stale({**header, "threads": 2, "device": before}, here, caps)
    assert why and "asleep between ops" in why and SPINNING in why
    assert stale({**header, "threads": 2, "runtime": "tflite", "device": before}, here, capabilities("tflite")) is None
    older = {k: v for k, v in header.items() if k != "in_net"}  # ORT layers timed alone only
    assert "timed alone only" in stale(older, here, caps)
    assert stale({**older, "runtime": "tflite"}, here, capabilities("tflite")) is None  # TFLite: timed alone


def _tiny_onnx(folder):
    import torch

    path = folder / "conv.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False)
    return path


def test_a_net_whose_convs_cannot_be_found_in_place_keeps_them_as_timed_alone(tmp_path, caplog):
    import torch
    from torch import nn

    from trp_edge.config import CalibrateConfig
    from trp_edge.workflows.calibrate import calibrate_model

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            return self.b(self.b(self.a(x)))  # one layer, two Conv nodes in the exported net

    res = calibrate_model(CalibrateConfig(model="twice", local=True, out=str(tmp_path)), "twice", Twice().eval(),
                          torch.zeros(1, 3, 16, 16))
    t = load_table(res.csv)
    assert t.header["in_net"] is False and t.header["net_ms"] > 0
    assert "cannot find the layers in the exported net" in caplog.text
    assert t.dense("b") > 0 and t.ranks("b", "spatial")
    assert stale(t.header, t.header["device"], capabilities("ort")) is None  # tried: not measured at every compress


def test_the_models_are_lowered_one_call_at_a_time_and_removed_after_it(tiny):
    """The host holds the dense net and the models of the call it makes, never the whole grid (ResNet-18's 37 nets
    and its layers' models: 0.8 GB), and a call uploads only its own models."""
    import torch

    from trp_edge.config import CalibrateConfig
    from trp_edge.targets import load_target
    from trp_edge.transport import Session, run_local
    from trp_edge.workflows.calibrate import measure_layers

    seen = []

    def call(kind, job, files):
        folder = next(iter(files.values())).parent
        dense = {"net0.int8.onnx"}  # the dense net, kept for the fallback
        seen.append((kind, set(files) - dense, {p.name for p in folder.glob("*.onnx")} - dense))
        return run_local(job, files, kind)

    cfg = CalibrateConfig(model="tiny", local=True, schemes=("spatial",), precision="int8")
    rows, _, _, net_ms, in_net = measure_layers(tiny.eval(), torch.zeros(1, 3, 16, 16), cfg, Session("local", call),
                                                load_target("host"), 1)
    assert in_net and net_ms > 0 and rows
    nets = [files for kind, files, _ in seen if kind == "in_net"]
    assert len(nets) >= 3 and nets[1:] == [{f"net{i}.int8.onnx"} for i in range(1, len(nets))]
    assert sum(kind == "calibrate" for kind, _, _ in seen) == 3  # TinyNet's three conv shapes
    assert all(on_disk == files for _, files, on_disk in seen), seen


def test_tflite_calibration_end_to_end_on_a_tiny_model(tmp_path):
    pytest.importorskip("ai_edge_litert")
    import torch
    from torch import nn

    from trp_edge.config import CalibrateConfig
    from trp_edge.workflows.calibrate import calibrate_model

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    cfg = CalibrateConfig(model="two", runtime="tflite", local=True, out=str(tmp_path))
    res = calibrate_model(cfg, "two", net, torch.zeros(1, 3, 16, 16))
    t = load_table(res.csv, target="host", runtime="tflite", precision="fp32")
    assert t.header["in_net"] is False and set(t.header["layers"]) == {"0", "2"}
    for layer in t.header["layers"]:
        assert t.dense(layer) > 0
        pairs = [r for r in t.rows if r["layer"] == layer and r["scheme"] in ("channel", "spatial")]
        assert pairs and all(r["median_ms"] > 0 and r["rank"] >= 1 for r in pairs)
    assert stale(t.header, t.header["device"], capabilities("tflite")) is None


def test_a_runtime_built_at_fp32_only_is_refused_at_int8_when_calibrating():
    import torch

    from trp_edge.config import CalibrateConfig
    from trp_edge.errors import ConfigError
    from trp_edge.workflows.calibrate import calibrate_model

    cfg = CalibrateConfig(model="m", runtime="tvm", precision="int8", local=True)  # the config takes it
    with pytest.raises(ConfigError, match="tvm is built at fp32 only"):
        calibrate_model(cfg, "m", torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 8, 8))


@pytest.mark.slow
def test_a_finetune_at_ranks_from_a_table(table, tmp_path):
    """--finetune after ranks chosen by a latency table: the fine-tune's trainer is handed the run's tables (it
    once failed here: 'the config names latency tables but none were passed'), and the ranks stay the table's."""
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:3x16x16", "--steps", "0",
                                    "--finetune", "1", "--batch", "64", "--scheme", "spatial", "--target-speedup", "2",
                                    "--latency-table", str(table), "--out", str(tmp_path / "ft"), "--no-latency"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert rep["training"]["finetune"]["steps"] > 0 and rep["mac_speedup"] > 1.5
    shapes = {k: tuple(v.shape) for k, v in torch.load(tmp_path / "ft" / "compressed.pt")["state_dict"].items()}
    for la in rep["layers"]:
        if la["rank"] is not None:
            assert shapes[f"{la['name']}.first.weight"][0] == la["rank"]
