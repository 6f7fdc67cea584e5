"""trp_edge.transport: where the connection comes from (flags, target file, environment, in that order) and a
timeout handled by its type."""

import dataclasses

import pytest

from trp_edge.errors import ConfigError, DeviceError, DeviceTimeout
from trp_edge.targets import Connection, load_target
from trp_edge.transport import _remote_call, resolve


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("TRP_EDGE_TRACKER", raising=False)
    monkeypatch.delenv("TRP_EDGE_KEY", raising=False)
    monkeypatch.delenv("TRP_EDGE_RPC", raising=False)
    return monkeypatch


def board(**rpc):
    return dataclasses.replace(load_target("rpi4"), rpc=Connection(**rpc))


def test_flags_come_first(env):
    env.setenv("TRP_EDGE_TRACKER", "10.0.0.9:9190")
    t = board(tracker="10.0.0.2:9190", key="pi", host="10.0.0.3", port=9091)
    assert resolve(t, tracker="127.0.0.1:9190") == Connection(tracker="127.0.0.1:9190", key="pi")
    assert resolve(t, tracker="127.0.0.1:9190", key="mine").key == "mine"
    # a host flag beats the file's tracker; the port falls back to the file's
    assert resolve(t, host="127.0.0.1") == Connection(host="127.0.0.1", port=9091, key="")
    assert resolve(t, host="127.0.0.1", port=7).port == 7


def test_then_the_target_file_tracker_before_its_host(env):
    env.setenv("TRP_EDGE_RPC", "127.0.0.1:5")
    assert resolve(board(tracker="10.0.0.2:9190", key="pi", host="10.0.0.3")) == \
        Connection(tracker="10.0.0.2:9190", key="pi")
    assert resolve(board(tracker="10.0.0.2:9190")).key == "rpi4"  # no key anywhere: the target's name
    assert resolve(board(host="10.0.0.3", port=9091)) == Connection(host="10.0.0.3", port=9091, key="")


def test_then_the_environment_tracker_before_rpc(env):
    env.setenv("TRP_EDGE_RPC", "127.0.0.1:5")
    assert resolve(board()) == Connection(host="127.0.0.1", port=5, key="")
    env.setenv("TRP_EDGE_TRACKER", "127.0.0.1:9190")
    assert resolve(board()) == Connection(tracker="127.0.0.1:9190", key="rpi4")
    env.setenv("TRP_EDGE_KEY", "lab-pi")
    assert resolve(board(key="pi")).key == "lab-pi"  # the environment's key goes with its tracker


def test_nothing_says_how(env):
    with pytest.raises(ConfigError, match="no device connection for rpi4.*trp-edge serve"):
        resolve(board())
    env.setenv("TRP_EDGE_RPC", "nohost")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        resolve(board())


class FakeSession:
    def __init__(self, fn):
        self.fn = fn

    def get_function(self, name):
        return self.fn


def test_a_timeout_is_known_by_its_type_not_its_message():
    conn = Connection(host="127.0.0.1", port=1)

    def expired(job):
        raise TimeoutError("session gone")  # tvm.error.RPCSessionTimeoutError is a TimeoutError

    with pytest.raises(DeviceTimeout, match="longer than --timeout 3 s") as e:
        _remote_call(FakeSession(expired), conn, "bench", {}, 3)
    assert isinstance(e.value, TimeoutError)

    def fails(job):
        raise RuntimeError("a timeout of the model's own making")  # a message with 'timeout' is no timeout

    with pytest.raises(DeviceError, match="the run failed") as e:
        _remote_call(FakeSession(fails), conn, "bench", {}, 3)
    assert not isinstance(e.value, DeviceTimeout)
    assert _remote_call(FakeSession(lambda job: '{"ok": 1}'), conn, "bench", {}, 3) == {"ok": 1}
