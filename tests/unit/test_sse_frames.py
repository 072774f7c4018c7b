"""A streamed chunk that carries only text is written from its stream's pre-encoded parts: the
bytes must be exactly those of the chunk encoded whole (what the edge wrote before), whatever
the text holds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tokenrelay.edge import _stream
from tokenrelay.edge._stream import Chat as _Chat
from tokenrelay.edge._stream import Completion as _Completion
from tokenrelay.edge._stream import Piece, ResumableStream, SSEWriter, TextChunk, TextFrames
from tokenrelay.edge._ws import _Generation
from tokenrelay.v1 import generation_pb2 as pb

_ID = "chatcmpl-r1-abcDEF_-0123456789abcdef"
# Quotes, backslashes, every control character, DEL, non-ASCII, astral characters, the line and
# paragraph separators (valid in JSON strings but not in JavaScript's), and an empty text.
TEXTS = [
    "",
    " plain",
    'he said "hi" \\ back\\slash /slash',
    "".join(chr(c) for c in range(32)) + "\x7f",
    "\n\r\t\b\f",
    "é ß 中文 Ωμέγα",
    "😀 \U0001f680 \U00010348",
    "\u2028 and \u2029",
    "</script><!--",
    "TokenrelayTextGoesHere",
]


def _chat(model: str = "synthetic", with_usage: bool = True) -> _Chat:
    return _Chat(_ID, 1_700_000_000, model, with_usage)


def _old_chat_frame(shape: _Chat, text: str, index: int = 0) -> bytes:
    chunk = _stream.chat_chunk(
        shape.id, shape.created, shape.model, {"content": text}, None, shape.with_usage, index
    )
    return (
        b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


def _piece(text: str, index: int = 0) -> Piece:
    piece = Piece()
    piece.index = index
    piece.add(pb.GenerateStreamResponse(text=text, index=index))
    return piece


def test_chat_text_chunks_are_the_bytes_of_the_whole_chunk() -> None:
    for with_usage in (True, False):
        shape = _chat(with_usage=with_usage)
        for index in (0, 3):
            for text in TEXTS:
                chunk = shape.piece(_piece(text, index))
                assert isinstance(chunk, TextChunk)
                frame = SSEWriter.frame(chunk)
                assert frame == _old_chat_frame(shape, text, index)
                assert ResumableStream.frame(chunk) == frame
                assert json.loads(frame[6:])["choices"][0]["delta"] == {"content": text}


@given(st.text(st.characters(codec="utf-8")))
def test_any_text_encodes_as_the_whole_chunk(text: str) -> None:
    shape = _chat()
    assert SSEWriter.frame(shape.piece(_piece(text))) == _old_chat_frame(shape, text)


def test_completion_text_chunks_are_the_bytes_of_the_whole_chunk() -> None:
    shape = _Completion("cmpl-r1", 1_700_000_000, "synthetic", False)
    for text in TEXTS:
        chunk = shape.piece(_piece(text, 1))
        expected = _stream.completion_chunk(shape.id, shape.created, shape.model, text, None, 1)
        assert SSEWriter.frame(chunk) == SSEWriter.frame(expected)


def test_constant_parts_holding_the_placeholder_are_encoded_whole() -> None:
    # A model whose name is the placeholder: no split point, so each chunk is encoded whole.
    shape = _chat(model="TokenrelayTextGoesHere")
    for text in TEXTS:
        assert SSEWriter.frame(shape.piece(_piece(text))) == _old_chat_frame(shape, text)


def test_pieces_with_tool_calls_or_logprobs_are_whole_chunks() -> None:
    shape = _Chat(_ID, 1, "synthetic", False, logprobs=True)
    piece = _piece("x")
    piece.logprobs.append(pb.TokenLogprob(token="x", logprob=-0.5))
    assert isinstance(shape.piece(piece), dict)
    piece = _piece("")
    piece.calls.append(pb.ToolCallDelta(index=0, id="call_1", name="f", arguments="{"))
    chunk: Any = _chat().piece(piece)
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "f"


def test_a_sink_that_does_not_write_sse_gets_the_chunk() -> None:
    frames = TextFrames(lambda t: {"text": t, "n": 1})
    chunk = TextChunk(frames, 'a"b')
    assert chunk.payload() == {"text": 'a"b', "n": 1}
    assert _Generation.frame(chunk) == {"text": 'a"b', "n": 1}
    chat = _chat().piece(_piece("hi"))
    assert _Generation.frame(chat) == _stream.chat_chunk(
        _ID, 1_700_000_000, "synthetic", {"content": "hi"}, None, True
    )
    assert frames.frame('a"b') == b'data: {"text":"a\\"b","n":1}\n\n'
