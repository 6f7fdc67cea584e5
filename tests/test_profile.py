import pytest

from trp_edge.config import ProfileConfig
from trp_edge.errors import ConfigError
from trp_edge.profile import Timing, time_alternating


class FakeClock:
    """perf_counter for the protocol: each runner advances it by its own cost, so the test needs no real time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def cost(self, name: str, seconds: float, calls: list):
        def run():
            calls.append(name)
            self.now += seconds
        return run


def test_variants_run_in_alternating_blocks_until_count_and_time_are_met(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr("trp_edge.profile.time.perf_counter", clock)
    runners = {"a": clock.cost("a", 0.001, calls), "b": clock.cost("b", 0.002, calls)}
    t = time_alternating(runners, ProfileConfig(warmup=2, block=3, min_runs=7, min_seconds=0.03))
    timed = calls[4:]  # after 2 warm-ups each
    assert calls[:4] == ["a", "a", "b", "b"]
    blocks = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(len(set(b)) == 1 for b in blocks)
    assert [b[0] for b in blocks] == ["a", "b"] * (len(blocks) // 2)
    # a needs 30 runs of 1 ms for its 30 ms (b alone would stop at 15 runs of 2 ms): b keeps pace, block by block
    assert t["a"].runs == t["b"].runs == 30
    assert t["a"].median_ms == pytest.approx(1.0) and t["b"].median_ms == pytest.approx(2.0)
    assert t["b"].p10_ms == pytest.approx(t["b"].p90_ms)


def test_the_protocol_stops_at_max_seconds(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr("trp_edge.profile.time.perf_counter", clock)
    t = time_alternating({"slow": clock.cost("slow", 1.0, calls)},
                         ProfileConfig(warmup=0, block=2, min_runs=1000, min_seconds=0, max_seconds=5))
    assert t["slow"].runs == 6  # blocks of 2 until more than 5 s have passed


def test_timing_statistics():
    t = Timing.of([0.001 * v for v in range(1, 12)])
    assert (t.median_ms, t.p10_ms, t.p90_ms, t.runs) == pytest.approx((6.0, 2.0, 10.0, 11))


def test_protocol_config_is_checked():
    with pytest.raises(ConfigError):
        ProfileConfig(block=0)
    with pytest.raises(ConfigError):
        ProfileConfig(threads=0)
