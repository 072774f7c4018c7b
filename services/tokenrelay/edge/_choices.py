"""Choices as OpenAI spells them: what the orchestrator's messages carry for one choice (text,
tool-call pieces, logprobs) put together — into a streamed delta (``Piece``) or a whole answer
(``Answer``) — and written the way each endpoint writes it.

Chat: tool calls as ``message.tool_calls`` (content null when the answer is only calls) and, in
a stream, ``delta.tool_calls`` (a call's first piece with ``id``, ``type`` and
``function.name``, later ones with ``function.arguments`` only); logprobs as
``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null}``.
Completions: logprobs as ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, the
offsets counted from the start of that choice's text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenrelay.v1 import generation_pb2 as pb

__all__ = ["Answer", "Piece", "chat_logprobs", "tool_call_deltas"]


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: Iterable[pb.TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _bytes(e.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)}
                    for t in e.top_logprobs
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: Iterable[pb.TokenLogprob], offset: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        body["tokens"].append(e.token)
        body["token_logprobs"].append(e.logprob)
        body["top_logprobs"].append({t.token: t.logprob for t in e.top_logprobs})
        body["text_offset"].append(offset)
        offset += len(e.token)
    return body


def tool_call_deltas(pieces: Iterable[pb.ToolCallDelta]) -> list[dict[str, Any]]:
    """Pieces of calls as ``delta.tool_calls``: consecutive pieces of one call merged."""
    out: list[dict[str, Any]] = []
    for piece in pieces:
        last = out[-1] if out else None
        if last is not None and last["index"] == piece.index and not piece.id:
            last["function"]["arguments"] = last["function"].get("arguments", "") + piece.arguments
            continue
        item: dict[str, Any] = {"index": piece.index}
        if piece.id:
            item["id"] = piece.id
            item["type"] = "function"
            item["function"] = {"name": piece.name, "arguments": piece.arguments}
        else:
            item["function"] = {"arguments": piece.arguments}
        out.append(item)
    return out


class Piece:
    """What consecutive messages of one choice carry, to go out as one streamed chunk."""

    def __init__(self) -> None:
        self.index = 0
        self.texts: list[str] = []
        self.calls: list[pb.ToolCallDelta] = []
        self.logprobs: list[pb.TokenLogprob] = []

    def add(self, message: pb.GenerateStreamResponse) -> None:
        if message.text:
            self.texts.append(message.text)
        if message.tool_calls:
            self.calls.extend(message.tool_calls)
        if message.logprobs:
            self.logprobs.extend(message.logprobs)

    def __bool__(self) -> bool:
        return bool(self.texts or self.calls or self.logprobs)

    def take(self) -> tuple[str, list[pb.ToolCallDelta], list[pb.TokenLogprob]]:
        taken = ("".join(self.texts), self.calls, self.logprobs)
        self.texts, self.calls, self.logprobs = [], [], []
        return taken

    @staticmethod
    def chat_delta(text: str, calls: list[pb.ToolCallDelta]) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if text or not calls:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = tool_call_deltas(calls)
        return delta

    @staticmethod
    def completion_logprobs(entries: list[pb.TokenLogprob], offset: int) -> dict[str, Any]:
        return _completion_logprobs(entries, offset)


class Answer:
    """One whole choice, put together from its messages."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.texts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[pb.TokenLogprob] = []
        self.end: pb.StreamEnd | None = None

    def add(self, message: pb.GenerateStreamResponse) -> None:
        self.texts.append(message.text)
        for piece in message.tool_calls:
            call = self.calls.setdefault(
                piece.index,
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = call["id"] or piece.id
            call["function"]["name"] = call["function"]["name"] or piece.name
            call["function"]["arguments"] += piece.arguments
        self.logprobs.extend(message.logprobs)
        if message.HasField("end"):
            self.end = message.end

    def chat(self, finish: str, logprobs: bool) -> dict[str, Any]:
        text = "".join(self.texts)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not self.calls else None,
            "refusal": None,
        }
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return {
            "index": self.index,
            "message": message,
            "finish_reason": finish,
            "logprobs": chat_logprobs(self.logprobs) if logprobs else None,
        }

    def completion(self, finish: str, logprobs: bool) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": "".join(self.texts),
            "finish_reason": finish,
            "logprobs": _completion_logprobs(self.logprobs, 0) if logprobs else None,
        }
