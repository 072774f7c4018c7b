"""Retrieval-augmented generation through the real stack, on both vector stores: Qdrant (embedded,
on disk — the session stack) and PostgreSQL + pgvector (a server these tests start). The corpus is
made-up facts SmolLM2 cannot know; ingestion goes through ``tokenrelay ingest``."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import numpy as np
import openai
import pytest

from _support import REPO, assert_openai
from tokenrelay.config import Settings, to_toml
from tokenrelay.stack import Stack, StackPorts
from tokenrelay.stack._postgres import Postgres
from tokenrelay.stack._stack import free_port
from tokenrelay.triton_python.minilm import MiniLMEmbedder
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc
from tokenrelay.v1 import retrieval_pb2 as rpb
from tokenrelay.v1 import retrieval_pb2_grpc as rpb_grpc

MODEL = "smollm2-135m-instruct"
CORPUS = {
    "zorblatt.md": "# Zorblatt\n\nThe capital of Zorblatt is Quenvik. Zorblatt exports purple"
    " glass beads.\n\nThe national animal of Zorblatt is the striped marmot.\n",
    "space/orbix.md": "# The Orbix-7 probe\n\nThe Orbix-7 probe reached the moon Tellura on 14"
    " March 2029. Its chief engineer was Dr. Panu Akkerman.\n",
    "veltrax.txt": "Veltrax Corporation was founded in 2031 by Imara Solberg. Its headquarters"
    " are in Lake Tessaly.\n",
    "fruit.txt": "Bananas are yellow when ripe. Chess has sixty-four squares.\n",
}
# (question, the fact the answer must hold, the document it comes from)
QUESTIONS = [
    ("What is the capital of Zorblatt?", "Quenvik", "corpus/zorblatt.md"),
    ("Which moon did the Orbix-7 probe reach?", "Tellura", "corpus/space/orbix.md"),
]
RETRIEVAL = {"top_k": 2, "min_score": 0.4}


def _write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _ingest(stack: Stack, collection: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenrelay.cli",
            "ingest",
            *map(str, paths),
            "--collection",
            collection,
            "--grpc",
            stack.orchestrator_address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with Postgres(free_port()) as server:
        yield server


def _config(folder: Path, **retrieval: Any) -> Path:
    """The default settings with some [retrieval] keys changed, as a TOML file."""
    defaults = Settings()
    path = folder / "tokenrelay.toml"
    path.write_text(to_toml(replace(defaults, retrieval=replace(defaults.retrieval, **retrieval))))
    return path


@pytest.fixture(scope="module")
def pgvector_stack(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("pgvector")
    with Stack(
        REPO / "triton_models",
        StackPorts.free(),
        models=("smollm2", "minilm"),
        config=_config(folder, store="pgvector"),
        env={"TOKENRELAY_POSTGRES_DSN": postgres.dsn},
        fast_stop=True,
    ) as running:
        yield running


@pytest.fixture(scope="module", params=["qdrant", "pgvector"])
def rag(request: pytest.FixtureRequest, stack: Stack) -> Stack:
    """The stack of one store, with the corpus ingested as collection 'facts'."""
    chosen: Stack = (
        stack if request.param == "qdrant" else request.getfixturevalue("pgvector_stack")
    )
    if not getattr(chosen, "_facts_ingested", False):
        folder = request.getfixturevalue("tmp_path_factory").mktemp("rag")
        done = _ingest(chosen, "facts", _write(folder / "corpus", CORPUS))
        assert done.returncode == 0, done.stderr
        assert "ingested 4 files into 'facts': 4 chunks" in done.stderr
        chosen._facts_ingested = True  # type: ignore[attr-defined]
    return chosen


def _stubs(stack: Stack) -> tuple[rpb_grpc.RetrievalServiceStub, pb_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(stack.orchestrator_address)
    return rpb_grpc.RetrievalServiceStub(channel), pb_grpc.GenerationServiceStub(channel)


@pytest.mark.parametrize(("question", "fact", "document"), QUESTIONS)
def test_answers_come_from_the_ingested_facts_and_cite_them_through_the_edge(
    rag: Stack, question: str, fact: str, document: str
) -> None:
    with openai.OpenAI(base_url=f"{rag.edge_url}/v1", api_key="unused", max_retries=0) as client:
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=40,
            extra_body={"retrieval": {"collection": "facts", **RETRIEVAL}},
        )
        assert fact in (answer.choices[0].message.content or "")
        report = answer.model_extra["retrieval"]  # type: ignore[index]
        assert report["status"] == "used"
        assert report["citations"][0]["source"] == document
        assert report["citations"][0]["number"] == 1
        assert report["citations"][0]["score"] >= 0.4
        # Streaming: the citations come in the first chunk, before any text.
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=40,
                stream=True,
                extra_body={"retrieval": {"collection": "facts", **RETRIEVAL}},
            )
        )
    first = chunks[0].model_extra or {}
    assert first["retrieval"]["citations"][0]["source"] == document
    assert not chunks[0].choices[0].delta.content
    assert fact in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize(("question", "fact", "document"), QUESTIONS)
def test_answers_come_from_the_ingested_facts_and_cite_them_over_grpc(
    rag: Stack, question: str, fact: str, document: str
) -> None:
    _, generation = _stubs(rag)
    messages = list(
        generation.GenerateStream(
            pb.GenerateStreamRequest(
                model=MODEL,
                chat=pb.Chat(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=question)]),
                sampling=pb.SamplingParams(temperature=0, max_tokens=40),
                retrieval=rpb.RetrievalOptions(collection="facts", top_k=2, min_score=0.4),
            ),
            timeout=60,
        )
    )
    report = messages[0].start.retrieval
    assert report.status == rpb.RETRIEVAL_STATUS_USED
    assert report.citations[0].source == document
    assert report.citations[0].document_id == document
    assert fact in "".join(m.text for m in messages)


def test_reingesting_a_changed_file_replaces_its_chunks_and_deleting_removes_them(
    rag: Stack, tmp_path: Path
) -> None:
    retrieval, _ = _stubs(rag)
    corpus = _write(tmp_path / "corpus", CORPUS)
    assert _ingest(rag, "changing", corpus).returncode == 0
    (corpus / "zorblatt.md").write_text("# Zorblatt\n\nThe capital of Zorblatt is Mirellen.\n")
    again = _ingest(rag, "changing", corpus)
    assert again.returncode == 0, again.stderr
    assert "4 chunks (4 replaced)" in again.stderr
    (info,) = [
        c
        for c in retrieval.ListCollections(rpb.ListCollectionsRequest()).collections
        if c.name == "changing"
    ]
    assert (info.chunks, info.dimensions) == (4, 384)
    hits = retrieval.Search(
        rpb.SearchRequest(collection="changing", query="What is the capital of Zorblatt?", top_k=4)
    ).hits
    texts = [h.text for h in hits if h.document_id == "corpus/zorblatt.md"]
    assert len(texts) == 1 and "Mirellen" in texts[0]
    assert not any("Quenvik" in h.text for h in hits)
    # Deleting a document removes its chunks and nothing else.
    deleted = retrieval.DeleteDocuments(
        rpb.DeleteDocumentsRequest(collection="changing", ids=["corpus/zorblatt.md"])
    )
    assert deleted.chunks == 1
    hits = retrieval.Search(
        rpb.SearchRequest(collection="changing", query="What is the capital of Zorblatt?", top_k=4)
    ).hits
    assert len(hits) == 3 and all(h.document_id != "corpus/zorblatt.md" for h in hits)


def test_deleting_a_collection_removes_everything(
    rag: Stack, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    retrieval, _ = _stubs(rag)
    assert _ingest(rag, "doomed", _write(tmp_path / "corpus", CORPUS)).returncode == 0
    assert retrieval.DeleteCollection(rpb.DeleteCollectionRequest(name="doomed")).deleted
    names = [c.name for c in retrieval.ListCollections(rpb.ListCollectionsRequest()).collections]
    assert "doomed" not in names
    with pytest.raises(grpc.RpcError) as caught:
        retrieval.Search(rpb.SearchRequest(collection="doomed", query="Zorblatt"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    refused = httpx.post(
        f"{rag.edge_url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Zorblatt?"}],
            "retrieval": {"collection": "doomed"},
        },
        timeout=30,
    )
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "collection_not_found"
    assert_openai("ErrorResponse", refused.json())
    # Nothing is left behind in the store itself.
    if rag is request.getfixturevalue("stack"):
        assert not (rag.workdir / "qdrant" / "collection" / "doomed").exists()
    else:
        postgres: Postgres = request.getfixturevalue("postgres")

        async def tables() -> list[str]:
            connection = await asyncpg.connect(postgres.dsn)
            try:
                rows = await connection.fetch("SELECT tablename FROM pg_tables")
                return [r["tablename"] for r in rows]
            finally:
                await connection.close()

        assert "tokenrelay_c_doomed" not in asyncio.run(tables())
        assert "tokenrelay_c_facts" in asyncio.run(tables())


def test_the_collections_command_lists_and_deletes(rag: Stack, tmp_path: Path) -> None:
    def collections(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "tokenrelay.cli",
                "collections",
                *args,
                "--grpc",
                rag.orchestrator_address,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert _ingest(rag, "listed", _write(tmp_path / "corpus", CORPUS)).returncode == 0
    listed = collections()
    assert listed.returncode == 0, listed.stderr
    assert "listed\t4 chunks\t384 dimensions" in listed.stdout.splitlines()
    assert collections("--delete", "listed").stdout.strip() == "deleted 'listed'"
    assert "listed\t" not in collections().stdout
    again = collections("--delete", "listed")
    assert again.returncode == 1 and "no collection 'listed'" in again.stdout


def test_embeddings_match_the_openai_schema_and_the_model_run_directly(stack: Stack) -> None:
    texts = ["The capital of Zorblatt is Quenvik.", "Bananas are yellow.", "é ü 中文 🙂"]
    raw = httpx.post(
        f"{stack.edge_url}/v1/embeddings",
        json={"model": "all-minilm-l6-v2", "input": texts, "encoding_format": "float"},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert_openai("CreateEmbeddingResponse", body)
    served = np.array([d["embedding"] for d in body["data"]], np.float32)
    direct, tokens = MiniLMEmbedder(threads=1).embed(texts)
    assert served.shape == (3, 384)
    cosines = (served * direct).sum(axis=1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(direct, axis=1)
    )
    assert cosines.min() >= 0.999, cosines
    assert body["usage"]["prompt_tokens"] == int(tokens.sum())
    # The OpenAI SDK asks for base64 by default; it decodes to the same vectors.
    with openai.OpenAI(base_url=f"{stack.edge_url}/v1", api_key="unused") as client:
        sdk = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0])
    assert np.allclose(sdk.data[0].embedding, served[0], atol=1e-6)
    # And the gRPC Embed call.
    channel = grpc.insecure_channel(stack.orchestrator_address)
    embedded = rpb_grpc.EmbeddingServiceStub(channel).Embed(rpb.EmbedRequest(input=texts[:1]))
    assert np.allclose(embedded.embeddings[0].values, served[0], atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
        ({"model": "all-minilm-l6-v2", "input": []}, 400, "input"),
        ({"model": "all-minilm-l6-v2", "input": [[1, 2, 3]]}, 400, "input"),
        ({"model": "all-minilm-l6-v2", "input": ["ok", ""]}, 400, "input"),
        ({"model": "all-minilm-l6-v2", "input": "x", "dimensions": 64}, 400, "dimensions"),
        (
            {"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "int8"},
            400,
            "encoding_format",
        ),
    ],
)
def test_bad_embedding_requests_get_openai_errors(
    stack: Stack, body: dict[str, object], status: int, param: str
) -> None:
    response = httpx.post(f"{stack.edge_url}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == status
    assert_openai("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param


class _Blackhole:
    """A TCP port that accepts connections and never answers (a hung database), until
    ``close()`` makes it refuse them (a database that is down)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.socket.getsockname()[1]

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def broken_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, _Blackhole]]:
    hole = _Blackhole()
    folder = tmp_path_factory.mktemp("broken")
    with Stack(
        REPO / "triton_models",
        StackPorts.free(),
        models=("synthetic", "minilm"),
        config=_config(folder, store="pgvector", timeout_s=0.5, on_failure="answer"),
        env={"TOKENRELAY_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{hole.port}/postgres"},
        fast_stop=True,
    ) as running:
        yield running, hole
    hole.close()


def _ask(stack: Stack, policy: str | None) -> httpx.Response:
    retrieval: dict[str, object] = {"collection": "facts"}
    if policy:
        retrieval["on_failure"] = policy
    return httpx.post(
        f"{stack.edge_url}/v1/chat/completions",
        json={
            "model": "synthetic",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "What is the capital of Zorblatt?"}],
            "retrieval": retrieval,
        },
        timeout=30,
    )


def test_a_hung_then_failed_store_follows_the_failure_policy(
    broken_store: tuple[Stack, _Blackhole],
) -> None:
    stack, hole = broken_store
    # Hung: the stage's deadline (0.5 s) passes.
    answered = _ask(stack, None)  # the configured policy: answer without context
    assert answered.status_code == 200
    assert answered.headers["x-tokenrelay-retrieval"] == "failed"
    report = answered.json()["retrieval"]
    assert report["status"] == "failed" and report["citations"] == []
    assert "within 0.5 s" in report["message"]
    assert len(answered.json()["choices"][0]["message"]["content"].split()) == 3
    failed = _ask(stack, "fail")
    assert failed.status_code == 504
    assert "within 0.5 s" in failed.json()["error"]["message"]
    # Down: connections are refused.
    hole.close()
    answered = _ask(stack, "answer")
    assert answered.status_code == 200
    assert "vector store is unavailable" in answered.json()["retrieval"]["message"]
    failed = _ask(stack, "fail")
    assert failed.status_code == 503
    assert_openai("ErrorResponse", failed.json())
    assert "vector store is unavailable" in failed.json()["error"]["message"]
    # Generation without retrieval never noticed.
    plain = httpx.post(
        f"{stack.edge_url}/v1/chat/completions",
        json={
            "model": "synthetic",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=30,
    )
    assert plain.status_code == 200 and "retrieval" not in plain.json()
