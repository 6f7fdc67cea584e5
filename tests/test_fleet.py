"""A fleet of boards behind one tracker: calibrate spreads its calls over every free board with the key, boards of
another CPU are refused with their identity shown, a board that drops has its job requeued, a killed run resumes
from the answers journaled (never timing one twice), and the soak: three servers, one killed mid-run and another
started, every row once and the same keys as a single-board table."""

import json
import os
import random
import threading
import time

import pytest

from trp_edge.config import CalibrateConfig, ProfileConfig
from trp_edge.errors import DeviceError
from trp_edge.latency_table import load_table
from trp_edge.targets import Connection
from trp_edge.transport_fleet import Fleet, Journal
from trp_edge.workflows.calibrate import calibrate

from .conftest import EXE, free_port, start, start_tracker, stop

FAST = ProfileConfig(warmup=1, block=2, min_runs=2, min_seconds=0.0, max_seconds=5.0)


class FakeSession:
    def __init__(self, cpu):
        self.cpu = cpu

    def get_function(self, name):
        return lambda: json.dumps({"cpu": self.cpu, "machine": "aarch64", "cores": 4})


def test_a_board_of_another_cpu_is_refused_and_a_dropped_board_requeues(monkeypatch, caplog):
    import trp_edge.transport_fleet as tf

    boards = iter([FakeSession("A72"), FakeSession("A53"), FakeSession("A72")])
    monkeypatch.setattr(tf, "connect", lambda conn, timeout, handshake: next(boards))
    ran = []

    def session_call(sess, conn, kind, job, files, timeout):
        ran.append(id(sess))
        if len(ran) == 1:
            raise DeviceError("connection reset")  # the first board dies on its first job
        return {"ok": job["n"]}

    monkeypatch.setattr(tf, "session_call", session_call)
    fleet = Fleet(Connection(tracker="127.0.0.1:1", key="pi"), 2, 30, wait=5)
    first = fleet.open()
    assert first is not None and fleet.open() is None  # the A53: refused, held
    assert "refused" in caplog.text and "A53" in caplog.text and len(fleet.held) == 1
    fleet.idle.put(first)
    assert fleet.call("bench", {"n": 7}, {}) == {"ok": 7}  # requeued on the third board, which joined
    assert len(set(ran)) == 2 and fleet.live == 1 and "dropped" in caplog.text
    fleet.close()


def test_the_journal_answers_a_call_once(tmp_path):
    calls = []

    def call(kind, job, files):
        calls.append(job["n"])
        return {"n": job["n"], "timing": {}}

    j = tmp_path / "t.partial.jsonl"
    wrapped = Journal(j).wrap(call)
    assert [wrapped("calibrate", {"n": n}, {}) for n in (1, 2)] == [{"n": 1, "timing": {}}, {"n": 2, "timing": {}}]
    with j.open("a") as f:
        f.write('{"key": "cut by the ki')  # the run was killed mid-line
    again = Journal(j).wrap(call)  # a resumed run
    assert again("calibrate", {"n": 2}, {}) == {"n": 2, "timing": {}} and again("calibrate", {"n": 3}, {})["n"] == 3
    assert calls == [1, 2, 3]


@pytest.fixture
def tracker(tmp_path):
    addr, p = start_tracker(tmp_path / "tracker.log")
    yield addr, p
    stop(p)


def board(tracker: str, log) -> object:
    return start([EXE, "serve", "--port", str(free_port()), "--tracker", tracker, "--key", "fleet"], "listening on",
                 log, env={"TRP_EDGE_TOKEN": "fleet-token"})


def rows(csv):
    t = load_table(csv)
    return t, [(r["layer"], r["scheme"], r["rank"]) for r in t.rows]


@pytest.mark.slow
def test_soak_three_boards_one_killed_mid_run(tracker, tmp_path, monkeypatch):
    addr, tproc = tracker
    monkeypatch.setenv("TRP_EDGE_TOKEN", "fleet-token")
    procs = [board(addr, tmp_path / f"board{i}.log") for i in range(3)]
    cfg = dict(target="host", model="resnet20", input_size=16, threads=1, schemes=("spatial",), protocol=FAST)
    single = calibrate(CalibrateConfig(**cfg, local=True, out=str(tmp_path / "single")))
    out = tmp_path / "fleet"
    journal = out / "host" / "ort" / "resnet20.partial.jsonl"
    kill_after = random.Random().randint(1, 4)
    killed = []

    def chaos():  # one board killed at a random point mid-run, another started
        for _ in range(600):
            if journal.exists() and len(journal.read_text().splitlines()) >= kill_after:
                victim = procs.pop(random.randrange(len(procs)))
                stop(victim)
                killed.append(victim)
                procs.append(board(addr, tmp_path / "board3.log"))
                return
            time.sleep(0.1)

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    try:
        res = calibrate(CalibrateConfig(**cfg, tracker=addr, key="fleet", timeout=120, out=str(out)), boards=0)
    finally:
        t.join(60)
        for p in procs:
            stop(p)
    assert killed, "the run ended before a board was killed"
    fleet, keys = rows(res.csv)
    _, single_keys = rows(single.csv)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(single_keys)  # every row once, the same keys
    assert fleet.header["transport"].startswith("rpc fleet (3 boards")
    assert not journal.exists()  # the table is written: the journal is gone
    assert not [p.pid for p in [*procs, *killed] if group_alive(p.pid)]  # nothing left running


def group_alive(pgid: int, seconds: float = 10.0) -> bool:
    """A process of the group is still there after `seconds` (killed children are reaped by init meanwhile)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_a_killed_calibrate_resumes_without_timing_a_row_again(tracker, tmp_path, monkeypatch):
    import trp_edge.transport_fleet as tf

    addr, _ = tracker
    monkeypatch.setenv("TRP_EDGE_TOKEN", "fleet-token")
    procs = [board(addr, tmp_path / f"b{i}.log") for i in range(2)]
    cfg = CalibrateConfig(target="host", model="resnet20", input_size=16, threads=1, schemes=("spatial",),
                          protocol=FAST, tracker=addr, key="fleet", timeout=120, out=str(tmp_path / "o"))
    journal = tmp_path / "o" / "host" / "ort" / "resnet20.partial.jsonl"
    real, sent = tf.session_call, []

    def recording(sess, conn, kind, job, files, timeout):
        sent.append(Journal.key(kind, {k: v for k, v in job.items() if k not in ("format", "version")}))
        if len(sent) > 3 and kill[0]:
            raise KeyboardInterrupt  # the run is killed (Ctrl-C) after three answers
        return real(sess, conn, kind, job, files, timeout)

    kill = [True]
    monkeypatch.setattr(tf, "session_call", recording)
    try:
        with pytest.raises(KeyboardInterrupt):
            calibrate(cfg, boards=0)
        answered = {json.loads(line)["key"] for line in journal.read_text().splitlines()}
        assert len(answered) >= 3
        kill[0], sent[:] = False, []
        res = calibrate(cfg, boards=0)
    finally:
        for p in procs:
            stop(p)
    _, keys = rows(res.csv)
    assert len(keys) == len(set(keys)) and res.rows == len(keys)
    assert sent and not answered & set(sent)  # the answered calls were not run again
    assert not journal.exists()


@pytest.mark.slow
def test_deploy_spreads_its_runtimes_over_the_boards(compressed, tracker, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from trp_edge.cli import main

    addr, _ = tracker
    monkeypatch.setenv("TRP_EDGE_TOKEN", "fleet-token")
    procs = [board(addr, tmp_path / f"d{i}.log") for i in range(2)]
    try:
        res = CliRunner().invoke(main, ["deploy", "--target", "host", "--model", str(compressed), "--tracker", addr,
                                        "--key", "fleet", "--boards", "all", "--runtime", "ort,tflite", "--min-runs",
                                        "5", "--min-seconds", "0.05", "--reports", str(tmp_path / "r"), "-q"])
    finally:
        for p in procs:
            stop(p)
    assert res.exit_code == 0, res.output
    reps = [json.loads(f.read_text()) for f in (tmp_path / "r" / "host").glob("*.json")]
    assert sorted(r["runtime"] for r in reps) == ["ort", "tflite"]
    for r in reps:  # each runtime's dense and compressed models timed side by side, in one job on one board
        assert r["transport"].startswith("rpc fleet (2 boards") and r["dense"]["runs"] >= 5 and r["compressed"]["runs"]


def test_boards_need_a_tracker(tmp_path):
    from click.testing import CliRunner

    from trp_edge.cli import main

    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--local", "--model", "resnet20", "--input-size",
                                    "16", "--boards", "2", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "--boards spreads the jobs over the boards of a tracker" in res.output
    res = CliRunner().invoke(main, ["calibrate", "--target", "host", "--model", "resnet20", "--boards", "none"])
    assert res.exit_code == 2 and "a number of boards or 'all'" in res.output
