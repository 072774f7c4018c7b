"""The browser chat page in real headless Chromium (Debian's, driven by Playwright): tokens stream
in progressively over the WebSocket API (over SSE when no socket opens), Stop cancels the
generation on the server, errors are shown to the person."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, Request, WebSocket, WebSocketRoute, sync_playwright

from _support import REPO, triton_metric
from tokenrelay.stack import Stack

CHROMIUM = "/usr/lib/chromium/chromium"  # installed by `make test` (apt), see the Makefile
ARTEFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--disable-gpu", "--disable-quic"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    # The page's CSP forbids eval, which Playwright's wait_for_function uses: bypass it here,
    # and check the header itself below.
    context = browser.new_context(bypass_csp=True)
    opened = context.new_page()
    response = opened.goto(stack.edge_url + "/")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    opened.wait_for_function("document.querySelectorAll('#model option').length > 0")
    opened.select_option("#model", "synthetic")
    yield opened
    context.close()


def _answer_lengths(page: Page, seconds: float) -> list[int]:
    lengths = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        lengths.append(
            page.evaluate(
                "document.querySelector('.assistant:last-child')?.textContent.length ?? 0"
            )
        )
        time.sleep(0.01)
    return lengths


def test_an_answer_streams_in_progressively_over_the_websocket(page: Page) -> None:
    sockets: list[WebSocket] = []
    received: list[str] = []
    posts: list[Request] = []

    def opened(ws: WebSocket) -> None:
        sockets.append(ws)
        ws.on("framereceived", lambda frame: received.append(str(frame)))

    page.on("websocket", opened)
    page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
    page.fill("#max-tokens", "40")  # 40 words, 20 ms apart
    page.fill("#prompt", "Tell me something.")
    page.click("#send")
    lengths = _answer_lengths(page, 1.5)
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=10_000)
    final = page.text_content(".assistant:last-child") or ""
    assert len(final.split()) == 40
    assert len(set(lengths)) >= 10  # the text grew through many sizes, not all at once
    assert page.is_hidden("#error")
    assert [ws.url.split("/", 3)[-1] for ws in sockets] == ["v1/ws"]
    assert page.text_content("#transport") == "WebSocket"
    chunks = [m for m in received if '"type":"chunk"' in m]
    assert len(chunks) >= 10 and any('"type":"done"' in m for m in received)
    assert not posts  # the answer came over the socket, not over an SSE request
    ARTEFACTS.mkdir(exist_ok=True)
    shot = ARTEFACTS / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_cancels_the_generation_on_the_server(page: Page, stack: Stack) -> None:
    metric = "tokenrelay_model_requests_total"
    before = triton_metric(stack.triton_metrics_url, metric, model="synthetic", outcome="cancelled")
    page.fill("#max-tokens", "400")  # 8 s of words
    page.fill("#prompt", "Go on and on.")
    page.click("#send")
    page.wait_for_function(
        "document.querySelector('.assistant:last-child')?.textContent.length > 10"
    )
    page.click("#stop")
    page.wait_for_selector(".assistant.stopped")
    deadline = time.monotonic() + 5
    while (
        triton_metric(stack.triton_metrics_url, metric, model="synthetic", outcome="cancelled")
        <= before
    ):
        assert time.monotonic() < deadline, "the model never saw the request cancelled"
        time.sleep(0.1)
    words = len((page.text_content(".assistant:last-child") or "").split())
    assert 0 < words < 400


def test_without_a_websocket_the_page_streams_over_sse(page: Page) -> None:
    def refuse(ws: WebSocketRoute) -> None:
        ws.close(code=1011, reason="no sockets here")  # as a proxy that does not pass them

    page.route_web_socket("**/v1/ws", refuse)
    page.fill("#max-tokens", "20")
    page.fill("#prompt", "Tell me something else.")
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#send")
    assert request.value.method == "POST"
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=10_000)
    assert len((page.text_content(".assistant:last-child") or "").split()) == 20
    assert page.text_content("#transport") == "SSE"
    assert page.is_hidden("#error")


def test_errors_are_shown_to_the_person(page: Page) -> None:
    page.fill("#max-tokens", "0")
    page.fill("#prompt", "Hello?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "max_tokens" in (page.text_content("#error") or "")
    page.fill("#api-key", "not-a-key")  # keyless local stack: the key is ignored, models load
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#error').hidden")
