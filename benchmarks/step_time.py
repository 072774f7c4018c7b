"""What one decoding step of SmolLM2 costs below Triton: ``llama_decode`` timed directly through
llama-cpp-python's low-level API, for 1, 2, 4 and 8 sequences decoding together.

    .venv/bin/python benchmarks/step_time.py [--weights ,q8_0,f16] [--threads 1,2]
        [--batch-sizes 1,2,4,8] [--steps 48] [--n-batch 128] [--logits all|one]
        [--json FILE]

Each configuration (weights, threads) loads the model in a context of 8 slots as the engine
does (one KV stream per slot, flash attention), prefills 8 different prompts, then for each batch
size B runs ``--steps`` steps that each decode one token of each of B sequences (as the engine
does once every running sequence is past its prompt) and samples each greedily. Per step it
reports the median (and the least) wall time of ``llama_decode`` and the median CPU time it
took (all threads: the work, which other load on the cores does not inflate as much), the time
of filling the batch in Python and of sampling, and the decode time per token. ``--logits one``
asks logits of the first sequence only, which shows what the output layer (49,152 by 576, once
per sequence with logits) costs.

``--weights`` re-quantizes the shipped Q4_1 GGUF once (cached under ``--cache``), as the model
config's ``weights`` parameter does; an empty entry is the file as shipped. OpenMP's wait policy is
the engine's (passive on fewer than four cores) unless ``OMP_WAIT_POLICY`` is set. Figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services"))

from batching import PROMPTS  # noqa: E402 - the same story prompts as the through-edge runs

# _llama_cpp sets the engine's OpenMP wait policy before it loads llama_cpp: use its module.
from tokenrelay.triton_python import _llama_cpp  # noqa: E402
from tokenrelay.triton_python.llama import default_gguf  # noqa: E402

llama_cpp = _llama_cpp.llama_cpp

SLOTS = 8


def _template(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def measure(
    path: Path, threads: int, n_batch: int, sizes: list[int], steps: int, logits: str
) -> dict[str, object]:
    model = _llama_cpp.Model(path)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = SLOTS * 1024
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = SLOTS
    params.n_threads = threads
    params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.kv_unified = False
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    batch = _llama_cpp.Batch(max(n_batch, SLOTS))
    greedy = [llama_cpp.llama_sampler_init_greedy() for _ in range(SLOTS)]
    pos = [0] * SLOTS
    last = [0] * SLOTS
    prefill_s = []
    for seq, prompt in enumerate(PROMPTS):
        tokens = model.tokenize(_template(prompt))
        batch.clear()
        for i, token in enumerate(tokens):
            batch.add(token, i, seq, i == len(tokens) - 1)
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch.raw) != 0:
            raise RuntimeError("prefill failed")
        prefill_s.append((time.perf_counter() - started, len(tokens)))
        pos[seq] = len(tokens)
        last[seq] = llama_cpp.llama_sampler_sample(greedy[seq], ctx, batch.size - 1)
    results = []
    for size in sizes:
        decode, fill, sample, cpu = [], [], [], []
        for _ in range(steps):
            cpu_started = time.process_time()
            started = time.perf_counter()
            batch.clear()
            for seq in range(size):
                batch.add(last[seq], pos[seq], seq, logits == "all" or seq == 0)
            filled = time.perf_counter()
            if llama_cpp.llama_decode(ctx, batch.raw) != 0:
                raise RuntimeError("decode failed")
            decoded = time.perf_counter()
            cpu.append(time.process_time() - cpu_started)
            for seq in range(size):
                pos[seq] += 1
                if logits == "all" or seq == 0:
                    last[seq] = llama_cpp.llama_sampler_sample(greedy[seq], ctx, seq)
            sampled = time.perf_counter()
            fill.append(filled - started)
            decode.append(decoded - filled)
            sample.append(sampled - decoded)
        step = statistics.median(decode)
        results.append(
            {
                "batch": size,
                "decode_ms": round(step * 1e3, 2),
                "decode_min_ms": round(min(decode) * 1e3, 2),
                "decode_cpu_ms": round(statistics.median(cpu) * 1e3, 2),
                "decode_ms_per_token": round(step * 1e3 / size, 2),
                "fill_ms": round(statistics.median(fill) * 1e3, 3),
                "sample_ms": round(statistics.median(sample) * 1e3, 3),
                "tok_s": round(size / (step + statistics.median(fill) + statistics.median(sample))),
            }
        )
    for sampler in greedy:
        llama_cpp.llama_sampler_free(sampler)
    batch.close()
    llama_cpp.llama_free(ctx)
    model.close()
    tokens = sum(n for _, n in prefill_s)
    return {
        "prefill_tok_s": round(tokens / sum(s for s, _ in prefill_s)),
        "steps": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="", help="comma-separated; empty entry: as shipped")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--n-batch", type=int, default=128)
    parser.add_argument("--logits", choices=("all", "one"), default="all")
    parser.add_argument("--model", type=Path, help="GGUF (default: the shipped SmolLM2)")
    parser.add_argument("--cache", type=Path, help="where converted weights are kept")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    source = args.model or default_gguf()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
        f" load {os.getloadavg()[0]:.2f}, llama-cpp-python {llama_cpp.__version__},"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')},"
        f" system: {llama_cpp.llama_print_system_info().decode().strip()}"
    )
    report = []
    for weights in args.weights.split(","):
        path = _llama_cpp.convert_weights(source, weights, args.cache) if weights else source
        for threads in (int(t) for t in args.threads.split(",")):
            figures = measure(path, threads, args.n_batch, sizes, args.steps, args.logits)
            label = weights or "as shipped"
            print(
                f"\n## weights {label}, n_threads {threads}, n_batch {args.n_batch},"
                f" logits {args.logits}: prefill {figures['prefill_tok_s']} tok/s"
            )
            print(
                "| batch | decode ms/step (min) | CPU ms/step | ms/token | fill ms | sample ms |"
                " tok/s |"
            )
            print("|---|---|---|---|---|---|---|")
            for row in figures["steps"]:  # type: ignore[attr-defined]
                print(
                    f"| {row['batch']} | {row['decode_ms']} ({row['decode_min_ms']}) |"
                    f" {row['decode_cpu_ms']} |"
                    f" {row['decode_ms_per_token']} |"
                    f" {row['fill_ms']} | {row['sample_ms']} | {row['tok_s']} |"
                )
            report.append({"weights": label, "threads": threads, **figures})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
