"""``tokenrelay.v1.EmbeddingService`` and ``RetrievalService``: decode, call the retriever,
encode. (The gRPC border — spans, log fields, errors — is ``_border.BorderInterceptor``'s.)"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from tokenrelay.errors import AlreadyExists, CollectionNotFound, InvalidRequest, ModelNotFound
from tokenrelay.retrieval import (
    CollectionInfo,
    Document,
    Embedder,
    Retriever,
    check_collection_name,
)
from tokenrelay.v1 import retrieval_pb2 as pb
from tokenrelay.v1 import retrieval_pb2_grpc as pb_grpc

__all__ = ["EmbeddingServicer", "RetrievalServicer"]

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _retriever(retriever: Retriever | None) -> Retriever:
    if retriever is None:
        raise InvalidRequest("Retrieval is not enabled on this server (retrieval.store = none).")
    return retriever


def _collection_pb(info: CollectionInfo) -> pb.Collection:
    return pb.Collection(name=info.name, dimensions=info.dimensions, chunks=info.chunks)


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    service_name = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        spec = self._embedder.spec
        if request.model and request.model != spec.id:
            raise ModelNotFound(
                request.model,
                f"The embedding model '{request.model}' does not"
                f" exist; this server embeds with '{spec.id}'.",
            )
        texts = list(request.input)
        self._embedder.check(texts)
        embedded = await self._embedder.embed(texts, "api")
        return pb.EmbedResponse(
            model=spec.id,
            embeddings=[pb.Embedding(values=v) for v in embedded.vectors.tolist()],
            prompt_tokens=embedded.tokens,
        )


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    service_name = pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name

    def __init__(self, retriever: Retriever | None) -> None:
        self._retriever = retriever

    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: Context
    ) -> pb.Collection:
        retriever = _retriever(self._retriever)
        if await retriever.create_collection(request.name):
            return _collection_pb(
                CollectionInfo(request.name, retriever.embedder.spec.dimensions, 0)
            )
        if not request.exist_ok:
            raise AlreadyExists(f"The collection '{request.name}' already exists.", "name")
        for info in await retriever.store.list_collections():
            if info.name == request.name:
                return _collection_pb(info)
        raise CollectionNotFound(request.name, "name")  # deleted meanwhile

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: Context
    ) -> pb.ListCollectionsResponse:
        infos = await _retriever(self._retriever).store.list_collections()
        return pb.ListCollectionsResponse(collections=[_collection_pb(i) for i in infos])

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: Context
    ) -> pb.DeleteCollectionResponse:
        retriever = _retriever(self._retriever)
        check_collection_name(request.name, "name")
        return pb.DeleteCollectionResponse(
            deleted=await retriever.store.delete_collection(request.name)
        )

    async def UpsertDocuments(
        self, request: pb.UpsertDocumentsRequest, context: Context
    ) -> pb.UpsertDocumentsResponse:
        documents = [Document(d.id, d.source, d.text) for d in request.documents]
        chunks, replaced, tokens = await _retriever(self._retriever).upsert(
            request.collection, documents, create=request.create_collection
        )
        return pb.UpsertDocumentsResponse(chunks=chunks, replaced=replaced, tokens=tokens)

    async def DeleteDocuments(
        self, request: pb.DeleteDocumentsRequest, context: Context
    ) -> pb.DeleteDocumentsResponse:
        retriever = _retriever(self._retriever)
        check_collection_name(request.collection)
        removed = await retriever.store.delete_documents(request.collection, list(request.ids))
        return pb.DeleteDocumentsResponse(chunks=removed)

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        hits = await _retriever(self._retriever).search(
            request.collection,
            request.query,
            request.top_k if request.HasField("top_k") else None,
            request.min_score if request.HasField("min_score") else None,
        )
        return pb.SearchResponse(
            hits=[
                pb.ChunkHit(
                    chunk_id=h.chunk_id,
                    document_id=h.document_id,
                    source=h.source,
                    index=h.index,
                    text=h.text,
                    score=h.score,
                )
                for h in hits
            ]
        )
