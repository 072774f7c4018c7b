"""``tokenrelay ingest``: put text and Markdown files into a retrieval collection;
``tokenrelay collections``: list them, or delete one.

    tokenrelay ingest docs/ notes.md --collection handbook
    tokenrelay ingest docs/ --collection handbook --grpc 10.0.0.7:50051
    tokenrelay collections                      # name, chunks, dimensions
    tokenrelay collections --delete handbook

Files (directories are walked for ``*.md``, ``*.markdown`` and ``*.txt``) are sent to the
orchestrator's ``RetrievalService.UpsertDocuments`` a few at a time; the orchestrator splits them
into overlapping chunks, embeds them through Triton in batches and stores them. A file's id is its
path as given (relative for files found in a directory), so ingesting it again replaces its
chunks instead of adding a second copy. A progress bar goes to stderr (when it is a terminal;
otherwise one line per batch), a summary at the end. ``TOKENRELAY_INTERNAL_SECRET`` is sent when
set. Exit status: 0 done, 1 refused or failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from tokenrelay.v1 import retrieval_pb2 as pb
from tokenrelay.v1 import retrieval_pb2_grpc as pb_grpc

__all__ = ["add_parser", "collections", "run"]

_SUFFIXES = {".md", ".markdown", ".txt"}
_BATCH_CHARS = 64_000  # text per UpsertDocuments call: a few dozen chunks, so progress moves
_MAX_FILE_BYTES = 8 * 1024 * 1024  # one call's limit is 16 MiB and 10000 chunks


def _files(paths: list[str]) -> Iterator[tuple[str, Path]]:
    """(document id, file) for every path, directories walked in sorted order."""
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.suffix.lower() in _SUFFIXES):
                if found.is_file():
                    yield found.relative_to(path.parent).as_posix(), found
        elif path.is_file():
            yield path.as_posix(), path
        else:
            raise FileNotFoundError(given)


def _bar(done: int, total: int, chunks: int, began: float) -> str:
    width = 30
    filled = width * done // max(total, 1)
    rate = chunks / max(time.perf_counter() - began, 1e-9)
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} files,"
        f" {chunks} chunks, {rate:.1f} chunks/s"
    )


def run(args: argparse.Namespace) -> int:
    try:
        files = list(_files(args.paths))
    except FileNotFoundError as exc:
        print(f"tokenrelay ingest: no such file or directory: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("tokenrelay ingest: no .md, .markdown or .txt files found", file=sys.stderr)
        return 2
    too_big = [str(path) for _, path in files if path.stat().st_size > _MAX_FILE_BYTES]
    if too_big:
        print(
            f"tokenrelay ingest: larger than {_MAX_FILE_BYTES // 2**20} MiB, split them first: "
            + ", ".join(too_big),
            file=sys.stderr,
        )
        return 2
    metadata = _metadata()
    tty = sys.stderr.isatty()
    began = time.perf_counter()
    done = chunks = replaced = 0
    with grpc.insecure_channel(args.grpc) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        batch: list[pb.Document] = []
        size = 0

        def send() -> None:
            nonlocal done, chunks, replaced, batch, size
            response = stub.UpsertDocuments(
                pb.UpsertDocumentsRequest(
                    collection=args.collection, documents=batch, create_collection=True
                ),
                metadata=metadata,
                timeout=args.timeout,
            )
            done += len(batch)
            chunks += response.chunks
            replaced += response.replaced
            batch, size = [], 0
            line = _bar(done, len(files), chunks, began)
            print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr)

        try:
            for document_id, path in files:
                text = path.read_text(encoding="utf-8", errors="replace")
                if not text.strip():
                    continue
                if batch and size + len(text) > _BATCH_CHARS:
                    send()
                batch.append(pb.Document(id=document_id, source=document_id, text=text))
                size += len(text)
            if batch:
                send()
        except grpc.RpcError as exc:
            print(
                f"\ntokenrelay ingest: {exc.code().name}: {exc.details()}",
                file=sys.stderr,
            )
            return 1
    elapsed = time.perf_counter() - began
    if tty:
        print(file=sys.stderr)
    print(
        f"ingested {done} files into '{args.collection}': {chunks} chunks"
        f" ({replaced} replaced) in {elapsed:.1f} s, {chunks / max(elapsed, 1e-9):.1f} chunks/s",
        file=sys.stderr,
    )
    return 0


def _metadata() -> tuple[tuple[str, str], ...]:
    secret = os.environ.get("TOKENRELAY_INTERNAL_SECRET")
    return (("authorization", f"Bearer {secret}"),) if secret else ()


def collections(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.grpc) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        try:
            if args.delete:
                deleted = stub.DeleteCollection(
                    pb.DeleteCollectionRequest(name=args.delete), metadata=_metadata(), timeout=60
                ).deleted
                print(f"deleted '{args.delete}'" if deleted else f"no collection '{args.delete}'")
                return 0 if deleted else 1
            found = stub.ListCollections(
                pb.ListCollectionsRequest(), metadata=_metadata(), timeout=60
            ).collections
        except grpc.RpcError as exc:
            print(f"tokenrelay collections: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for collection in found:
        print(f"{collection.name}\t{collection.chunks} chunks\t{collection.dimensions} dimensions")
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = commands.add_parser(
        "ingest", help="split, embed and store text and Markdown files in a collection"
    )
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    ingest.add_argument("--collection", required=True, help="created when missing")
    ingest.add_argument(
        "--grpc", default="127.0.0.1:50051", metavar="HOST:PORT", help="the orchestrator"
    )
    ingest.add_argument("--timeout", type=float, default=600.0, help="per batch, in seconds")
    listing = commands.add_parser("collections", help="list retrieval collections, or delete one")
    listing.add_argument("--delete", metavar="NAME", help="delete this collection and its chunks")
    listing.add_argument(
        "--grpc", default="127.0.0.1:50051", metavar="HOST:PORT", help="the orchestrator"
    )
