import time

import pytest

from trp_edge.config import ProfileConfig
from trp_edge.errors import ConfigError
from trp_edge.profile import Timing, time_alternating


def test_variants_run_in_alternating_blocks_until_count_and_time_are_met():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.002))}
    cfg = ProfileConfig(warmup=2, block=3, min_runs=7, min_seconds=0.03)
    t = time_alternating(runners, cfg)
    timed = calls[4:]  # after 2 warm-ups each
    assert calls[:4] == ["a", "a", "b", "b"]
    blocks = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(len(set(b)) == 1 for b in blocks)
    assert [b[0] for b in blocks] == ["a", "b"] * (len(blocks) // 2)
    assert t["a"].runs == t["b"].runs >= 15  # b needs 15 runs of ~2 ms for 30 ms; a keeps pace
    assert t["b"].median_ms >= 2.0 > t["a"].median_ms
    assert t["b"].p10_ms <= t["b"].median_ms <= t["b"].p90_ms


def test_timing_statistics():
    t = Timing.of([0.001 * v for v in range(1, 12)])
    assert (t.median_ms, t.p10_ms, t.p90_ms, t.runs) == pytest.approx((6.0, 2.0, 10.0, 11))


def test_protocol_config_is_checked():
    with pytest.raises(ConfigError):
        ProfileConfig(block=0)
    with pytest.raises(ConfigError):
        ProfileConfig(threads=0)
