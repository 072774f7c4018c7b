"""How faithful a continuation is on a real model: SmolLM2-135M (the CPU model's own engine,
llama.cpp, in this process — no Triton needed) decoding greedily.

    .venv/bin/python benchmarks/continuation_fidelity.py [--tokens 80] [--cuts 5,20,40]

For each question it generates an uninterrupted greedy answer, then, for each cut point k, the
continuation the orchestrator would send another node after the first k model steps went out
(``Planner.continuation``: the rendered prompt, the text so far, ``max_tokens`` reduced by k), and
prints whether the spliced answer equals the uninterrupted one — and where the two part when it
does not (the text so far is tokenized afresh, which may split it differently from how the model
produced it). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from tokenrelay.config import Settings  # noqa: E402
from tokenrelay.generation import ChatMessage, GenerationRequest, Role, Sampling  # noqa: E402
from tokenrelay.orchestrator._plan import Planner  # noqa: E402
from tokenrelay.triton_python._contract import EngineSampling  # noqa: E402
from tokenrelay.triton_python.llama import LlamaEngine, default_gguf  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a circuit breaker does in a distributed system.",
    "List three fruits and their colours.",
    "Tell me a short story about a robot who learns to paint.",
    "How do I boil an egg?",
)


def _steps(engine: LlamaEngine, prompt: str, tokens: int) -> list[str]:
    sampling = EngineSampling(max_tokens=tokens, temperature=0.0, seed=0)
    return [step.text for step in engine.stream(prompt, sampling, lambda: False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--cuts", default="5,20,40")
    args = parser.parse_args()
    cuts = [int(c) for c in args.cuts.split(",")]
    settings = Settings()
    planner = Planner(settings.models, settings.orchestrator.limits)
    engine = LlamaEngine(default_gguf())
    same = total = 0
    for question in QUESTIONS:
        request = GenerationRequest(
            model="smollm2-135m-instruct",
            messages=(ChatMessage(Role.USER, question),),
            sampling=Sampling(max_tokens=args.tokens, temperature=0.0),
        )
        (plan,) = planner.plans(request)
        steps = _steps(engine, plan.prompt, args.tokens)
        whole = "".join(steps)
        for cut in cuts:
            if cut >= len(steps):
                continue
            text = "".join(steps[:cut])
            continued = planner.continuation(plan, text, cut, 1)
            rest = "".join(_steps(engine, continued.prompt, args.tokens - cut))
            spliced = text + rest
            total += 1
            if spliced == whole:
                same += 1
                print(f"same      cut {cut:3}: {question}")
            else:
                at = next(
                    (i for i, (a, b) in enumerate(zip(spliced, whole, strict=False)) if a != b),
                    min(len(spliced), len(whole)),
                )
                print(
                    f"different cut {cut:3}: {question} — from character {at} (the cut is at"
                    f" {len(text)}): {whole[at : at + 30]!r} vs {spliced[at : at + 30]!r}"
                )
    engine.close()
    print(f"\n{same} of {total} continued answers equal the uninterrupted ones")


if __name__ == "__main__":
    main()
