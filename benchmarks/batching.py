"""SmolLM2 through the edge at 1, 2, 4 and 8 concurrent streams: what continuous batching buys.

    .venv/bin/python benchmarks/batching.py --out results/batching [--streams 1,2,4,8]
        [--requests 3] [--max-tokens 128] [--rounds 2] [--before DIR]
        [--also NAME:KEY=VALUE,...] [--system-prompt TEXT]

It starts a stack of its own (tritonserver with ``smollm2``, orchestrator, edge on free loopback
ports) from this checkout and, with ``--before DIR``, a second one from another checkout of the
repository (``git archive <commit> | tar -x -C DIR``): every process of that stack imports
tokenrelay from ``DIR/services``. Each ``--also NAME:KEY=VALUE,...`` adds a stack of this
checkout whose smollm2 model config has those parameters (``weights=q8_0``, ``n_threads=1`` …;
``env.NAME=VALUE`` sets an environment variable of its processes instead, ``tree=DIR`` takes
another checkout).
Each level runs closed loop: that many clients, each sending ``--requests`` streamed chat
completions one after the other (different story prompts, temperature 0, ``max_tokens``), stacks
alternating level by level and round by round so that a comparison holds on a noisy machine.
All stacks get the same catalog entry (same chat template and system prompt), so they see the
same prompts.

Per run: aggregate output tokens/s (all tokens over the wall time), per-stream tokens/s (the
median over requests of (tokens - 1) / (end - first token)), time to first token p50/p99, tokens
per answer, and the largest RSS of the Triton Python-backend stub that serves ``smollm2`` while
the run lasted; and per stack, the thread count its model chose at load (``adapt_threads``).
Output: ``results.json`` and ``results.md`` in ``--out``. Figures only: nothing
here asserts a target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.config import Settings  # noqa: E402
from tokenrelay.stack import Stack, StackPorts  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a dragon who is afraid of heights.",
    "Write a long story about a girl who builds a robot from old bicycle parts.",
    "Write a long story about a village where it never stops raining.",
    "Write a long story about two friends who get lost in a big forest.",
    "Write a long story about a cat who wants to become a ship's captain.",
    "Write a long story about an old clockmaker and his last clock.",
    "Write a long story about a baker who bakes bread that makes people sing.",
)


@dataclass
class Sample:
    ttft_s: float | None = None
    e2e_s: float = 0.0
    tokens: int = 0
    error: str | None = None


async def _one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = Sample()
    began = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                content = chunk["choices"] and chunk["choices"][0]["delta"].get("content")
                if content and sample.ttft_s is None:
                    sample.ttft_s = time.perf_counter() - began
                if chunk.get("usage"):
                    sample.tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # counted as an error of the run
        sample.error = type(exc).__name__
    sample.e2e_s = time.perf_counter() - began
    return sample


def _stub_pids(triton_pid: int) -> list[int]:
    """The Python-backend stubs of the ``smollm2`` model under a tritonserver process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        stub = b"triton_python_backend_stub" in command and b"smollm2" in command
        if int(stat[1]) == triton_pid and stub:
            found.append(int(entry.name))
    return found


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process has gone
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _RssWatch:
    """Samples the stubs' RSS every 100 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self.peak = max((_rss(p) for p in pids), default=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, *(_rss(p) for p in self._pids))

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


async def _level(
    url: str, streams: int, requests: int, max_tokens: int
) -> tuple[list[Sample], float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        await _one(session, url, PROMPTS[0], 8)  # warm the connection and the model
        samples: list[Sample] = []

        async def client(index: int) -> None:
            for k in range(requests):
                prompt = PROMPTS[(index + k * streams) % len(PROMPTS)]
                samples.append(await _one(session, url, prompt, max_tokens))

        began = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(streams)))
        return samples, time.perf_counter() - began


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    rates = [
        (s.tokens - 1) / (s.e2e_s - s.ttft_s)
        for s in ok
        if s.ttft_s is not None and s.tokens > 1 and s.e2e_s > s.ttft_s
    ]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "aggregate_tokens_per_s": sum(s.tokens for s in ok) / wall_s,
        "per_stream_tokens_per_s": statistics.median(rates) if rates else None,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "tokens_per_answer": statistics.mean(s.tokens for s in ok) if ok else None,
        "wall_s": wall_s,
    }


def _config(workdir: Path, system_prompt: str) -> Path:
    config = workdir / "tokenrelay.toml"
    config.write_text(
        "[orchestrator.admission]\nmax_concurrent = 1024\nmax_queue = 1024\n\n"
        f'[[models]]\nid = "{MODEL}"\ntriton_model = "smollm2"\nchat_template = "chatml"\n'
        f"default_system_prompt = {json.dumps(system_prompt)}\ncontext_window = 2048\n"
    )
    return config


def _repository(tree: Path, workdir: Path, name: str, parameters: dict[str, str]) -> Path:
    """``tree``'s smollm2 model, in a repository of its own whose ``model.py`` imports tokenrelay
    from ``tree/services`` (the Python-backend stub does not put PYTHONPATH before the virtual
    environment's editable install of this checkout), with ``parameters`` set in its config."""
    repository = workdir / f"models-{name}"
    shutil.copytree(tree / "triton_models" / "smollm2", repository / "smollm2")
    model = repository / "smollm2" / "1" / "model.py"
    shim = f"import sys\n\nsys.path.insert(0, {str(tree / 'services')!r})\n"
    model.write_text(shim + model.read_text())
    config = repository / "smollm2" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        entry = f'{{ key: "{key}", value: {{ string_value: "{value}" }} }}'
        text, found = re.subn(rf'\{{ key: "{re.escape(key)}", value: \{{[^}}]*\}} \}}', entry, text)
        if not found:
            text = text.replace("parameters [", f"parameters [\n  {entry},", 1)
    config.write_text(text)
    return repository


def _threads_chosen(logs: Path) -> str:
    """What the smollm2 model said at load about its thread count (``adapt_threads``), from the
    stack's logs; older trees say nothing."""
    for log in sorted(logs.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "llama: decoding on" in line:
                return line[line.index("llama: decoding on") :].strip()
    return "(no thread choice logged)"


def _start(tree: Path, config: Path, workdir: Path, name: str, parameters: dict[str, str]) -> Stack:
    """A stack whose every process imports tokenrelay from ``tree/services``; parameters named
    ``env.X`` are environment variables of its processes, the others model-config parameters."""
    env = {k.removeprefix("env."): v for k, v in parameters.items() if k.startswith("env.")}
    env["PYTHONPATH"] = str(tree / "services")
    model = {k: v for k, v in parameters.items() if not k.startswith("env.")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Triton's environment is this process's (stack._triton)
    try:
        repository = _repository(tree, workdir, name, model)
        stack = Stack(repository, StackPorts.free(), models=("smollm2",), config=config)
        stack.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return stack


def _markdown(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        "| code | streams | aggregate tok/s | per-stream tok/s | TTFT p50 / p99 (ms) |"
        " tokens/answer | stub RSS (MiB) | errors |\n|---|---|---|---|---|---|---|---|\n"
    )
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["code"], run["streams"]), []).append(run)

    def median(group: list[dict[str, Any]], name: str) -> float:
        values = [g[name] for g in group if g[name] is not None]
        return statistics.median(values) if values else float("nan")

    rows = []
    for (code, streams), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append(
            f"| {code} | {streams} | {median(group, 'aggregate_tokens_per_s'):.0f} |"
            f" {median(group, 'per_stream_tokens_per_s'):.0f} |"
            f" {1000 * median(group, 'ttft_p50_s'):.0f} /"
            f" {1000 * median(group, 'ttft_p99_s'):.0f} |"
            f" {median(group, 'tokens_per_answer'):.0f} |"
            f" {max(g['stub_rss_bytes'] for g in group) / 2**20:.0f} |"
            f" {sum(g['errors'] for g in group)} |"
        )
    note = (
        f"\nmax_tokens {args.max_tokens}, temperature 0, {args.requests} requests per stream per"
        f" run, {args.rounds} alternating rounds (medians; RSS: the largest seen).\n"
    )
    return head + "\n".join(rows) + "\n" + note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=3, help="per stream and run")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, help="another checkout to compare with")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="one more stack of this checkout with these model-config parameters"
        " (e.g. q8_0:weights=q8_0), compared with the others",
    )
    parser.add_argument(
        "--system-prompt",
        default=next(m for m in Settings().models if m.id == MODEL).default_system_prompt,
        help="the catalog's default system prompt for both stacks (default: this checkout's)",
    )
    args = parser.parse_args(argv)
    levels = [int(s) for s in args.streams.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        config = _config(Path(workdir), args.system_prompt)
        variants: dict[str, tuple[Path, dict[str, str]]] = {"after": (REPO, {})}
        if args.before:
            variants["before"] = (args.before.resolve(), {})
        for also in args.also:
            name, _, settings = also.partition(":")
            pairs = dict(item.split("=", 1) for item in settings.split(",") if item)
            tree = Path(pairs.pop("tree")).resolve() if "tree" in pairs else REPO
            variants[name] = (tree, pairs)
        stacks = {}
        try:
            for code, (tree, parameters) in variants.items():
                stacks[code] = _start(tree, config, Path(workdir), code, parameters)
        except BaseException:
            for stack in stacks.values():
                stack.stop()
            raise
        chosen = {code: _threads_chosen(stack.logs) for code, stack in stacks.items()}
        for code, line in chosen.items():
            print(f"{code}: {line}", flush=True)
        try:
            for round_ in range(args.rounds):
                for streams in levels:
                    for code, stack in stacks.items():
                        assert stack.triton is not None
                        watch = _RssWatch(_stub_pids(stack.triton.pid))
                        samples, wall = asyncio.run(
                            _level(stack.edge_url, streams, args.requests, args.max_tokens)
                        )
                        summary = _summary(samples, wall)
                        summary |= {
                            "code": code,
                            "streams": streams,
                            "round": round_,
                            "stub_rss_bytes": watch.close(),
                            "samples": [asdict(s) for s in samples],
                        }
                        runs.append(summary)
                        print(
                            f"{code:6} streams={streams} round {round_}:"
                            f" {summary['aggregate_tokens_per_s']:.0f} tok/s,"
                            f" per stream {summary['per_stream_tokens_per_s'] or 0:.0f},"
                            f" TTFT p50 {1000 * (summary['ttft_p50_s'] or 0):.0f} ms,"
                            f" errors {summary['errors']}",
                            flush=True,
                        )
        finally:
            for stack in stacks.values():
                stack.stop()
    arguments = {k: str(v) for k, v in vars(args).items() if k != "out"}
    (args.out / "results.json").write_text(
        json.dumps({"arguments": arguments, "threads": chosen, "runs": runs}, indent=1)
    )
    table = _markdown(runs, args) + "".join(f"\n{code}: {line}" for code, line in chosen.items())
    (args.out / "results.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
