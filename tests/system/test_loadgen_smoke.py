"""The load generator runs and writes its files (a smoke run: no figure is judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _support import REPO


def test_loadgen_smoke_run_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loadgen.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    targets = {run["target"] for run in results["runs"]}
    assert targets == {"triton-grpc", "triton-http", "orchestrator", "edge"}
    for run in results["runs"]:
        assert run["errors"] == 0 and run["requests"] == 4
        assert run["ttft_s_p50"] is not None and run["output_tokens_per_s"] > 0
    table = (out / "results.md").read_text()
    assert table.count("\n| ") >= 4
    for plot in ("ttft_distribution.png", "ttft_vs_concurrency.png", "output_vs_concurrency.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_loadgen_with_the_fast_source_reports_each_hops_cpu(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "loadgen.py"),
            "--smoke",
            "--source",
            "fast",
            "--targets",
            "triton-grpc,orchestrator,edge",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {run["target"] for run in runs} == {"triton-grpc", "orchestrator", "edge"}
    for run in runs:
        assert run["errors"] == 0 and run["output_tokens_per_s"] > 0
    edge = next(run for run in runs if run["target"] == "edge")
    assert edge["orchestrator_cpu_us_per_token"] > 0 and edge["edge_cpu_us_per_token"] > 0
    # The edge's probe port (health_listen) was timed beside its API port.
    assert all(run["healthz_port_p99_s"] is not None for run in runs)
    # Read from each process's CPU-time clock (to the nanosecond), not /proc's 10 ms ticks,
    # under which one short smoke run of this fast source stays.
    assert all(run["source_cpu_us_per_token"] > 0 for run in runs)
