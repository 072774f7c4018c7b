"""Bad input at the edge gets the documented 4xx and an OpenAI-shaped error, and harms no one."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from _support import assert_openai
from tokenrelay.stack import Stack

CHAT = "/v1/chat/completions"
GOOD = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _with(**changes: object) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


CASES = [
    (b'{"model": "synthetic", "messages": [', 400, None),
    (b"[1, 2, 3]", 400, None),
    (b'\xff\xfe{"model": 1}', 400, None),
    (
        b'{"model": "synthetic", "messages": [], "temperature": NaN}',
        400,
        None,
    ),
    (_with(model=7), 400, "model"),
    (_with(messages="hello"), 400, "messages"),
    (_with(messages=[]), 400, "messages"),
    (_with(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    (_with(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content"),
    (_with(model="no-such-model"), 404, "model"),
    (_with(max_tokens=-1), 400, "max_tokens"),
    (_with(max_tokens="ten"), 400, "max_tokens"),
    (_with(max_tokens=10**12), 400, "max_tokens"),
    (_with(temperature=7), 400, "temperature"),
    (_with(stream="yes"), 400, "stream"),
    (_with(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (_with(n=17), 400, "n"),
    (_with(response_format={"type": "xml"}), 400, "response_format"),
]


@pytest.mark.parametrize(("body", "status", "param"), CASES)
def test_bad_chat_request(stack: Stack, body: bytes, status: int, param: str | None) -> None:
    response = httpx.post(
        stack.edge_url + CHAT,
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == status, response.text
    error = response.json()
    assert_openai("ErrorResponse", error)
    assert error["error"]["param"] == param
    assert error["error"]["message"] and "Traceback" not in error["error"]["message"]


def test_oversized_body_is_413(stack: Stack) -> None:
    huge = _with(messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}])
    response = httpx.post(stack.edge_url + CHAT, content=huge, timeout=10)
    assert response.status_code == 413
    assert_openai("ErrorResponse", response.json())


def test_unknown_route_and_method_are_openai_errors(stack: Stack) -> None:
    missing = httpx.get(stack.edge_url + "/v1/nothing-here", timeout=5)
    assert missing.status_code == 404
    assert_openai("ErrorResponse", missing.json())
    wrong = httpx.get(stack.edge_url + CHAT, timeout=5)
    assert wrong.status_code == 405
    assert_openai("ErrorResponse", wrong.json())


def test_bad_requests_do_not_disturb_a_running_stream(stack: Stack) -> None:
    """A streaming answer runs to its end while bad requests hammer the edge."""
    result: dict[str, object] = {}

    def stream() -> None:
        body = {**GOOD, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", stack.edge_url + CHAT, json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        result["lines"] = lines

    worker = threading.Thread(target=stream)
    worker.start()
    statuses = set()
    while worker.is_alive():
        for body, _, _ in CASES[:6]:
            statuses.add(httpx.post(stack.edge_url + CHAT, content=body, timeout=10).status_code)
    worker.join()
    lines = result["lines"]
    assert isinstance(lines, list) and lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][len("data: ") :])["usage"]
    assert usage["completion_tokens"] == 40
    assert statuses == {400}
