"""What a real tritonserver reports, read by system tests."""

from __future__ import annotations

import re
import time
import urllib.request


def triton_metric(metrics_url: str, name: str, **labels: str) -> float:
    """The value of one sample on Triton's Prometheus endpoint (0 when absent)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def settled(metrics_url: str, prefix: str = "tokenrelay_model_", quiet_s: float = 1.2) -> bool:
    """Whether, within 10 s, the samples named ``prefix…`` stayed unchanged for ``quiet_s``:
    Triton's vLLM model writes its metrics once a second, so a request that ended just before
    (another test's) may still be counted after a baseline read at once."""

    def samples() -> list[str]:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
        return [line for line in text.splitlines() if line.startswith(prefix)]

    deadline = time.monotonic() + 10
    last, since = samples(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        now = samples()
        if now != last:
            last, since = now, time.monotonic()
    return time.monotonic() - since >= quiet_s
