"""What a real tritonserver reports, read by system tests."""

from __future__ import annotations

import re
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
