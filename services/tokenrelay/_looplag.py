"""Event-loop lag: how late the loop runs a callback that asked to run now.

A task sleeps ``interval_s`` again and again and records how much longer each sleep took than
asked. On an idle loop that is a fraction of a millisecond; a blocking call shows as lag of its
whole length, a saturated CPU as lag spread over every sample. Both services export it as
``tokenrelay_event_loop_lag_seconds``, which tells an operator whether slow health checks mean a
blocked loop (a bug) or too little CPU (scale out).
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

from tokenrelay._probes import Heartbeat

__all__ = ["LAG_BUCKETS", "watch_loop_lag"]

LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


async def watch_loop_lag(
    histogram: Histogram, interval_s: float = 0.05, beat: Heartbeat | None = None
) -> None:
    """Observe the loop's lag into ``histogram`` until cancelled; each sample also beats
    ``beat``, which tells the probe thread (``tokenrelay._probes``) that the loop runs."""
    loop = asyncio.get_running_loop()
    if beat is not None:
        beat.beat()  # the time before the watcher started (a slow start) is no stall
    while True:
        asked = loop.time()
        await asyncio.sleep(interval_s)
        histogram.observe(max(loop.time() - asked - interval_s, 0.0))
        if beat is not None:
            beat.beat()
