"""trp-edge serve keeps its board to its owner: beyond loopback it requires a token (made and printed when none is
given), a session without it or with a wrong one is refused before any upload (on both sides), through a tracker
too; every job is checked (plain file names inside the session folder) and bounded (upload size, job time), and
a job that breaks a limit is answered with one line while the server goes on."""

import gc
import re
import time
from pathlib import Path

import pytest

from trp_edge.device.auth import client_token, loopback, server_token
from trp_edge.device.jobs import JobTimeout, problem, time_limit
from trp_edge.errors import ConfigError, DeviceError
from trp_edge.targets import Connection, load_target
from trp_edge.transport import connect, rpc_session

from .conftest import EXE, free_port, start, start_tracker, stop


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("TRP_EDGE_TOKEN", raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """A trp-edge serve bound to every interface, with no token given: it makes one and prints it."""
    port, log = free_port(), tmp_path_factory.mktemp("open") / "log"
    p = start([EXE, "serve", "--host", "0.0.0.0", "--port", str(port), "--max-upload-mb", "0.01", "--job-seconds",
               "1"], "listening on", log)
    token = re.search(r"clients need this token .*: (\S+)", log.read_text())
    yield port, token and token.group(1), log
    stop(p)


def test_beyond_loopback_a_token_is_made_and_printed_once(open_server):
    port, token, log = open_server
    assert token and len(token) >= 24
    assert log.read_text().count(token) == 1  # printed once, and nowhere else (not in the listening line)
    assert server_token("127.0.0.1", None) == (None, False) and server_token("::1", None) == (None, False)
    made, generated = server_token("0.0.0.0", None)
    assert generated and made and made != server_token("0.0.0.0", None)[0]
    assert not loopback("0.0.0.0") and not loopback("192.168.1.5") and loopback("localhost")


def test_no_token_or_a_wrong_one_is_refused_before_any_upload(open_server, no_token):
    from tvm import rpc

    port, token, log = open_server
    with pytest.raises(DeviceError, match="refused the session: wrong or missing token"):
        connect(Connection(host="127.0.0.1", port=port), 30)
    with pytest.raises(Exception, match="wrong or missing token"):  # TVM's own client, straight to the upload
        rpc.connect("127.0.0.1", port).upload(bytearray(b"x"), "lib.so")
    no_token.setenv("TRP_EDGE_TOKEN", "not-the-token")
    with pytest.raises(DeviceError, match="wrong or missing token") as e:
        connect(Connection(host="127.0.0.1", port=port), 30)
    assert "not-the-token" not in str(e.value)
    text = log.read_text()  # the server's side: one line each, and never a session
    assert text.count("refused a session from 127.0.0.1: missing token") == 2
    assert text.count("refused a session from 127.0.0.1: wrong token") == 1
    no_token.setenv("TRP_EDGE_TOKEN", token)
    sess = connect(Connection(host="127.0.0.1", port=port), 30)
    sess.upload(bytearray(b"x" * 100), "small.bin")
    assert "numpy" in sess.get_function("trp_edge.info")()
    del sess  # TVM's session caches its upload function, a cycle: collect it so the server takes the next one
    gc.collect()


def test_a_job_breaking_a_limit_gets_one_line_and_the_server_goes_on(open_server, no_token, tmp_path):
    port, token, _ = open_server
    no_token.setenv("TRP_EDGE_TOKEN", token)
    big = tmp_path / "big.onnx"
    big.write_bytes(b"0" * 20_000)  # the server caps uploads at 0.01 MB
    conn = Connection(host="127.0.0.1", port=port)
    with rpc_session(conn, 30) as call:
        with pytest.raises(DeviceError, match="refused the upload.*over this server's --max-upload-mb 0.01"):
            call("bench", {"runtime": "ort", "artifacts": []}, {"big.onnx": big})
    job = {"runtime": "ort", "reference": "ref.npz", "artifacts": [{"variant": "dense", "file": "/etc/passwd"}]}
    for name in ("/etc/passwd", "../../x.onnx"):
        with rpc_session(conn, 30) as call:
            job["artifacts"][0]["file"] = name
            out = call("bench", job, {})
        assert "not a plain file name inside the session folder" in out["error"] and not out["artifacts"]
    with rpc_session(conn, 30) as call:
        assert "is a JSON object" in call("calibrate", ["not", "a", "job"], {})["error"]  # type: ignore[arg-type]
    relu = tmp_path / "relu.onnx"
    relu.write_bytes(relu_model())
    slow = {"runtime": "ort", "threads": 1, "input_shape": [1, 3, 8, 8], "artifacts": [{"variant": "dense",
            "file": "relu.onnx"}], "protocol": {"min_runs": 10**7, "min_seconds": 30.0, "max_seconds": 60.0}}
    t0 = time.monotonic()
    with rpc_session(conn, 60) as call:  # a job timed for 30 s on a server that allows 1 s
        out = call("calibrate", slow, {"relu.onnx": relu})
    assert "ran past this server's limit of 1 s" in out["error"] and time.monotonic() - t0 < 20
    assert "numpy" in connect(conn, 30).get_function("trp_edge.info")()  # still serving


def relu_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_through_the_tracker_with_the_token(tmp_path, no_token):
    addr, tracker = start_tracker(tmp_path / "tracker.log")
    try:
        board = start([EXE, "serve", "--port", str(free_port()), "--tracker", addr, "--key", "tb"],
                      "listening on", tmp_path / "board.log", env={"TRP_EDGE_TOKEN": "fleet-secret"})
        try:
            conn = Connection(tracker=addr, key="tb")
            with pytest.raises(DeviceError, match="wrong or missing token"):
                connect(conn, 30)
            no_token.setenv("TRP_EDGE_TOKEN", "fleet-secret")
            assert "numpy" in connect(conn, 30).get_function("trp_edge.info")()
            assert "fleet-secret" not in (tmp_path / "tracker.log").read_text()
        finally:
            stop(board)
    finally:
        stop(tracker)


def test_a_target_names_the_variable_never_the_secret(tmp_path, no_token):
    rpi4 = Path(load_target("rpi4").path).read_text()
    (tmp_path / "pi.toml").write_text(rpi4 + 'token = "hunter2"\n')  # its [rpc] section is the last
    with pytest.raises(ConfigError, match=r"rpc\.token: a secret does not go in a target file.*token_env") as e:
        load_target(str(tmp_path / "pi.toml"))
    assert "hunter2" not in str(e.value)
    (tmp_path / "pi.toml").write_text((tmp_path / "pi.toml").read_text().replace('token = "hunter2"',
                                                                                 'token_env = "PI_TOKEN"'))
    t = load_target(str(tmp_path / "pi.toml"))
    assert t.rpc.token_env == "PI_TOKEN"
    with pytest.raises(ConfigError, match=r"names \$PI_TOKEN, which is not set"):
        client_token(t.rpc.token_env)
    no_token.setenv("PI_TOKEN", "from-the-variable")
    assert client_token(t.rpc.token_env) == "from-the-variable"
    no_token.setenv("TRP_EDGE_TOKEN", "from-the-flag")  # --token sets it: it comes first
    assert client_token(t.rpc.token_env) == "from-the-flag"
    no_token.setenv("TRP_EDGE_TOKEN", "two words")
    with pytest.raises(ConfigError, match="no spaces"):
        client_token(None)


def test_jobs_are_checked_against_their_shape_and_bounded_in_time():
    ok = {"runtime": "ort", "threads": 2, "reference": "r.npz", "artifacts": [{"variant": "dense", "file": "d.onnx"}]}
    assert problem("bench", ok) is None
    own = {"runtime": "ort", "artifacts": [{"variant": "dense", "file": "d.onnx", "reference": "a.npz"}]}
    assert problem("bench", own) is None  # each artifact names its own reference
    assert "not a file name" in problem("bench", {**own, "artifacts": [{"variant": "dense", "file": "d.onnx"}]})
    assert "plain file name" in problem("bench", {**ok, "reference": "../r.npz"})
    assert problem("bench", {**ok, "reference": "/abs/r.npz"}, plain=False) is None  # a local run reads paths
    assert "threads" in problem("bench", {**ok, "threads": -1})
    assert "no runtime" in problem("bench", {k: v for k, v in ok.items() if k != "runtime"})
    assert "input_shape" in problem("calibrate", ok)
    assert problem("calibrate", {**ok, "input_shape": [1, 3, 8, 8]}) is None
    assert "no variant" in problem("in_net", {**ok, "input_shape": [1, 3, 8, 8], "artifacts": [{"file": "a"}]})
    with pytest.raises(JobTimeout, match="limit of 0 s"), time_limit(0.05):
        while True:
            time.sleep(0.01)
    with time_limit(0):  # no limit
        time.sleep(0.01)


def test_the_token_is_never_written(compressed, no_token, tmp_path):
    """A deploy through a server that requires a token: the reports, the build's manifests, the CLI's output and its
    log hold no trace of it."""
    from click.testing import CliRunner

    from trp_edge.cli import main

    secret = "tok-" + "q7Zx" * 8
    port = free_port()
    board = start([EXE, "serve", "--port", str(port)], "listening on", tmp_path / "board.log",
                  env={"TRP_EDGE_TOKEN": secret})
    try:
        args = ["deploy", "--target", "host", "--model", str(compressed), "--host", "127.0.0.1", "--port", str(port),
                "--runtime", "ort", "--min-runs", "5", "--min-seconds", "0.05", "--reports", str(tmp_path / "r"), "-v"]
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 1 and "wrong or missing token" in refused.output
        res = CliRunner().invoke(main, [*args, "--token", secret])
    finally:
        stop(board)
    assert res.exit_code == 0, res.output
    written = [f for d in (tmp_path / "r", compressed) for f in d.rglob("*") if f.is_file()]
    assert any(f.suffix == ".json" for f in written) and any(f.name == "manifest.json" for f in written)
    assert not [f for f in written if secret.encode() in f.read_bytes()]
    assert secret not in res.output and secret not in (tmp_path / "board.log").read_text()
