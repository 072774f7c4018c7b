"""vLLM's own streaming rate, the ceiling of the GPU suite: ``AsyncLLM`` in this process, no
Triton and no network between the engine and the client.

    python benchmarks/gpu/vllm_ceiling.py ENGINE_ARGS.json --port P

It loads the engine (the same engine arguments as the Triton models' model.json), then serves
``POST /run`` {"prompts": [...], "concurrency": N, "max_tokens": M} on loopback: N streams in a
closed loop over the prompts (greedy), delta outputs; the answer is one sample per request
(TTFT, the gaps between outputs, tokens, end-to-end time), measured where the engine's outputs
arrive. ``GET /ready`` answers 200 once the engine is up. Run by ``suite.py``, which times the
other targets the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web


async def _one(engine: Any, params: Any, prompt: str) -> dict[str, Any]:
    began = last = time.perf_counter()
    sample: dict[str, Any] = {"ttft_s": None, "gaps_s": [], "tokens": 0, "pieces": 0}
    async for out in engine.generate(prompt, params, uuid.uuid4().hex):
        output = out.outputs[0]
        sample["tokens"] += len(output.token_ids)
        if not output.text:
            continue
        now = time.perf_counter()
        if sample["ttft_s"] is None:
            sample["ttft_s"] = now - began
        else:
            sample["gaps_s"].append(now - last)
        last = now
        sample["pieces"] += 1
    sample["e2e_s"] = time.perf_counter() - began
    sample["error"] = None
    return sample


async def _run(engine: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(
        max_tokens=int(body["max_tokens"]), temperature=0.0, output_kind=RequestOutputKind.DELTA
    )
    prompts = list(body["prompts"])
    samples: list[dict[str, Any]] = []

    async def client() -> None:
        while prompts:
            samples.append(await _one(engine, params, prompts.pop(0)))

    await asyncio.gather(*(client() for _ in range(int(body["concurrency"]))))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_args", type=Path)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    async def start(app: web.Application) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs(**json.loads(args.engine_args.read_text()))
        app["engine"] = AsyncLLM.from_engine_args(engine_args)

    async def stop(app: web.Application) -> None:
        app["engine"].shutdown()

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def run(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(await _run(request.app["engine"], body))

    app = web.Application(client_max_size=64 * 2**20)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/ready", ready)
    app.router.add_post("/run", run)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
