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

# llama.cpp's CPU backend is built with OpenMP here, whose threads spin at every barrier of a
# decoding step (hundreds of them) before they sleep. On a machine with cores to spare that is
# the fastest way to wait; when llama.cpp's two threads share the cores with the rest of the
# stack (a 2-core machine), a spinning thread burns the time slice its partner needs: decoding
# slowed down 3-10x on a shared 2-core machine, and waiting passively kept it steady (at a cost
# of about a third when the cores happened to be free). So with fewer than four cores the threads
# wait passively. libgomp reads this when it loads (with llama_cpp, below); a value already in
# the environment wins. Where waking a passive thread costs more than the second thread gains, the
# engine decodes on one (adapt_threads, _threads.py).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
if (_CORES or 1) < 4:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# (Imported after the setting above, on purpose.)
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf  # noqa: E402

from tokenrelay.triton_python._contract import (  # noqa: E402
    BadRequest,
    EngineSampling,
    StructuredOutput,
)
from tokenrelay.triton_python._engine import TokenLogprob  # noqa: E402

__all__ = ["Batch", "Context", "Model", "SamplerChain", "convert_weights", "grammar_text"]

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
    "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "iq4_nl": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
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

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a generated token stands for; a control token stands for none unless
        ``special`` (then for its name, e.g. ``<|im_end|>``)."""
        key = -token - 1 if special else token
        found = self._pieces.get(key)
        if found is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -n, 0, special)
            found = self._pieces[key] = buffer.raw[:n]
        return found

    def decoded(self, token: int) -> str:
        """A token's text as vLLM's logprobs show it (control tokens by name, bytes that are not
        UTF-8 on their own as U+FFFD)."""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

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
        self.threads = n_threads

    def set_threads(self, threads: int) -> None:
        """The threads the next steps decode with (llama.cpp's ``n_threads`` for a step of one
        token and ``n_threads_batch`` for more: both, so that a sequence's results do not
        depend on what else is in its batch)."""
        if threads != self.threads:
            llama_cpp.llama_set_n_threads(self.ptr, threads, threads)
            self.threads = threads

    def decode(self, batch: Batch) -> int:
        return int(llama_cpp.llama_decode(self.ptr, batch.raw))

    def logprobs(self, model: Model, index: int, token: int, top: int) -> tuple[TokenLogprob, ...]:
        """``token`` and the ``top`` most likely tokens after the batch's ``index``-th token, with
        their log-probabilities under the raw model distribution (log-softmax of the logits,
        before penalties, logit bias, grammar, temperature or top-k/p: vLLM's default
        ``logprobs_mode``, "raw_logprobs"). ``token`` comes first; ranks are 1-based, a tie
        ranks below every token it ties with (as vLLM counts them)."""
        pointer = llama_cpp.llama_get_logits_ith(self.ptr, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        chosen = logprobs[token]
        entries = [
            TokenLogprob(
                token, float(chosen), int((logprobs >= chosen).sum()), model.decoded(token)
            )
        ]
        if top:
            best = np.argpartition(-logprobs, top - 1)[:top]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            for rank, candidate in enumerate(best.tolist(), start=1):
                if candidate != token:
                    entries.append(
                        TokenLogprob(
                            candidate, float(logprobs[candidate]), rank, model.decoded(candidate)
                        )
                    )
        return tuple(entries)

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


def _gbnf_literal(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# llama-cpp-python's converter writes a JSON string's character as ``[^"\\]``, which lets raw
# control characters through, though JSON forbids them in a string; its own JSON grammar and
# llama.cpp's converter exclude them.
_CONVERTER_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def grammar_text(constraint: StructuredOutput) -> str:
    """The GBNF grammar of a structured-output constraint: a JSON schema through
    llama-cpp-python's own converter, any JSON object through its JSON grammar, a choice as the
    alternatives' literals. Raises ``BadRequest`` for a schema the converter cannot take."""
    if constraint.kind == "json_object":
        return JSON_GBNF
    if constraint.kind == "choice":
        return "root ::= " + " | ".join(_gbnf_literal(c) for c in constraint.choices) + "\n"
    try:
        grammar = str(json_schema_to_gbnf(constraint.value))
    except Exception as exc:  # the converter raises what it meets: assertions, KeyError …
        detail = str(exc) or type(exc).__name__
        raise BadRequest(
            f"structured_outputs 'json': this schema is not supported: {detail}"
        ) from None
    # (Without this a sampled tool call's "city" once ran on past "Paris}}" into two raw
    # newlines, and its arguments did not parse.)
    return grammar.replace(_CONVERTER_CHAR, _JSON_CHAR)


# A llama_token_data as numpy sees it, to fill a candidates array at C speed.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class SamplerChain:
    """One request's sampler chain, built as llama-cpp-python's ``Llama`` built its own (logit
    bias and grammar added): logit bias, penalties, then greedy at temperature 0, else top-k,
    typical (off), top-p, min-p, temperature and a seeded draw. Raises ``BadRequest`` when a part
    cannot be built (a token id out of the vocabulary, a grammar that does not compile).

    A structured output adds the request's grammar sampler, applied as llama.cpp's own common
    sampler applies it (``common_sampler_sample``): the chain picks a token; if the grammar allows
    it, it stands; else the grammar masks every candidate and the chain picks again. Checking one
    token instead of masking the whole vocabulary (49,152 tokens) at every step is what keeps
    constrained decoding cheap; for greedy decoding the result is the same token, and for
    sampling without truncation the same distribution."""

    def __init__(self, model: Model, sampling: EngineSampling) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        self.grammar: Any = None
        try:
            self._build(model, sampling)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler: Any, what: str) -> None:
        if not sampler:
            raise BadRequest(f"{what} is not supported by this model")
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)

    def _build(self, model: Model, s: EngineSampling) -> None:
        if s.logit_bias:
            outside = [t for t, _ in s.logit_bias if t >= model.n_vocab]
            if outside:
                raise BadRequest(
                    f"logit_bias: token {outside[0]} is out of range (the vocabulary's ids are"
                    f" 0 to {model.n_vocab - 1})"
                )
            biases = (llama_cpp.llama_logit_bias * len(s.logit_bias))()
            for i, (token, bias) in enumerate(s.logit_bias):
                biases[i] = llama_cpp.llama_logit_bias(token, bias)
            self._add(
                llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(s.logit_bias), biases),
                "logit_bias",
            )
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
        if s.structured_outputs is not None:
            text = grammar_text(s.structured_outputs)
            self.grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, text.encode(), b"root")
            if not self.grammar:
                raise BadRequest("structured_outputs: its grammar is not valid")
            self._n_vocab = model.n_vocab
            self._candidates = (llama_cpp.llama_token_data * model.n_vocab)()
            self._view = np.frombuffer(memoryview(self._candidates), dtype=_TOKEN_DATA)
            self._ids = np.arange(model.n_vocab, dtype=np.int32)
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
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.ptr, context.ptr, index))
        logits = llama_cpp.llama_get_logits_ith(context.ptr, index)
        token = self._pick(logits, constrained=False)
        single = llama_cpp.llama_token_data(token, 1.0, 0.0)
        one = llama_cpp.llama_token_data_array(ctypes.pointer(single), 1, -1, False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(one))
        if one.data[0].logit == float("-inf"):  # the grammar does not allow it
            token = self._pick(logits, constrained=True)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def _pick(self, logits: Any, constrained: bool) -> int:
        """The chain's choice among every token (only those the grammar allows if
        ``constrained``), without accepting it."""
        view = self._view
        view["id"] = self._ids
        view["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        view["p"] = 0.0
        candidates = llama_cpp.llama_token_data_array(
            ctypes.cast(self._candidates, llama_cpp.llama_token_data_p), self._n_vocab, -1, False
        )
        if constrained:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def close(self) -> None:
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
