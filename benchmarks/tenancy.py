"""The added latency of the shared-store checks per request: one request-rate check (the edge)
and one token reservation (the orchestrator) against a real redis-server on loopback, against
this process's own counters. Prints p50/p99 in microseconds. Run: .venv/bin/python
benchmarks/tenancy.py [--n 2000]. (Fair shares: tests/unit/test_admission_fairness.py and
tests/system/test_tenancy.py; DNS change → traffic: tests/system/test_discovery.py prints it.)"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from tokenrelay.stack import free_port
from tokenrelay.stack._redis import Redis
from tokenrelay.tenancy import LimitStore, LocalLimits, RedisLimits, TokenAsk


async def _measure(store: LimitStore, n: int) -> dict[str, tuple[float, float]]:
    out = {}
    for name, call in (
        ("take_request", lambda i: store.take_request(f"k{i % 50}", 1_000_000)),
        ("take_tokens", lambda i: store.take_tokens(TokenAsk(f"k{i % 50}", 64, 10**9, 10**9))),
    ):
        times = []
        for i in range(n):
            began = time.perf_counter()
            await call(i)
            times.append((time.perf_counter() - began) * 1e6)
        times.sort()
        out[name] = (statistics.median(times), times[int(len(times) * 0.99)])
    return out


async def main(n: int) -> None:
    with Redis(free_port()) as server:
        redis = RedisLimits(server.url)
        try:
            await _measure(redis, 100)  # connections and scripts loaded
            shared = await _measure(redis, n)
        finally:
            await redis.close()
    local = await _measure(LocalLimits(), n)
    for name in shared:
        print(
            f"{name:13s} redis p50 {shared[name][0]:7.0f} µs  p99 {shared[name][1]:7.0f} µs"
            f"   local p50 {local[name][0]:5.1f} µs  p99 {local[name][1]:5.1f} µs"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    asyncio.run(main(parser.parse_args().n))
