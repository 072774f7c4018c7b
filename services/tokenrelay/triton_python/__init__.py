"""Triton Python-backend models with the vLLM backend's contract (imported inside Triton's stub)."""
