"""Two runs writing to one place: deploy reports are claimed by exclusive create (never one name twice), atomic
writes use a temporary of their own, and of two compress runs racing for one --out one wins and the other gets
one line."""

import json
import os
import socket
import threading

from trp_edge.contracts import claim, write_text
from trp_edge.errors import InputError
from trp_edge.workflows import out_lock


def race(n, fn):
    """fn(i) in n threads released at once; their results or exceptions, in order."""
    gate, out = threading.Barrier(n), [None] * n

    def go(i):
        gate.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = e

    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def test_a_name_is_claimed_once_and_atomic_writes_do_not_collide(tmp_path):
    assert race(8, lambda i: claim(tmp_path / "r.json")).count(True) == 1
    assert race(8, lambda i: write_text(tmp_path / "s.md", f"writer {i}\n" * 1000)) == [None] * 8
    text = (tmp_path / "s.md").read_text()
    assert len(set(text.splitlines())) == 1 and len(text.splitlines()) == 1000  # one writer's whole file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "s.md"]  # no temporaries left


def test_two_deploy_reports_in_the_same_second_keep_both(tmp_path, monkeypatch):
    from trp_edge import report

    monkeypatch.setattr(report, "plot_latency", lambda reps, path, **kw: path.write_bytes(b"png"))
    monkeypatch.setattr(report, "markdown", lambda rep: f"# {rep['name']}\n")
    paths = race(6, lambda i: report.write_report({"name": "m", "target": "host", "runtime": "ort", "run": i},
                                                  tmp_path))
    assert len(set(paths)) == 6
    assert sorted(json.loads(p.read_text())["run"] for p in paths) == list(range(6))


def test_of_two_compress_runs_for_one_out_one_wins(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with out_lock.released():
        res = race(2, lambda i: out_lock.claim(out))
        assert res.count(None) == 1
        err = next(r for r in res if r is not None)
        assert isinstance(err, InputError) and "another trp-edge compress is writing there" in str(err)
        assert f"pid {os.getpid()}" in str(err)
    assert not (out / out_lock.LOCK).exists()  # gone when the run ends
    # a lock left by a run that died is taken over
    (out / out_lock.LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    with out_lock.released():
        out_lock.claim(out)
        assert json.loads((out / out_lock.LOCK).read_text())["pid"] == os.getpid()


def test_compress_refuses_an_out_another_run_holds(tmp_path):
    from click.testing import CliRunner

    from trp_edge.cli import main

    out = tmp_path / "out"
    args = ["compress", "resnet20", "--data", "synthetic:1x16x16", "--steps", "0", "--scheme", "spatial", "--out",
            str(out), "-q", "--no-latency", "--no-calibrate"]
    with out_lock.released():
        out.mkdir()
        out_lock.claim(out)  # a run in progress
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and "another trp-edge compress is writing there" in res.output
        assert os.listdir(out) == [out_lock.LOCK]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert not (out / out_lock.LOCK).exists() and (out / "report.json").exists()


def test_the_lock_goes_when_the_run_fails(tmp_path):
    from click.testing import CliRunner

    from trp_edge.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "resnet20", "--data", "synthetic:1x16x16", "--steps", "0", "--out",
                                    str(out), "--ranks", "nope.conv=3", "-q", "--no-latency", "--no-calibrate"])
    assert res.exit_code == 1 and "explicit ranks name layers" in res.output
    assert not (out / out_lock.LOCK).exists()
