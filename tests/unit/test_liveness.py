"""What a producer is told about a model whose pool has no live worker."""

from __future__ import annotations

import time

from queueing.liveness import Liveness, ago, heartbeat_fields


def test_a_stale_heartbeat_reads_as_no_live_worker() -> None:
    last = time.mktime((2026, 1, 2, 12, 3, 11, 0, 0, -1))  # 12:03:11 local time
    state = Liveness("demo", last_seen=last, alive_until=last + 6, waiting=8, now=last + 300)
    assert not state.live
    assert state.describe() == (
        "no live worker has served 'demo' since 12:03:11 (5 min ago); 8 requests waiting"
    )
    assert Liveness("demo", last, last + 6, waiting=1, now=last + 5).live
    one = Liveness("demo", last, last + 6, waiting=1, now=last + 7)
    assert one.describe().endswith("(7 s ago); 1 request waiting")


def test_unknown_is_not_reported_as_dead() -> None:
    # Stamped by no worker (one older than the stamps): nothing to say, so say nothing.
    assert Liveness("m", last_seen=None, alive_until=None, waiting=3, now=1e9).live


def test_heartbeat_fields_and_ages() -> None:
    assert heartbeat_fields(1000.0, 6) == {"last_seen": 1000.0, "alive_until": 1006.0}
    assert [ago(s) for s in (0, 119, 120, 7199, 7200)] == [
        "0 s ago", "119 s ago", "2 min ago", "119 min ago", "2 h ago",
    ]  # fmt: skip
