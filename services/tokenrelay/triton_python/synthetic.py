"""A synthetic model: the vLLM backend contract with no compute, for timing, fault and load tests.

It streams words at a set pace. Model-config parameters (all optional):
  ``default_tokens``        tokens to produce when the request sets no max_tokens (default 64);
                            the answer then ends with finish_reason "stop"
  ``token_interval_ms``     time between tokens (default 20)
  ``first_token_delay_ms``  extra time before the first token (default 0)

With max_tokens set it produces exactly that many tokens and ends with "length". A prompt token
is a whitespace-separated word. The text is fixed by the seed, so a test can compare answers.

A prompt that ends inside the assistant's turn (ChatML's ``<|im_start|>assistant`` with text
after it and no ``<|im_end|>``: what the orchestrator sends to continue an interrupted answer)
is continued as greedy decoding would continue it: when that text is the start of the answer the
seed (or the script below) gives, the stream goes on from where it leaves off (so an answer
continued on another node reads exactly as an uninterrupted one); otherwise a new answer follows
it, after a space.

**Tool calls** (so that agent loops are testable without a capable model). The trigger reads the
prompt as the ``chatml`` template writes it:

- the prompt offers tools (a ``<tools>`` block, one JSON tool per line) and its last turn is the
  user's: the answer is one call in Hermes' format, ``<tool_call>\\n{"name": …, "arguments":
  …}\\n</tool_call>``, of the tool whose name appears in that user message (in any case; else
  the first tool), its arguments the minimal instance of the tool's parameter schema
  (``minimal_instance``);
- the last turn holds tool results (``<tool_response>`` blocks, as the template renders
  ``role: tool`` messages): the answer is text that uses them, ``The tool said: <result>.``
  (several results joined by ``; ``).

Either answer streams at the same pace, a whitespace-separated piece per token, and ends with
"stop" when complete (or "length" when max_tokens cuts it first).

**Structured outputs** (``sampling_parameters["structured_outputs"]``, as Triton's vLLM backend
takes it): ``json`` → the minimal instance of the schema (``minimal_instance``), ``json_object``
→ ``{}``, ``choice`` → the first choice; the constraint wins over the tool trigger (a forced tool
call is a ``json`` schema of the call object). ``regex`` and ``grammar`` are refused by the
shared contract.

**Logprobs** (``logprobs`` k with ``return_logprobs``) are honest about how it chooses: a word is
drawn uniformly from its vocabulary of 23, so every candidate has log probability -ln 23 and rank
1 (the k returned: the drawn word and the first words of the vocabulary, all tied); a scripted or
constrained piece is certain (0.0, the only candidate). ``logit_bias`` is not supported (the
shared shell refuses it).
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tokenrelay.triton_python._contract import EngineSampling, StopMatcher, StructuredOutput
from tokenrelay.triton_python._engine import Step, TokenLogprob

__all__ = [
    "SyntheticEngine",
    "constrained_answer",
    "minimal_instance",
    "partial_answer",
    "scripted_answer",
]

_WORDS = (
    "the quick brown fox jumps over a lazy dog while streams of tokens flow through"
    " every relay and each hop adds almost nothing"
).split()
_ASSISTANT = "<|im_start|>assistant\n"
_END = "<|im_end|>"


def partial_answer(prompt: str) -> str:
    """The assistant's text a ChatML prompt ends with ("" when its last turn is not an open
    assistant turn, or an empty one)."""
    start = prompt.rfind(_ASSISTANT)
    if start < 0:
        return ""
    text = prompt[start + len(_ASSISTANT) :]
    return "" if _END in text else text


def _resume(prompt: str, rng: random.Random) -> str:
    """What goes before the answer's next word: "" for a new answer; " " to continue the
    partial answer ``prompt`` ends with, ``rng`` moved past its words when they are the ones it
    gives (greedy decoding's continuation)."""
    partial = partial_answer(prompt)
    if not partial:
        return ""
    given = ""
    while len(given) < len(partial):
        given += (" " if given else "") + rng.choice(_WORDS)
    return " "


_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.DOTALL)
_TOOLS = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)
_RESULT = re.compile(r"<tool_response>\n(.*?)\n</tool_response>", re.DOTALL)
_PIECE = re.compile(r"\s*\S+")
_FORMATS = {
    "date": "1970-01-01",
    "date-time": "1970-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "a@example.com",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "uri": "https://example.com",
}


def _resolve(schema: Any, root: Any) -> Any:
    """``schema`` with a local ``$ref`` (``#/...``) followed; anything else as it is."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 32:
        node: Any = root
        for part in schema["$ref"].lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return {}
            node = node[part]
        schema, seen = node, seen + 1
    return schema


_MAX_DEPTH = 64  # a schema that requires itself (through $ref) has no finite instance
_MAX_SIZE = 10_000  # items of an array, characters of a string


def _bound(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _count(value: Any) -> int:
    return min(int(value), _MAX_SIZE) if isinstance(value, int) and value > 0 else 0


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    low = _bound(schema.get("minimum"))
    above = _bound(schema.get("exclusiveMinimum"))
    if above is not None:
        low = above + 1 if integer else above + 0.5
    high = _bound(schema.get("maximum"))
    value = 0.0
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    if integer:
        return math.ceil(value)
    return value if value != int(value) else int(value)


def minimal_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small, deterministic instance of a JSON Schema: ``const``, the first of ``enum``, the
    first alternative of ``anyOf``/``oneOf``, an object of its required properties, the fewest
    items an array may have, the shortest string (``minLength``; a sample for common
    ``format``\\ s), the number nearest 0 within the bounds, false, null. Local ``$ref``\\ s are
    followed. ``pattern`` and ``multipleOf`` are not honoured; nor is a schema nested (or
    requiring itself) deeper than 64 levels, or asking for more than 10,000 items or
    characters: the instance is cut there."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    depth += 1
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return minimal_instance(schema[key][0], root, depth)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            part = _resolve(part, root)
            if isinstance(part, dict):
                for name, value in part.items():
                    if isinstance(value, dict) and isinstance(merged.get(name), dict):
                        merged[name] = {**merged[name], **value}
                    elif isinstance(value, list) and isinstance(merged.get(name), list):
                        merged[name] = merged[name] + value
                    else:
                        merged[name] = value
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        return minimal_instance({**merged, **rest}, root, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if kind == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        return {
            name: minimal_instance(properties.get(name, {}), root, depth)
            for name in (required if isinstance(required, list) else ())
            if isinstance(name, str)
        }
    if kind == "array":
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        count = _count(schema.get("minItems"))
        items = [minimal_instance(p, root, depth) for p in prefix[:count]]
        items += [minimal_instance(schema.get("items", {}), root, depth)] * (count - len(items))
        return items
    if kind == "string":
        sample = _FORMATS.get(str(schema.get("format")), "")
        return sample + "a" * max(_count(schema.get("minLength")) - len(sample), 0)
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return False
    return None


def scripted_answer(prompt: str) -> str | None:
    """The tool call or tool-result answer a ChatML prompt triggers (see the module's
    docstring), or None for an ordinary answer."""
    turns = _TURN.findall(prompt)
    if not turns:
        return None
    role, content = turns[-1]
    if role == "user" and "<tool_response>" in content:
        results = [r.strip() for r in _RESULT.findall(content)]
        return f"The tool said: {'; '.join(results)}."
    tools_block = _TOOLS.search(turns[0][1]) if turns[0][0] == "system" else None
    if role != "user" or tools_block is None:
        return None
    functions = []
    for line in tools_block.group(1).splitlines():
        try:
            tool = json.loads(line)
        except ValueError:
            continue
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            functions.append(function)
    if not functions:
        return None
    lowered = content.lower()
    chosen = next((f for f in functions if f["name"].lower() in lowered), functions[0])
    arguments = minimal_instance(chosen.get("parameters") or {"type": "object"})
    call = json.dumps({"name": chosen["name"], "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def constrained_answer(constraint: StructuredOutput) -> str:
    """What the synthetic model writes under a structured-output constraint: the minimal
    instance of a ``json`` schema, ``{}`` for ``json_object``, the first ``choice``."""
    if constraint.kind == "json":
        return json.dumps(minimal_instance(json.loads(constraint.value)), ensure_ascii=False)
    if constraint.kind == "choice":
        return constraint.choices[0]
    return "{}"


_UNIFORM = -math.log(len(_WORDS))  # each word is drawn with probability 1/23


def _logprobs(piece: str, drawn: int | None, position: int, top: int) -> tuple[TokenLogprob, ...]:
    """One token's candidates as vLLM returns them, the sampled one first. A drawn word: the
    top ``top`` of a uniform choice (all tied at rank 1, the first words of the vocabulary).
    A piece it was bound to write (scripted or constrained): certain, the only candidate (its
    id is past the vocabulary's, one per position)."""
    if drawn is None:
        return (TokenLogprob(len(_WORDS) + position, 0.0, 1, piece),)
    lead = piece[: len(piece) - len(_WORDS[drawn])]  # the space before every word but the first
    sampled = TokenLogprob(drawn, _UNIFORM, 1, piece)
    others = [
        TokenLogprob(i, _UNIFORM, 1, lead + _WORDS[i]) for i in range(len(_WORDS)) if i != drawn
    ]
    return (sampled, *others[: max(top - 1, 0)]) if top else (sampled,)


class SyntheticEngine:
    max_concurrency: int | None = None
    # The optional sampling features it implements (the shared shell refuses the others).
    features = frozenset({"structured_outputs", "logprobs"})

    def __init__(
        self, default_tokens: int = 64, token_interval_s: float = 0.02, first_delay_s: float = 0.0
    ) -> None:
        self._default_tokens = default_tokens
        self._interval = token_interval_s
        self._first_delay = first_delay_s
        self._closed = threading.Event()

    def count_prompt_tokens(self, prompt: str) -> int:
        return max(1, len(prompt.split()))

    def _pause(self, seconds: float, cancelled: Callable[[], bool]) -> bool:
        """Wait ``seconds``; False when cancelled (or shutting down) meanwhile."""
        end_slices = max(1, int(seconds / 0.01))
        for _ in range(end_slices):
            if cancelled() or self._closed.wait(seconds / end_slices):
                return False
        return not cancelled()

    def _pieces(
        self, prompt: str, sampling: EngineSampling
    ) -> tuple[list[str], list[int | None], bool]:
        """The answer's tokens, the vocabulary index of each drawn word (None for a certain
        piece), and whether it ends by itself ("stop") rather than by length."""
        constraint = sampling.structured_outputs
        scripted = (
            constrained_answer(constraint) if constraint is not None else scripted_answer(prompt)
        )
        partial = partial_answer(prompt)
        if scripted is not None and constraint is None and partial:
            # A continuation of the scripted answer goes on from where the partial one stops.
            scripted = scripted[len(partial) :] if scripted.startswith(partial) else scripted
        if scripted is not None:
            pieces = _PIECE.findall(scripted) or [scripted]
            cut = sampling.max_tokens is not None and sampling.max_tokens < len(pieces)
            pieces = pieces[: sampling.max_tokens] if cut else pieces
            return pieces, [None] * len(pieces), not cut
        rng = random.Random(sampling.seed)
        lead = _resume(prompt, rng)
        limited = sampling.max_tokens is not None
        count = sampling.max_tokens if sampling.max_tokens is not None else self._default_tokens
        drawn = [rng.randrange(len(_WORDS)) for _ in range(count)]  # as rng.choice draws
        words = [(lead if i == 0 else " ") + _WORDS[w] for i, w in enumerate(drawn)]
        return words, list[int | None](drawn), not limited

    def stream(
        self, prompt: str, sampling: EngineSampling, cancelled: Callable[[], bool]
    ) -> Iterator[Step]:
        pieces, drawn, complete = self._pieces(prompt, sampling)
        stops = StopMatcher(sampling.stop)
        if not self._pause(self._first_delay, cancelled):
            return
        for i, piece in enumerate(pieces):
            if i and not self._pause(self._interval, cancelled):
                return
            logprobs = (
                (_logprobs(piece, drawn[i], i, sampling.logprobs),)
                if sampling.logprobs is not None
                else ()
            )
            text, hit = stops.feed(piece)
            if hit:
                yield Step(text, 1, "stop", logprobs)
                return
            if i == len(pieces) - 1:
                finish = "stop" if complete else "length"
                yield Step(text + stops.flush(), 1, finish, logprobs)
                return
            yield Step(text, 1, None, logprobs)

    def close(self) -> None:
        self._closed.set()

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> SyntheticEngine:
        return cls(
            default_tokens=int(parameters.get("default_tokens", "64")),
            token_interval_s=float(parameters.get("token_interval_ms", "20")) / 1000,
            first_delay_s=float(parameters.get("first_token_delay_ms", "0")) / 1000,
        )
