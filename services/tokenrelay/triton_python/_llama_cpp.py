"""The parts of llama.cpp's C API (through llama-cpp-python's ``llama_cpp`` module) the batched
engine uses: a model and its vocabulary, a context with one KV stream per slot, a reusable batch
and per-request sampler chains. No threads here; the engine decides who calls what when."""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import llama_cpp

from tokenrelay.triton_python._contract import BadRequest, EngineSampling

__all__ = ["Batch", "Context", "Model", "SamplerChain", "convert_weights"]

# Sampling as llama-cpp-python's ``Llama.generate`` did it before the batched engine: penalties
# look at the last 64 generated tokens.
_PENALTY_LAST_N = 64
_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            # llama-cpp-python prints llama.cpp's log lines below this logger's level.
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            llama_cpp.llama_backend_init()
            _backend_ready = True


# GGUF file types a model may be converted to at load (``weights`` in the model config).
_FILE_TYPES = {
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
}


def convert_weights(source: Path, file_type: str, cache_dir: Path | None = None) -> Path:
    """``source`` re-quantized to ``file_type`` (a key of ``_FILE_TYPES``), made once and kept in
    ``cache_dir`` (default: the system's temporary directory), keyed by the source's size and
    modification time. The file is written under a temporary name and renamed, so concurrent
    loads never read a half-written one."""
    if file_type not in _FILE_TYPES:
        raise ValueError(f"weights must be one of {', '.join(sorted(_FILE_TYPES))}")
    _init_backend()
    folder = cache_dir or Path(tempfile.gettempdir()) / "tokenrelay-gguf"
    folder.mkdir(parents=True, exist_ok=True)
    stat = source.stat()
    target = folder / f"{source.stem}.{stat.st_size}-{stat.st_mtime_ns}.{file_type}.gguf"
    if target.exists():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 0
    params.ftype = _FILE_TYPES[file_type]
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(
        str(source).encode(), str(partial).encode(), ctypes.byref(params)
    ):
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not convert {source} to {file_type}")
    partial.replace(target)
    return target


class Model:
    """A GGUF model loaded once, with its vocabulary. Tokenizing is safe from any thread."""

    def __init__(self, path: Path) -> None:
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise RuntimeError(f"llama.cpp could not load the model {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str) -> list[int]:
        """The prompt's tokens, with BOS if the model wants one; the chat template's markers
        (<|im_start|> …) are parsed as the control tokens they are."""
        data = text.encode("utf-8")
        room = len(data) + 8
        while True:
            tokens = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, room, True, True)
            if n >= 0:
                return list(tokens[:n])
            room = -n

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens: none)."""
        found = self._pieces.get(token)
        if found is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
            found = self._pieces[token] = buffer.raw[:n]
        return found

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """A llama.cpp context of ``slots`` sequences with ``n_ctx`` cells of KV cache each.

    Each slot (``seq_id``) has a KV stream of its own (``kv_unified`` off) and attention is
    flash attention: with both, a sequence's logits do not depend on what else is in the batch or
    on how its prompt was split into chunks (measured: bit-identical), which is what lets the
    same seed give the same text alone or in a batch.
    """

    def __init__(self, model: Model, slots: int, n_ctx: int, n_batch: int, n_threads: int) -> None:
        limit = int(llama_cpp.llama_max_parallel_sequences())
        if not 1 <= slots <= limit:
            raise ValueError(f"n_parallel must be between 1 and {limit}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = slots
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.kv_unified = False
        params.no_perf = True
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.n_ctx_slot = int(llama_cpp.llama_n_ctx_seq(self.ptr))
        self.n_vocab = model.n_vocab

    def decode(self, batch: Batch) -> int:
        return int(llama_cpp.llama_decode(self.ptr, batch.raw))

    def logits(self, index: int) -> Any:
        """The raw logits of the batch's ``index``-th token (a ctypes float array)."""
        return llama_cpp.llama_get_logits_ith(self.ptr, index)

    def forget(self, slot: int, start: int = 0) -> bool:
        """Drop ``slot``'s KV cells from position ``start`` on; False when that cannot be done
        for part of a sequence (then drop it whole)."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, slot, start, -1))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None


class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, one sequence id each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.size = 0

    def clear(self) -> None:
        self.size = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, output: bool) -> int:
        """Append a token; returns its index in the batch (for its logits when ``output``)."""
        i = self.size
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq_id
        raw.logits[i] = 1 if output else 0
        self.size = raw.n_tokens = i + 1
        return i

    def close(self) -> None:
        if self.capacity:
            llama_cpp.llama_batch_free(self.raw)
            self.capacity = 0


class SamplerChain:
    """One request's sampler chain, built as llama-cpp-python's ``Llama`` built its own:
    penalties, then greedy at temperature 0, else top-k, typical (off), top-p, min-p, temperature
    and a seeded draw. Raises ``BadRequest`` when a part cannot be built."""

    def __init__(self, model: Model, sampling: EngineSampling) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        try:
            self._build(model, sampling)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler: Any, what: str) -> None:
        if not sampler:
            raise BadRequest(f"this model cannot use {what}")
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)

    def _build(self, model: Model, s: EngineSampling) -> None:
        self._add(
            llama_cpp.llama_sampler_init_penalties(
                model.n_vocab,
                _PENALTY_LAST_N,
                s.repetition_penalty,
                s.frequency_penalty,
                s.presence_penalty,
            ),
            "these penalties",
        )
        if s.temperature == 0.0:
            self._add(llama_cpp.llama_sampler_init_greedy(), "greedy sampling")
            return
        self._add(llama_cpp.llama_sampler_init_top_k(max(s.top_k, 0)), "top_k")
        self._add(llama_cpp.llama_sampler_init_typical(1.0, 1), "typical sampling")
        self._add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1), "top_p")
        self._add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1), "min_p")
        self._add(llama_cpp.llama_sampler_init_temp(s.temperature), "temperature")
        seed = s.seed & 0xFFFFFFFF if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        self._add(llama_cpp.llama_sampler_init_dist(seed), "seeded sampling")

    def sample(self, context: Context, index: int) -> int:
        """Sample (and accept) the next token from the batch's ``index``-th logits."""
        return int(llama_cpp.llama_sampler_sample(self.ptr, context.ptr, index))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
