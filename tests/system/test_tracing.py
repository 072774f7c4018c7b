"""One trace per request through the running stack: edge, orchestrator and Triton spans, collected
by an OTLP receiver of the test's own on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from _support import REPO, SpanSink
from tokenrelay.stack import Stack, StackPorts
from tokenrelay.v1 import retrieval_pb2 as rpb
from tokenrelay.v1 import retrieval_pb2_grpc as rpb_grpc

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Stack, SpanSink]]:
    sink = SpanSink()
    env = {
        "TOKENRELAY_TRACING": "otlp",
        "TOKENRELAY_TRACING_ENDPOINT": sink.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not 5 s
    }
    triton = (
        "--trace-config=mode=opentelemetry",
        f"--trace-config=opentelemetry,url={sink.url}",
        "--trace-config=opentelemetry,resource=service.name=triton",
        "--trace-config=opentelemetry,bsp_schedule_delay=100",
        "--trace-config=rate=1",
        "--trace-config=level=TIMESTAMPS",
    )
    try:
        with Stack(
            REPO / "triton_models",
            StackPorts.free(),
            models=("synthetic", "minilm"),
            env=env,
            triton_args=triton,
            fast_stop=True,
        ) as stack:
            yield stack, sink
    finally:
        sink.close()


def _wait_for(
    sink: SpanSink, trace_id: str, names: set[str], timeout_s: float = 15.0
) -> list[dict[str, Any]]:
    """The trace's spans once all of ``names`` arrived (services export in their own batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [s for s in sink.spans() if s["trace_id"] == trace_id]
        if names <= {s["name"] for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def _one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, (name, [s["name"] for s in spans])
    return found[0]


def test_one_request_is_one_trace_from_the_callers_span_to_triton(
    traced: tuple[Stack, SpanSink],
) -> None:
    stack, sink = traced
    response = httpx.post(
        f"{stack.edge_url}/v1/chat/completions",
        json={
            "model": "synthetic",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
        },
        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        timeout=10,
    )
    assert response.status_code == 200
    spans = _wait_for(
        sink,
        CALLER_TRACE,
        {
            "POST /v1/chat/completions",
            "tokenrelay.v1.GenerationService/GenerateStream",
            "tokenrelay.validate",
            "tokenrelay.admission",
            "triton.generate",
        },
    )
    edge = _one(spans, "POST /v1/chat/completions")
    assert edge["service"] == "tokenrelay-edge" and edge["parent"] == CALLER_SPAN
    assert edge["attributes"]["gen_ai.request.model"] == "synthetic"
    assert edge["attributes"]["gen_ai.usage.output_tokens"] == 5
    assert edge["attributes"]["http.response.status_code"] == 200
    server = _one(spans, "tokenrelay.v1.GenerationService/GenerateStream")
    assert server["service"] == "tokenrelay-orchestrator" and server["parent"] == edge["span_id"]
    assert server["attributes"]["gen_ai.usage.output_tokens"] == 5
    assert server["attributes"]["tokenrelay.outcome"] == "length"
    for child in ("tokenrelay.validate", "tokenrelay.admission", "triton.generate"):
        assert _one(spans, child)["parent"] == server["span_id"], child
    call = _one(spans, "triton.generate")
    assert call["attributes"]["server.address"] == stack.triton_grpc
    assert call["attributes"]["tokenrelay.route"] == "least in flight"
    # Triton's own spans: tritonserver 2.51 starts a trace of its own for a ModelStreamInfer
    # request even though the stream's metadata carries our traceparent (checked with a bare
    # tritonclient stream too), so they are found by the request id both sides record.
    request_id = server["attributes"]["tokenrelay.request_id"]
    assert call["attributes"]["triton.request_id"] == request_id
    deadline = time.monotonic() + 10
    while not [s for s in sink.spans() if s["attributes"].get("triton.request_id") == request_id]:
        assert time.monotonic() < deadline, "Triton exported no span for the request"
        time.sleep(0.1)


def test_a_cancelled_request_ends_its_spans_marked_cancelled(
    traced: tuple[Stack, SpanSink],
) -> None:
    stack, sink = traced
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    # A text completion: its client going away cancels it at once (a chat completion's stream
    # would wait for its client to resume it: edge/_resume.py).
    body = {"model": "synthetic", "prompt": "hi", "max_tokens": 200, "stream": True}
    with httpx.stream(
        "POST",
        f"{stack.edge_url}/v1/completions",
        json=body,
        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        timeout=10,
    ) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
    # leaving the block drops the connection mid-stream
    names = {"POST /v1/completions", "tokenrelay.v1.GenerationService/GenerateStream"}
    spans = _wait_for(sink, trace_id, names)
    edge = _one(spans, "POST /v1/completions")
    server = _one(spans, "tokenrelay.v1.GenerationService/GenerateStream")
    for span in (edge, server):
        assert span["attributes"]["tokenrelay.outcome"] == "cancelled"
        assert span["status"] == 2  # STATUS_CODE_ERROR


def test_the_retrieval_stage_is_a_span_with_its_embed_and_search(
    traced: tuple[Stack, SpanSink],
) -> None:
    stack, sink = traced
    channel = grpc.insecure_channel(stack.orchestrator_address)
    rpb_grpc.RetrievalServiceStub(channel).UpsertDocuments(
        rpb.UpsertDocumentsRequest(
            collection="traced",
            create_collection=True,
            documents=[rpb.Document(id="z.md", text="The capital of Zorblatt is Quenvik.")],
        )
    )
    trace_id = "5cf92f3577b34da6a3ce929d0e0e4799"
    response = httpx.post(
        f"{stack.edge_url}/v1/chat/completions",
        json={
            "model": "synthetic",
            "messages": [{"role": "user", "content": "What is the capital of Zorblatt?"}],
            "max_tokens": 3,
            "retrieval": {"collection": "traced"},
        },
        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        timeout=10,
    )
    assert response.status_code == 200 and response.json()["retrieval"]["status"] == "used"
    names = {"tokenrelay.retrieval", "tokenrelay.embed", "tokenrelay.search", "triton.generate"}
    spans = _wait_for(sink, trace_id, names)
    stage = _one(spans, "tokenrelay.retrieval")
    assert stage["attributes"]["tokenrelay.retrieval.outcome"] == "used"
    assert stage["attributes"]["tokenrelay.retrieval.collection"] == "traced"
    assert stage["attributes"]["tokenrelay.retrieval.store"] == "qdrant"
    assert stage["attributes"]["tokenrelay.retrieval.used"] == 1
    for child in ("tokenrelay.embed", "tokenrelay.search"):
        assert _one(spans, child)["parent"] == stage["span_id"], child
    server = _one(spans, "tokenrelay.v1.GenerationService/GenerateStream")
    assert stage["parent"] == server["span_id"]
