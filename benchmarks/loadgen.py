"""Load generator: what the relay costs next to direct Triton, side by side in one run.

    .venv/bin/python benchmarks/loadgen.py --out results/ [--model synthetic|smollm2]
        [--targets triton-grpc,triton-http,orchestrator,edge] [--concurrency 1,4,16]
        [--requests 64] [--rate 0] [--max-tokens 64] [--rounds 2] [--smoke]
        [--source triton|fast] [--token-interval-ms MS] [--stream-interval-ms MS]

It starts its own stack (tritonserver, orchestrator, edge on free loopback ports) and drives
every target against the same tritonserver and model. With ``--source fast`` a Triton-protocol
server that sends pre-encoded responses (``benchmarks/fastsource.py``: the same bytes as
tritonserver, tens of thousands a second) stands in for tritonserver, so that the relay, not the
model, is the limit; ``triton-http`` is then not available.

- ``triton-grpc``: Triton's ``ModelStreamInfer`` directly (the floor);
- ``triton-http``: Triton's HTTP ``generate_stream`` (SSE);
- ``orchestrator``: tokenrelay's gRPC ``GenerateStream``;
- ``edge``: ``POST /v1/chat/completions`` with ``stream: true`` (SSE), as OpenAI clients do.

Closed loop (``--concurrency``: that many clients, each sending its next request when the last
ends) or open loop (``--rate`` R: Poisson arrivals at R requests/s). Targets alternate
(A B C D A B C D …, ``--rounds`` times) so that a comparison holds on a noisy machine. Per run
it reports what vLLM's and Triton's benchmark tools report — time to first token, inter-token
latency, end-to-end latency (p50/p90/p99), output tokens/s, requests/s, errors — plus the CPU
time and RSS of the edge and orchestrator processes and the latency of the edge's ``/healthz``
while the load runs. Output: ``results.json`` (raw figures), ``results.md`` (a table) and PNG
plots, in ``--out``. Figures only: nothing here asserts a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay import _loop  # noqa: E402
from tokenrelay.config import Settings, Timeouts  # noqa: E402
from tokenrelay.generation import ChatMessage, Sampling  # noqa: E402
from tokenrelay.orchestrator._triton import TritonNode  # noqa: E402
from tokenrelay.stack import Stack, StackPorts, free_port  # noqa: E402
from tokenrelay.templates import ChatTemplate  # noqa: E402
from tokenrelay.v1 import generation_pb2 as pb  # noqa: E402
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

TARGETS = ("triton-grpc", "triton-http", "orchestrator", "edge")
CATALOG = {"synthetic": "synthetic", "smollm2": "smollm2-135m-instruct"}
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _templated(model: str) -> str:
    """The prompt as the orchestrator renders it for the chat request the edge target sends,
    so that direct Triton targets generate the same answer."""
    spec = next(m for m in Settings().models if m.id == CATALOG[model])
    template = ChatTemplate(spec.chat_template, spec.default_system_prompt)
    return template.render((ChatMessage("user", PROMPT),))


@dataclass
class Sample:
    """One request as the client saw it."""

    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    tokens: int = 0
    pieces: int = 0
    error: str | None = None


# A stream yields (text arrived, tokens): a piece of text — what TTFT and ITL time — and/or a
# count of output tokens. Triton reports the tokens of each response; tokenrelay may merge
# several deltas into one message when its reader lags (coalescing), so its targets count
# tokens from the usage at the end instead of one per message.
Stream = Callable[[], AsyncIterator[tuple[bool, int]]]


def _triton_grpc(
    address: str, model: str, max_tokens: int
) -> tuple[Stream, Callable[[], Awaitable[None]]]:
    node = TritonNode(address, Timeouts())
    prompt = _templated(model)

    async def stream() -> AsyncIterator[tuple[bool, int]]:
        sampling = Sampling(max_tokens=max_tokens, temperature=0)
        async for delta in node.generate(model, prompt, sampling, "bench"):
            yield bool(delta.text), delta.output_tokens

    return stream, node.close


def _sse_lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async def lines() -> AsyncIterator[bytes]:
        async for raw in response.content:
            line = raw.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                yield line[6:]

    return lines()


def _triton_http(
    stack: Stack, model: str, max_tokens: int, session: aiohttp.ClientSession
) -> Stream:
    url = f"http://127.0.0.1:{stack.ports.triton.http}/v2/models/{model}/generate_stream"
    body = {
        "text_input": _templated(model),
        "stream": True,
        "exclude_input_in_output": True,
        "return_num_output_tokens": True,
        "sampling_parameters": json.dumps({"max_tokens": max_tokens, "temperature": 0}),
    }

    async def stream() -> AsyncIterator[tuple[bool, int]]:
        async with session.post(url, json=body) as response:
            response.raise_for_status()
            async for data in _sse_lines(response):
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(event["error"])
                yield bool(event.get("text_output")), int(event.get("num_output_tokens", 1))

    return stream


def _orchestrator(
    model: str, max_tokens: int, channel: grpc.aio.Channel, interval_ms: float | None
) -> Stream:
    stub = pb_grpc.GenerationServiceStub(channel)
    request = pb.GenerateStreamRequest(
        model=CATALOG[model],
        prompt=_templated(model),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0),
    )
    if interval_ms is not None:
        request.stream_interval_ms = int(interval_ms)

    async def stream() -> AsyncIterator[tuple[bool, int]]:
        async for message in stub.GenerateStream(request, timeout=600):
            if message.text:
                yield True, 0
            if message.HasField("end"):
                yield False, message.end.usage.completion_tokens
                return

    return stream


def _edge(
    stack: Stack,
    model: str,
    max_tokens: int,
    session: aiohttp.ClientSession,
    interval_ms: float | None,
) -> Stream:
    body: dict[str, Any] = {
        "model": CATALOG[model],
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if interval_ms is not None:
        body["stream_interval_ms"] = int(interval_ms)

    async def stream() -> AsyncIterator[tuple[bool, int]]:
        async with session.post(f"{stack.edge_url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for data in _sse_lines(response):
                chunk = json.loads(data)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    yield True, 0
                if chunk.get("usage"):
                    yield False, chunk["usage"]["completion_tokens"]

    return stream


async def _one(stream: Stream) -> Sample:
    sample = Sample()
    began = last = time.perf_counter()
    try:
        async for text, tokens in stream():
            sample.tokens += tokens
            if not text:
                continue
            now = time.perf_counter()
            if sample.ttft_s is None:
                sample.ttft_s = now - began
            else:
                sample.gaps_s.append(now - last)
            last = now
            sample.pieces += 1
    except Exception as exc:  # counted as an error of the run, with its kind
        sample.error = type(exc).__name__
    sample.e2e_s = time.perf_counter() - began
    return sample


async def _closed_loop(stream: Stream, concurrency: int, requests: int) -> list[Sample]:
    samples: list[Sample] = []
    remaining = requests

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            samples.append(await _one(stream))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


async def _open_loop(stream: Stream, rate: float, requests: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    tasks = []
    for _ in range(requests):
        tasks.append(asyncio.create_task(_one(stream)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


class _TraceSink:
    """An OTLP/HTTP endpoint that accepts and discards spans (a thread of its own, so it does
    not compete with the load generator's event loop)."""

    def __init__(self) -> None:
        import http.server
        import threading

        sink = self
        self.batches = self.bytes = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(size)
                sink.batches += 1
                sink.bytes += size
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


async def _lag_buckets(session: aiohttp.ClientSession, url: str) -> dict[float, float]:
    """The cumulative buckets of a service's ``tokenrelay_event_loop_lag_seconds``."""
    async with session.get(url) as response:
        text = await response.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("tokenrelay_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            # Summed over the samples of every worker (labelled worker="i").
            found[float(le)] = found.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def _lag_p99(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The smallest bucket bound under which 99% of the run's lag samples fell."""
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return None
    return next(le for le, count in delta.items() if count >= 0.99 * total)


def _tree(pid: int) -> list[int]:
    """A process and its descendants (a service's workers), from /proc."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # it ended meanwhile
                todo.extend(int(child) for child in task.read_text().split())
    return found


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_LIBC = ctypes.CDLL(None, use_errno=True)


def _process_cpu_s(pid: int) -> float | None:
    """A process's CPU time to the nanosecond (its CPU-time clock, ``clock_getcpuclockid``);
    None where that clock cannot be read. /proc's figures count 10 ms clock ticks, under which
    a short run of a cheap process stays."""
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    spec = _Timespec()
    if _LIBC.clock_gettime(clock.value, ctypes.byref(spec)) != 0:
        return None
    return float(spec.tv_sec + spec.tv_nsec / 1e9)


def _cpu_rss(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, RSS bytes) of a process and its descendants, from /proc (the
    CPU from each one's CPU-time clock where it can be read)."""
    cpu, rss = 0.0, 0
    ticks = os.sysconf("SC_CLK_TCK")
    for member in _tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        exact = _process_cpu_s(member)
        cpu += exact if exact is not None else (int(fields[11]) + int(fields[12])) / ticks
        rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


# Times GET /healthz every 50 ms on a new connection each time (as a load balancer's or a
# kubelet's probe does), in a process of its own: in the load generator's own loop, the probe
# would time the load generator's lag as much as the edge's.
_PROBE = """
import http.client, json, signal, sys, time
host, port = sys.argv[1], int(sys.argv[2])
latencies, stopped = [], []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
print("probing", flush=True)
while not stopped:
    began = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("GET", "/healthz")
    connection.getresponse().read()
    connection.close()
    latencies.append(time.perf_counter() - began)
    time.sleep(0.05)
print(json.dumps(latencies), flush=True)
"""


class _HealthProbe:
    def __init__(self, host: str, port: int) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PROBE, host, str(port)], stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        self._process.stdout.readline()  # "probing"

    def stop(self) -> list[float]:
        self._process.send_signal(signal.SIGTERM)
        out, _ = self._process.communicate(timeout=60)
        latencies: list[float] = json.loads(out.strip().splitlines()[-1])
        return latencies


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    gaps = [g for s in ok for g in s.gaps_s]
    e2e = [s.e2e_s for s in ok]
    # Time per output token after the first (vLLM's TPOT): unlike ITL, which times the pieces
    # as they arrive, it does not change when several tokens arrive as one piece.
    tpot = [
        (s.e2e_s - s.ttft_s) / (s.tokens - 1) for s in ok if s.ttft_s is not None and s.tokens > 1
    ]
    tokens = sum(s.tokens for s in ok)
    pieces = sum(s.pieces for s in ok)
    out: dict[str, Any] = {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "tokens_per_piece": tokens / pieces if pieces else None,
    }
    for name, values in (("ttft_s", ttft), ("itl_s", gaps), ("tpot_s", tpot), ("e2e_s", e2e)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{int(q * 100)}"] = _pct(values, q)
    return out


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def _run(
    args: argparse.Namespace, stack: Stack, triton: str, sources: list[int], health_port: int
) -> list[dict[str, Any]]:
    """``health_port``: the edge's probe port (``health_listen``), timed beside its API port's
    ``/healthz`` where it listens (a checkout before it has none)."""
    model = "synthetic" if args.model == "synthetic" else "smollm2"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    runs: list[dict[str, Any]] = []
    assert stack.edge is not None and stack.orchestrator is not None
    pids = {"edge": stack.edge.pid, "orchestrator": stack.orchestrator.pid}
    pids |= {f"source{i}": pid for i, pid in enumerate(sources)}
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession() as health_session,
        grpc.aio.insecure_channel(stack.orchestrator_address) as channel,
    ):
        triton_grpc, close = _triton_grpc(triton, model, args.max_tokens)
        interval = args.stream_interval_ms
        streams: dict[str, Stream] = {
            "triton-grpc": triton_grpc,
            "orchestrator": _orchestrator(model, args.max_tokens, channel, interval),
            "edge": _edge(stack, model, args.max_tokens, session, interval),
        }
        if args.source == "triton":
            streams["triton-http"] = _triton_http(stack, model, args.max_tokens, session)
        levels = (
            [("rate", args.rate)] if args.rate else [("concurrency", c) for c in args.concurrency]
        )
        try:
            for kind, level in levels:
                for round_ in range(args.rounds):
                    for target in args.targets:
                        await _one(streams[target])  # warm the connection
                        before = {name: _cpu_rss(pid) for name, pid in pids.items()}
                        lag_urls = {
                            "edge": f"{stack.edge_url}/metrics",
                            "orchestrator": stack.orchestrator_metrics_url,
                        }
                        lag_before = {
                            n: await _lag_buckets(health_session, u) for n, u in lag_urls.items()
                        }
                        probe = _HealthProbe("127.0.0.1", stack.ports.edge)
                        port_probe = (
                            _HealthProbe("127.0.0.1", health_port)
                            if _listening(health_port)
                            else None
                        )
                        began = time.perf_counter()
                        if kind == "rate":
                            samples = await _open_loop(
                                streams[target], float(level), args.requests, round_
                            )
                        else:
                            samples = await _closed_loop(streams[target], int(level), args.requests)
                        wall = time.perf_counter() - began
                        health = probe.stop()
                        health_port_s = port_probe.stop() if port_probe is not None else []
                        after = {name: _cpu_rss(pid) for name, pid in pids.items()}
                        lag = {
                            n: _lag_p99(lag_before[n], await _lag_buckets(health_session, u))
                            for n, u in lag_urls.items()
                        }
                        summary = _summary(samples, wall)
                        tokens = sum(s.tokens for s in samples if s.error is None)
                        used = {n: after[n][0] - before[n][0] for n in pids}
                        relay_cpu = used["edge"] + used["orchestrator"]
                        source_cpu = sum(v for n, v in used.items() if n.startswith("source"))

                        def per_token(cpu: float, tokens: int = tokens) -> float | None:
                            return 1e6 * cpu / tokens if tokens else None

                        summary.update(
                            {
                                "target": target,
                                kind: level,
                                "round": round_,
                                "wall_s": wall,
                                "relay_cpu_s": relay_cpu,
                                "relay_cpu_us_per_token": per_token(relay_cpu),
                                "orchestrator_cpu_us_per_token": per_token(used["orchestrator"]),
                                "edge_cpu_us_per_token": per_token(used["edge"]),
                                "source_cpu_us_per_token": per_token(source_cpu),
                                # Tokens relayed per second of relay CPU: what one core carries
                                # at this load (the hops of the target together).
                                "tokens_per_relay_cpu_s": tokens / relay_cpu if relay_cpu else None,
                                "relay_cores_busy": relay_cpu / wall if wall else None,
                                "load_average_1m": os.getloadavg()[0],
                                "edge_rss_mib": after["edge"][1] / 2**20,
                                "orchestrator_rss_mib": after["orchestrator"][1] / 2**20,
                                "healthz_p50_s": _pct(health, 0.5),
                                "healthz_p99_s": _pct(health, 0.99),
                                "healthz_max_s": max(health) if health else None,
                                "healthz_port_p99_s": _pct(health_port_s, 0.99),
                                "edge_loop_lag_p99_s": lag["edge"],
                                "orchestrator_loop_lag_p99_s": lag["orchestrator"],
                                "samples": [asdict(s) for s in samples],
                            }
                        )
                        runs.append(summary)
                        cpu = summary["relay_cpu_us_per_token"] or 0
                        print(
                            f"{target:13} {kind}={level} round {round_}: "
                            f"ttft p50 {1000 * (summary['ttft_s_p50'] or 0):.1f} ms, "
                            f"{summary['output_tokens_per_s']:.0f} tok/s, "
                            f"{summary['tokens_per_piece'] or 0:.2f} tok/piece, "
                            f"relay {cpu:.0f} µs/tok "
                            f"(orch. {summary['orchestrator_cpu_us_per_token'] or 0:.0f}, "
                            f"edge {summary['edge_cpu_us_per_token'] or 0:.0f}), "
                            f"load {summary['load_average_1m']:.2f}, "
                            f"errors {summary['errors']}",
                            flush=True,
                        )
        finally:
            await close()
    return runs


def _markdown(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    key = "rate" if args.rate else "concurrency"
    head = (
        f"| target | {key} | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | TPOT p50 (ms) |"
        " tokens/piece | e2e p50 (s) | tok/s | req/s | errors | relay CPU µs/token |"
        " orch. / edge µs/token | tok/s per relay core | /healthz p99, API / health port (ms) |"
        " loop lag p99, edge / orch. (ms) | load 1m |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], run[key]), []).append(run)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.1f}"

    def median(group: list[dict[str, Any]], name: str) -> float | None:
        values = [g[name] for g in group if g.get(name) is not None]
        return statistics.median(values) if values else None

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    for (target, level), group in groups.items():
        cpu = median(group, "relay_cpu_us_per_token")
        e2e = median(group, "e2e_s_p50")
        per_piece = median(group, "tokens_per_piece")
        rows.append(
            f"| {target} | {level} | {ms(median(group, 'ttft_s_p50'))} /"
            f" {ms(median(group, 'ttft_s_p99'))} | {ms(median(group, 'itl_s_p50'))} /"
            f" {ms(median(group, 'itl_s_p99'))} | {ms(median(group, 'tpot_s_p50'))} |"
            f" {'-' if per_piece is None else f'{per_piece:.2f}'} |"
            f" {'-' if e2e is None else f'{e2e:.2f}'} |"
            f" {median(group, 'output_tokens_per_s') or 0:.0f} |"
            f" {median(group, 'requests_per_s') or 0:.1f} | {sum(g['errors'] for g in group)} |"
            f" {'-' if cpu is None else f'{cpu:.0f}'} |"
            f" {num(median(group, 'orchestrator_cpu_us_per_token'))} /"
            f" {num(median(group, 'edge_cpu_us_per_token'))} |"
            f" {num(median(group, 'tokens_per_relay_cpu_s'))} |"
            f" {ms(median(group, 'healthz_p99_s'))} / {ms(median(group, 'healthz_port_p99_s'))} |"
            f" ≤ {ms(median(group, 'edge_loop_lag_p99_s'))} /"
            f" ≤ {ms(median(group, 'orchestrator_loop_lag_p99_s'))} |"
            f" {median(group, 'load_average_1m') or 0:.1f} |"
        )
    source = "the fast source (benchmarks/fastsource.py)" if args.source == "fast" else "Triton"
    note = (
        f"\nModel `{args.model}` on {source}"
        + ("" if args.token_interval_ms is None else f" at {args.token_interval_ms:g} ms a token")
        + (
            ""
            if args.stream_interval_ms is None
            else f", stream interval {args.stream_interval_ms:g} ms"
            + (f" (the source {args.source_stream_interval}s it)" if args.source == "fast" else "")
        )
        + f", max_tokens {args.max_tokens}, {args.requests} requests per run,"
        f" {args.rounds} alternating rounds (medians shown). Relay CPU: edge + orchestrator CPU"
        " time during the run over the tokens delivered (it includes their idle work); tok/s per"
        " relay core: tokens over that CPU time. Load 1m: the machine's load average. Loop lag:"
        " the bucket bound of tokenrelay_event_loop_lag_seconds under which 99% of the run's"
        " samples fell. ITL times the pieces of text as they arrive; TPOT is (e2e - TTFT) /"
        " (tokens - 1); tokens/piece above 1 means deltas were merged (coalesced) on the way.\n"
    )
    return head + "\n".join(rows) + "\n" + note


def _plots(runs: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "rate" if args.rate else "concurrency"
    written = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for target in args.targets:
        ttft = [
            1000 * s["ttft_s"]
            for r in runs
            if r["target"] == target
            for s in r["samples"]
            if s["ttft_s"] is not None
        ]
        if ttft:
            ax.hist(ttft, bins=40, histtype="step", label=target)
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("requests")
    ax.legend()
    fig.tight_layout()
    written.append(out / "ttft_distribution.png")
    fig.savefig(written[-1])
    plt.close(fig)
    for metric, label in (("ttft_s_p50", "TTFT p50 (ms)"), ("output_tokens_per_s", "output tok/s")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for target in args.targets:
            points: dict[Any, list[float]] = {}
            for r in runs:
                if r["target"] == target and r[metric] is not None:
                    points.setdefault(r[key], []).append(r[metric])
            xs = sorted(points)
            ys = [
                statistics.median(points[x]) * (1000 if metric.endswith("_s_p50") else 1)
                for x in xs
            ]
            ax.plot(xs, ys, marker="o", label=target)
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        written.append(out / f"{metric.split('_')[0]}_vs_{key}.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


def _paced_repository(workdir: Path, interval_ms: float) -> Path:
    """A model repository holding a copy of the synthetic model at another pace."""
    repository = workdir / "triton_models"
    shutil.copytree(REPO / "triton_models" / "synthetic", repository / "synthetic")
    config = repository / "synthetic" / "config.pbtxt"
    text = config.read_text()
    paced = re.sub(
        r'(key: "token_interval_ms", value: \{ string_value: )"[^"]*"',
        rf'\1"{interval_ms:g}"',
        text,
    )
    if paced == text:
        raise SystemExit("the synthetic model's config has no token_interval_ms to change")
    config.write_text(paced)
    return repository


def _start_fast_source(
    interval_ms: float, stream_interval: str = "honour"
) -> tuple[subprocess.Popen[str], str]:
    """``benchmarks/fastsource.py`` on a free port: (its process, its address)."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fastsource.py"),
            "--port",
            "0",
            "--token-interval-ms",
            str(interval_ms),
            "--stream-interval",
            stream_interval,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"the fast source did not start: {line!r}")
    return process, f"127.0.0.1:{int(line.split()[-1])}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=("synthetic", "smollm2"), default="synthetic")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s")
    parser.add_argument("--requests", type=int, default=64, help="per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--token-interval-ms",
        type=float,
        default=None,
        help="the synthetic model's pace (its config says 20 ms, 50 tokens/s per stream); with"
        " --source fast, that server's pace (default 0: as fast as the relay reads)",
    )
    parser.add_argument(
        "--source",
        choices=("triton", "fast"),
        default="triton",
        help="tritonserver with the model, or benchmarks/fastsource.py (the same protocol and"
        " bytes, fast enough to find the relay's limit)",
    )
    parser.add_argument(
        "--source-processes",
        type=int,
        default=1,
        help="with --source fast: that many servers, each a Triton node of the orchestrator",
    )
    parser.add_argument(
        "--source-stream-interval",
        choices=("honour", "ignore"),
        default="honour",
        help="with --source fast: merge each stream's tokens by the stream interval the"
        " orchestrator passes on (as tokenrelay's vLLM and CPU models do), or send one response"
        " per token (as Triton's vLLM backend does)",
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=float,
        default=None,
        help="each request asks for this stream interval (tokens that arrive within it ride"
        " in one message)",
    )
    parser.add_argument(
        "--config",
        default="",
        help="extra TOML for the orchestrator and edge (e.g. worker counts), appended to the"
        " benchmark's own",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, to check it runs")
    parser.add_argument(
        "--event-loop", default="auto", help="the services' loop: auto, uvloop or asyncio"
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="edge and orchestrator export every span over OTLP (to a sink in this process)",
    )
    parser.add_argument(
        "--edge-hop",
        choices=("frames", "grpc"),
        default="frames",
        help="how the edge's generations reach the orchestrator (the stack's default: frames)",
    )
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.token_interval_ms is not None and args.model != "synthetic":
        parser.error("--token-interval-ms paces the synthetic model only")
    if args.source == "fast" and (args.model != "synthetic" or "triton-http" in args.targets):
        parser.error("--source fast stands in for the synthetic model over gRPC only")
    if args.smoke:
        args.concurrency, args.requests, args.rounds, args.max_tokens = [2], 4, 1, 8
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "tokenrelay.toml"
        config.write_text(
            "[orchestrator.admission]\nmax_concurrent = 1024\nmax_queue = 1024\n" + args.config
        )
        models = ("synthetic",) if args.model == "synthetic" else ("smollm2",)
        sink = _TraceSink() if args.tracing else None
        # The services run this checkout's code (an A/B run can use another checkout's
        # benchmarks/loadgen.py with the same virtualenv).
        path = os.pathsep.join(filter(None, [str(REPO / "services"), os.environ.get("PYTHONPATH")]))
        health_port = free_port()
        env = {
            "TOKENRELAY_EVENT_LOOP": args.event_loop,
            "PYTHONPATH": path,
            "TOKENRELAY_EDGE_HEALTH": f"127.0.0.1:{health_port}",
        }
        if sink is not None:
            env |= {
                "TOKENRELAY_TRACING": "otlp",
                "TOKENRELAY_TRACING_ENDPOINT": sink.url,
                "OTEL_BSP_SCHEDULE_DELAY": "500",
            }
        repository = REPO / "triton_models"
        sources_: list[subprocess.Popen[str]] = []
        addresses: list[str] = []
        ports = StackPorts.free()
        if args.edge_hop == "grpc":
            ports = dataclasses.replace(ports, orchestrator_frames=0)
        if args.source == "fast":
            started = [
                _start_fast_source(args.token_interval_ms or 0.0, args.source_stream_interval)
                for _ in range(args.source_processes)
            ]
            addresses = [address for _, address in started]
            sources_ = [process for process, _ in started]
            env["TOKENRELAY_TRITON"] = ",".join(addresses)
            stack = Stack(repository, ports, config=config, env=env, nodes=0)
        else:
            if args.token_interval_ms is not None:
                repository = _paced_repository(Path(workdir), args.token_interval_ms)
            stack = Stack(repository, ports, models=models, config=config, env=env)
        try:
            stack.start()
            triton = addresses[0] if sources_ else stack.triton_grpc
            # The clients' loop is uvloop too, so that the load generator is not the first to
            # run out of CPU when the relay is loaded past the model.
            runs = _loop.run(_run(args, stack, triton, [p.pid for p in sources_], health_port))
        finally:
            stack.stop()
            for process in sources_:
                process.terminate()
                served, _ = process.communicate(timeout=10)
                print(f"fast source: {served.strip()}")  # its streams and responses, warm-up too
            if sink is not None:
                print(f"trace sink received {sink.batches} batches, {sink.bytes} bytes")
                sink.close()
    (args.out / "results.json").write_text(
        json.dumps(
            {"arguments": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs},
            indent=1,
        )
    )
    table = _markdown(runs, args)
    (args.out / "results.md").write_text(table)
    plots = _plots(runs, args, args.out)
    print("\n" + table)
    print(
        "wrote",
        ", ".join(str(p) for p in [args.out / "results.json", args.out / "results.md", *plots]),
    )


if __name__ == "__main__":
    main()
