"""The internal hop's guard: every call but health checks must carry the shared secret.

The secret travels as ``authorization: Bearer <secret>`` metadata and is compared in constant
time. Health checks stay open so that orchestrators and probes (Kubernetes gRPC probes cannot
send metadata) can ask; they reveal nothing but SERVING or not. Mutual TLS, when configured, is
checked by gRPC itself before any of this runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from tokenrelay.security import Secret

__all__ = ["InternalSecretInterceptor"]

log = logging.getLogger(__name__)

_OPEN = ("/grpc.health.v1.Health/",)
_REFUSAL = "This call needs the internal secret (authorization metadata)."


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)


class InternalSecretInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, secret: Secret) -> None:
        self._secret = secret

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or method.startswith(_OPEN):
            return handler
        metadata = dict(details.invocation_metadata or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() == "bearer" and self._secret.matches(token.strip()):
            return handler
        log.warning(
            "call refused: no or wrong internal secret", extra={"fields": {"method": method}}
        )
        # A handler of the same kind as the method's, so that gRPC reads the request as usual
        # and then gets the refusal.
        kind = (
            grpc.unary_unary_rpc_method_handler
            if not handler.request_streaming and not handler.response_streaming
            else grpc.unary_stream_rpc_method_handler
            if not handler.request_streaming
            else grpc.stream_unary_rpc_method_handler
            if not handler.response_streaming
            else grpc.stream_stream_rpc_method_handler
        )
        return kind(
            _deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
