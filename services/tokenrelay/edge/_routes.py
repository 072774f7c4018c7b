"""The other routes of the edge: embeddings, models, health and readiness, metrics, the OpenAPI
description and the browser chat page. (The generation endpoints are in ``_generate``.)"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from tokenrelay._probes import readiness_answer
from tokenrelay._workers import gather
from tokenrelay.edge import _openai as oa
from tokenrelay.edge._generate import budget, read_json
from tokenrelay.edge._state import METRICS, REQUEST_ID, SETTINGS, UPSTREAM, WORKER, readiness
from tokenrelay.errors import InvalidRequest, ModelNotFound
from tokenrelay.logs import bind
from tokenrelay.metrics import CONTENT_TYPE
from tokenrelay.tracing import inject
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import retrieval_pb2 as rpb

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """Vectors from the embedding model in Triton (OpenAI ``createEmbedding``)."""
    settings = request.app[SETTINGS]
    parsed = oa.parse_embeddings(await read_json(request))
    with bind(request_id=request[REQUEST_ID], model=parsed.model):
        response = await request.app[UPSTREAM].embed(
            rpb.EmbedRequest(model=parsed.model, input=parsed.inputs),
            budget(request, settings),
            metadata=[("x-request-id", request[REQUEST_ID]), *inject()],
        )
    size = len(response.embeddings[0].values) if response.embeddings else 0
    if parsed.dimensions is not None and parsed.dimensions != size:
        raise InvalidRequest(
            f"'{response.model}' makes embeddings of {size} dimensions only.", "dimensions"
        )
    return web.json_response(oa.embeddings_response(response.model, response, parsed.base64))


_KINDS = {pb.MODEL_KIND_CHAT: "chat", pb.MODEL_KIND_EMBEDDING: "embedding"}


def _model_json(model: pb.Model) -> dict[str, Any]:
    """OpenAI's model object, plus ``kind`` (``chat`` or ``embedding``: what it is called for)
    and, for chat models, ``context_window`` and ``capabilities`` (tools and their format,
    structured outputs, logprobs, logit_bias) — extensions, as vLLM adds ``max_model_len``."""
    body: dict[str, Any] = {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "kind": _KINDS.get(model.kind, "chat"),
    }
    if model.context_window:
        body["context_window"] = model.context_window
    if model.kind == pb.MODEL_KIND_CHAT:
        caps = model.capabilities
        body["capabilities"] = {
            "tools": bool(caps.tool_parser),
            "tool_parser": caps.tool_parser or None,
            "structured_outputs": caps.structured_outputs,
            "logprobs": caps.logprobs,
            "logit_bias": caps.logit_bias,
        }
    return body


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = await request.app[UPSTREAM].list_models(request.app[SETTINGS].ready_timeout_s * 5)
    return web.json_response({"object": "list", "data": [_model_json(m) for m in models]})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    models = await request.app[UPSTREAM].list_models(request.app[SETTINGS].ready_timeout_s * 5)
    wanted = request.match_info["model"]
    for model in models:
        if model.id == wanted:
            return web.json_response(_model_json(model))
    raise ModelNotFound(wanted)


_OPENAPI = json.loads(resources.files("tokenrelay.edge").joinpath("openapi.json").read_text())


_STATIC = Path(str(resources.files("tokenrelay.edge").joinpath("static")))
_PAGE = (_STATIC / "index.html").read_text()
# The page's own policy: its script, style and API calls come from this origin, nothing else.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@routes.get("/")
async def chat_page(request: web.Request) -> web.Response:
    """The browser chat page (static files, no build step)."""
    return web.Response(
        text=_PAGE, content_type="text/html", headers={"Content-Security-Policy": _PAGE_CSP}
    )


routes.static("/static", _STATIC)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The description of this API (kept in the repository: tokenrelay/edge/openapi.json)."""
    return web.json_response(_OPENAPI)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (no API key: block it at the ingress if the port is public). In a
    group of workers: every worker's samples, labelled ``worker``."""
    worker = request.app[WORKER]
    if worker is None:
        body = request.app[METRICS].exposition()
    else:
        body = await gather(worker, request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    status, body = readiness_answer(*readiness(request.app))
    return web.json_response(body, status=status)
