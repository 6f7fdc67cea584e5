"""trp-edge calibrate: a latency table per layer, scheme and rank; a table for another target, runtime or
shape is refused."""

import csv

import pytest
from click.testing import CliRunner

from trp_edge.calibrate import load_table, rank_grid
from trp_edge.cli import main
from trp_edge.errors import InputError


def test_rank_grid_stays_below_break_even():
    assert rank_grid(48, 48) == [1, 2, 4, 8, 16, 24, 32, 48]
    assert rank_grid(3, 3) == [1, 2]


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
        assert (r["scheme"] == "dense") == (r["rank"] == "0")
    t = load_table(table, target="host", runtime="ort")
    assert t.latency("layer1.0.conv1", "dense", 0) > 0 and t.header["input_shape"] == [1, 3, 16, 16]
    with pytest.raises(InputError, match="measured on target host, not rpi4"):
        load_table(table, target="rpi4")
    with pytest.raises(InputError, match="measured with ort, not tvm"):
        load_table(table, runtime="tvm")
    other = {n: s.replace("x16x16", "x32x32") for n, s in t.header["layers"].items()}
    with pytest.raises(InputError, match="stale or for another model"):
        load_table(table, layers=other)


def test_calibrate_needs_local_and_a_native_target():
    res = CliRunner().invoke(main, ["calibrate", "--target", "rpi4", "--local", "--model", "resnet20"])
    assert res.exit_code == 1 and "not rpi4" in res.output
    res = CliRunner().invoke(main, ["calibrate", "--model", "resnet20"])
    assert res.exit_code == 1 and "--local" in res.output
