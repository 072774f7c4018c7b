"""``tokenrelay chat``: stream an answer from a deployment, for operators checking it.

    tokenrelay chat "What is Triton?"                     # through the edge (OpenAI API, SSE)
    tokenrelay chat --grpc 127.0.0.1:50051 "Hello"        # straight from the orchestrator
    tokenrelay chat                                        # a conversation, one line per turn
    tokenrelay chat --collection handbook "How do I ...?"  # answer from ingested documents
    tokenrelay ingest docs/ --collection handbook          # see tokenrelay.ingest
    tokenrelay collections [--delete handbook]
    tokenrelay usage [--days 7] [--key alice]             # see tokenrelay.tenancy.usage_cli

The answer streams to stdout; a summary (model and node that served, time to first token,
tokens, tokens/s) goes to stderr, and with ``--collection`` the retrieved passages the answer was
given ([n], source, score). ``TOKENRELAY_API_KEY`` (edge) and ``TOKENRELAY_INTERNAL_SECRET``
(orchestrator) are sent when set. Exit status: 0 answered, 1 refused or failed (the error's
message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import grpc

from tokenrelay import ingest
from tokenrelay.tenancy import usage_cli
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.v1 import retrieval_pb2 as rpb

__all__ = ["main"]

_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_STATUS = {
    rpb.RETRIEVAL_STATUS_USED: "used",
    rpb.RETRIEVAL_STATUS_EMPTY: "nothing relevant found",
    rpb.RETRIEVAL_STATUS_FAILED: "failed",
}


class ChatError(Exception):
    """The deployment refused or failed the request; the message is its own."""


@dataclass
class Served:
    model: str = ""
    node: str = ""
    fallback: bool = False
    completion_tokens: int = 0
    citations: list[str] = field(default_factory=list)
    retrieval: str = ""


async def _http(
    args: argparse.Namespace, messages: list[dict[str, str]], served: Served
) -> AsyncIterator[str]:
    headers = {}
    if os.environ.get("TOKENRELAY_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['TOKENRELAY_API_KEY']}"
    body = {
        "model": args.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.collection:
        body["retrieval"] = {"collection": args.collection}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{args.url}/v1/chat/completions", json=body, headers=headers) as response,
    ):
        if response.status != 200:
            try:
                error = (await response.json())["error"]["message"]
            except (aiohttp.ContentTypeError, KeyError, TypeError, ValueError):
                error = response.reason or ""
            raise ChatError(f"HTTP {response.status}: {error}")
        served.fallback = "x-tokenrelay-fallback" in response.headers
        event = "message"
        async for raw in response.content:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                if event == "error":
                    raise ChatError(data["error"]["message"])
                served.model = data.get("model", served.model)
                if "retrieval" in data:
                    report = data["retrieval"]
                    served.retrieval = report.get("message") or report["status"]
                    if served.retrieval == "empty":
                        served.retrieval = "nothing relevant found"
                    served.citations = [
                        f"[{c['number']}] {c['source']} (score {c['score']:.2f})"
                        for c in report["citations"]
                    ]
                if data.get("usage"):
                    served.completion_tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices", []):
                    if choice["delta"].get("content"):
                        yield choice["delta"]["content"]


async def _grpc(
    args: argparse.Namespace, messages: list[dict[str, str]], served: Served
) -> AsyncIterator[str]:
    secret = os.environ.get("TOKENRELAY_INTERNAL_SECRET")
    metadata = (("authorization", f"Bearer {secret}"),) if secret else ()
    request = pb.GenerateStreamRequest(
        model=args.model,
        chat=pb.Chat(
            messages=[
                pb.ChatMessage(role=_ROLES[m["role"]], content=m["content"]) for m in messages
            ]
        ),
    )
    if args.max_tokens is not None:
        request.sampling.max_tokens = args.max_tokens
    if args.collection:
        request.retrieval.collection = args.collection
    async with grpc.aio.insecure_channel(args.grpc) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            async for message in stub.GenerateStream(
                request, metadata=metadata, timeout=args.timeout
            ):
                if message.HasField("start"):
                    by = message.start.served_by
                    served.model, served.node, served.fallback = by.model, by.node, by.fallback
                    if message.start.HasField("retrieval"):
                        report = message.start.retrieval
                        served.retrieval = report.message or _STATUS.get(report.status, "")
                        served.citations = [
                            f"[{c.number}] {c.source} (score {c.score:.2f})"
                            for c in report.citations
                        ]
                if message.HasField("end"):
                    served.completion_tokens = message.end.usage.completion_tokens
                if message.text:
                    yield message.text
        except grpc.aio.AioRpcError as exc:
            raise ChatError(f"{exc.code().name}: {exc.details()}") from None


async def _turn(args: argparse.Namespace, messages: list[dict[str, str]]) -> str:
    served = Served()
    source = _grpc if args.grpc else _http
    began = time.perf_counter()
    first: float | None = None
    pieces = []
    async for piece in source(args, messages, served):
        if first is None:
            first = time.perf_counter() - began
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    elapsed = time.perf_counter() - began
    sys.stdout.write("\n")
    where = served.model + (f" on {served.node}" if served.node else "")
    rate = served.completion_tokens / elapsed if elapsed else 0.0
    print(
        f"[{where}{' (fallback)' if served.fallback else ''}:"
        f" first token {1000 * (first or elapsed):.0f} ms, {served.completion_tokens} tokens,"
        f" {rate:.0f} tokens/s]",
        file=sys.stderr,
    )
    if args.collection:
        print(
            "sources: " + ("; ".join(served.citations) or f"none ({served.retrieval})"),
            file=sys.stderr,
        )
    return "".join(pieces)


async def _chat(args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    prompts = [args.prompt] if args.prompt else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            prompt = prompts.pop()
        else:
            try:
                prompt = await asyncio.to_thread(input, "> ")
            except EOFError:
                return 0
            if not prompt.strip():
                continue
        messages.append({"role": "user", "content": prompt})
        try:
            answer = await _turn(args, messages)
        except (ChatError, aiohttp.ClientError, TimeoutError) as exc:
            print(f"tokenrelay chat: {exc or type(exc).__name__}", file=sys.stderr)
            return 1
        messages.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenrelay", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="stream an answer (a conversation without PROMPT)")
    chat.add_argument("prompt", nargs="?", help="one question; without it, read turns from stdin")
    chat.add_argument("--url", default="http://127.0.0.1:8080", help="the edge (default: local)")
    chat.add_argument("--grpc", metavar="HOST:PORT", help="the orchestrator instead of the edge")
    chat.add_argument("--model", default="smollm2-135m-instruct")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--timeout", type=float, default=600.0)
    chat.add_argument("--collection", help="answer from this retrieval collection")
    ingest.add_parser(commands)
    usage_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "usage":
        sys.exit(usage_cli.run(args))
    if args.command == "ingest":
        sys.exit(ingest.run(args))
    if args.command == "collections":
        sys.exit(ingest.collections(args))
    args.url = args.url.rstrip("/")
    try:
        sys.exit(asyncio.run(_chat(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
