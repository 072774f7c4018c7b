"""The batched llama.cpp engine on the real SmolLM2 GGUF, without Triton: sequences decode
together, give the text they give alone, wait their turn in order, and leave their slot the
moment they end, whatever happens to the others.

It needs no server, but decoding real tokens takes a minute on two cores, so it lives with the
slow (system) tier rather than in ``make test-fast``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from tokenrelay.triton_python._contract import BadRequest, parse_sampling
from tokenrelay.triton_python._engine import Step
from tokenrelay.triton_python._llama_cpp import Model
from tokenrelay.triton_python.llama import LlamaEngine, default_gguf

CHATML = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours.",
    "Why is the sky blue?",
)
SEEDED = '{"max_tokens": 24, "temperature": 0.8, "seed": 11}'


class Recorder:
    """A ``StepSink`` that keeps what it was told, with a switch to cancel and a fault to raise."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.steps: list[Step] = []
        self.error: Exception | None = None
        self.was_stopped = False
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.first_at: float | None = None
        self.ended_at: float | None = None
        self._fail_at = fail_at

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def emit(self, step: Step) -> None:
        if self._fail_at is not None and len(self.steps) == self._fail_at:
            raise RuntimeError("the sink broke")
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.steps.append(step)
        if step.finish_reason is not None:
            self._end()

    def fail(self, error: Exception) -> None:
        self.error = error
        self._end()

    def stopped(self) -> None:
        self.was_stopped = True
        self._end()

    def _end(self) -> None:
        self.ended_at = time.monotonic()
        self.done.set()

    def wait(self) -> Recorder:
        assert self.done.wait(120), "the request never ended"
        return self


class StepLog:
    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def __call__(self, sequences: int, tokens: int) -> None:
        self.steps.append((sequences, tokens))


def _engine(log: StepLog | None = None, **options: object) -> LlamaEngine:
    settings: dict[str, object] = {"n_ctx": 512, "n_parallel": 4, "n_batch": 32} | options
    return LlamaEngine(default_gguf(), on_step=log, **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def log() -> StepLog:
    return StepLog()


@pytest.fixture(scope="module")
def engine(log: StepLog) -> Iterator[LlamaEngine]:
    running = _engine(log)
    yield running
    running.close()


def _ask(engine: LlamaEngine, question: str, sampling: str = SEEDED, **sink: int) -> Recorder:
    recorder = Recorder(**sink)
    engine.submit(CHATML.format(question), parse_sampling(sampling), recorder)
    return recorder


def test_sequences_decode_together_and_give_the_text_they_give_alone(
    engine: LlamaEngine, log: StepLog
) -> None:
    for sampling in (SEEDED, '{"max_tokens": 24, "temperature": 0}'):
        alone = [_ask(engine, q, sampling).wait() for q in QUESTIONS]
        log.steps.clear()
        together = [_ask(engine, q, sampling) for q in QUESTIONS]
        assert [r.wait().text for r in together] == [r.text for r in alone]
        assert all(r.error is None and not r.was_stopped for r in together)
        # One llama_decode served all four sequences at once.
        assert max(sequences for sequences, _ in log.steps) == len(QUESTIONS)
        assert len({r.text for r in alone}) == len(QUESTIONS)
        assert all(r.steps[-1].finish_reason in ("stop", "length") for r in alone)


def test_sequences_decoded_one_by_one_give_the_text_they_give_alone() -> None:
    """Where small steps are faster one token at a time (``one_by_one``, timed at load), the
    decoding sequences take one ``llama_decode`` each, and nothing they say changes."""
    log = StepLog()
    engine = _engine(log, one_by_one=len(QUESTIONS))
    try:
        for sampling in (SEEDED, '{"max_tokens": 24, "temperature": 0}'):
            alone = [_ask(engine, q, sampling).wait() for q in QUESTIONS]
            log.steps.clear()
            together = [_ask(engine, q, sampling) for q in QUESTIONS]
            assert [r.wait().text for r in together] == [r.text for r in alone]
            # No step decoded several sequences' tokens together (a step of k sequences and k
            # tokens); steps with prompt chunks (more tokens than sequences) still do.
            assert not [step for step in log.steps if step[0] == step[1] > 1]
            assert (1, 1) in log.steps
    finally:
        engine.close()


def test_a_long_prompt_is_prefilled_in_chunks_without_changing_any_text(
    engine: LlamaEngine, log: StepLog
) -> None:
    long_question = "Summarise this: " + " ".join(f"item {i} is blue." for i in range(40))
    alone_long = _ask(engine, long_question).wait()
    alone_short = _ask(engine, QUESTIONS[0], '{"max_tokens": 40, "temperature": 0}').wait()
    log.steps.clear()
    short = _ask(engine, QUESTIONS[0], '{"max_tokens": 40, "temperature": 0}')
    while not short.steps:
        time.sleep(0.001)
    long = _ask(engine, long_question)  # arrives while the short one decodes
    assert long.wait().text == alone_long.text
    assert short.wait().text == alone_short.text
    # No step took more than n_batch tokens, and the short answer kept coming meanwhile.
    assert max(tokens for _, tokens in log.steps) <= 32
    assert sum(1 for sequences, _ in log.steps if sequences == 2) >= 3


def test_requests_wait_for_a_slot_in_arrival_order() -> None:
    engine = _engine(n_parallel=2)
    try:
        recorders = [_ask(engine, q, '{"max_tokens": 12, "temperature": 0}') for q in QUESTIONS]
        for recorder in recorders:
            recorder.wait()
        first, second, third, fourth = recorders
        assert third.first_at is not None and fourth.first_at is not None
        # The third starts only when a slot is free, and before the fourth.
        assert third.first_at > min(first.ended_at or 0, second.ended_at or 0)
        assert third.first_at <= fourth.first_at
        assert all(r.error is None and r.steps[-1].finish_reason for r in recorders)
    finally:
        engine.close()


def test_a_cancelled_request_frees_its_slot_at_once() -> None:
    engine = _engine(n_parallel=1)
    try:
        long = _ask(engine, "Write a very long story.", '{"max_tokens": 400}')
        waiting = _ask(engine, QUESTIONS[0], '{"max_tokens": 8, "temperature": 0}')
        gone = _ask(engine, QUESTIONS[1], '{"max_tokens": 8, "temperature": 0}')
        while len(long.steps) < 3:
            time.sleep(0.001)
        gone.cancel.set()  # gives up while it waits
        long.cancel.set()
        assert long.wait().was_stopped and len(long.steps) < 50
        assert gone.wait().was_stopped and not gone.steps
        assert waiting.wait().steps[-1].finish_reason is not None
        assert waiting.text
    finally:
        engine.close()


def test_one_requests_failure_ends_that_request_only(engine: LlamaEngine) -> None:
    alone = [_ask(engine, q).wait() for q in QUESTIONS[1:]]
    broken = _ask(engine, QUESTIONS[0], fail_at=3)
    others = [_ask(engine, q) for q in QUESTIONS[1:]]
    assert isinstance(broken.wait().error, RuntimeError) and len(broken.steps) == 3
    assert [r.wait().text for r in others] == [r.text for r in alone]
    # The engine still serves.
    assert _ask(engine, QUESTIONS[0]).wait().steps[-1].finish_reason is not None


def test_requests_it_cannot_serve_are_refused_before_they_join(engine: LlamaEngine) -> None:
    with pytest.raises(BadRequest, match="context window is 512 tokens"):
        engine.submit("word " * 600, parse_sampling(""), Recorder())
    with pytest.raises(BadRequest, match="empty"):
        engine.submit("", parse_sampling(""), Recorder())


def test_max_tokens_stop_and_the_vllm_default_length(engine: LlamaEngine) -> None:
    counted = _ask(
        engine, "Count from 1 to 20, separated by commas.", '{"max_tokens": 60, "temperature": 0}'
    ).wait()
    assert "5" in counted.text
    cut = _ask(
        engine,
        "Count from 1 to 20, separated by commas.",
        '{"max_tokens": 60, "temperature": 0, "stop": "5"}',
    ).wait()
    assert cut.text == counted.text[: counted.text.index("5")]
    assert cut.steps[-1].finish_reason == "stop"
    default = _ask(engine, "Write a very long story.", '{"temperature": 0}').wait()
    assert sum(s.tokens for s in default.steps) == 16  # vLLM's default max_tokens
    assert default.steps[-1].finish_reason == "length"


def test_close_stops_running_and_waiting_requests() -> None:
    engine = _engine(n_parallel=1)
    running = _ask(engine, "Write a very long story.", '{"max_tokens": 400}')
    waiting = _ask(engine, QUESTIONS[0])
    while not running.steps:
        time.sleep(0.001)
    engine.close()
    assert running.wait().was_stopped and waiting.wait().was_stopped
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(CHATML.format("Hi"), parse_sampling(""), Recorder())


def test_prefix_cache_evaluates_only_the_new_part_and_changes_no_text() -> None:
    system = "<|im_start|>system\nYou are a helpful assistant who answers briefly.<|im_end|>\n"
    prompts = [system + CHATML.format(q) for q in QUESTIONS]
    sampling = parse_sampling(SEEDED)
    texts = {}
    fed = {}
    for cached in (False, True):
        log = StepLog()
        engine = _engine(log, n_parallel=1, prefix_cache=cached)
        try:
            answers = []
            for prompt in prompts:
                recorder = Recorder()
                engine.submit(prompt, sampling, recorder)
                answers.append(recorder.wait().text)
            texts[cached] = answers
            fed[cached] = sum(tokens for _, tokens in log.steps)
        finally:
            engine.close()
    assert texts[True] == texts[False]
    model = Model(default_gguf())
    shared = len(model.tokenize(system))
    model.close()
    # Each prompt after the first reused (at least) the system prompt's cells.
    assert fed[False] - fed[True] >= (len(prompts) - 1) * (shared - 1)


def test_a_constrained_request_beside_plain_ones_changes_none_of_them(
    engine: LlamaEngine,
) -> None:
    choice = json.dumps(
        {
            "max_tokens": 8,
            "temperature": 0,
            "structured_outputs": json.dumps({"choice": ["red", "green", "blue"]}),
        }
    )
    alone = [_ask(engine, q).wait() for q in QUESTIONS[1:]]
    constrained = _ask(engine, "Name a colour.", choice)
    others = [_ask(engine, q) for q in QUESTIONS[1:]]
    assert constrained.wait().text in ("red", "green", "blue")
    assert [r.wait().text for r in others] == [r.text for r in alone]


def test_a_grammar_that_cannot_be_built_is_refused_before_it_joins(engine: LlamaEngine) -> None:
    unresolvable = json.dumps({"json": {"$ref": "#/$defs/nowhere"}})
    with pytest.raises(BadRequest, match="this schema is not supported"):
        engine.submit(
            CHATML.format("Hi"),
            parse_sampling(json.dumps({"structured_outputs": unresolvable})),
            Recorder(),
        )
    with pytest.raises(BadRequest, match="out of range"):
        engine.submit(
            CHATML.format("Hi"), parse_sampling('{"logit_bias": {"49152": 1}}'), Recorder()
        )


def test_a_string_under_a_json_schema_never_holds_a_raw_control_character(
    engine: LlamaEngine,
) -> None:
    """JSON forbids raw control characters in a string, so the schema's grammar must too: with
    the newline token pushed to the top of every step, the answer still parses."""
    model = Model(default_gguf())
    try:
        newline = model.tokenize("\n")[-1]
    finally:
        model.close()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    sampling = json.dumps(
        {
            "max_tokens": 64,
            "temperature": 0,
            "logit_bias": {str(newline): 100},
            "structured_outputs": json.dumps({"json": schema}),
        }
    )
    text = (
        _ask(engine, "Which city is the capital of France? Answer in JSON.", sampling).wait().text
    )
    assert isinstance(json.loads(text)["city"], str), text
