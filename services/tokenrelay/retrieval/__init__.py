"""Retrieval-augmented generation: chunking, embeddings through Triton, vector stores and the
retrieval stage of a generation."""
