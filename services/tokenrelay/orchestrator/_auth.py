"""The internal hop's guard: who is calling, and whether they may.

Every call but health checks must come from a known caller; health checks stay open so that
orchestrators and probes (Kubernetes gRPC probes cannot send metadata) can ask, and they reveal
nothing but SERVING or not. A caller is known by, in this order:

1. the **internal secret** (``authorization: Bearer <secret>``, compared in constant time): the
   edge. It speaks for its own callers, so the identity it forwards (``x-tokenrelay-caller``:
   the API key's id, tier and token limits) is believed;
2. a **client token** of ``orchestrator.clients_file`` (a keys file like the edge's; revoked
   entries refused): a gRPC client with an identity of its own — its entry's id, tier and limits;
3. the **mTLS client certificate**, when an entry of the clients file names one of its subject
   alternative names (``san``): that entry's identity. A verified certificate that no entry
   names belongs to an internal component as before (mutual TLS alone guards the hop when no
   secret is set), so it may forward identities too.

With neither a secret nor mutual TLS configured (loopback only, ``check_exposure``), every caller
is let in, and a forwarded identity believed. Any caller may ask for a priority
(``x-tokenrelay-priority``), capped by its tier. The identity of the call is
``current_identity`` while its handler runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any, TypeAlias

import grpc

from tokenrelay.security import ApiKey, KeyStore, Secret
from tokenrelay.tenancy import (
    Caller,
    Identity,
    Tenants,
    caller_from_metadata,
    requested_priority,
)

__all__ = ["CallerInterceptor", "current_identity"]

log = logging.getLogger(__name__)

_OPEN = ("/grpc.health.v1.Health/",)
_REFUSAL = "This call needs the internal secret or a client token (authorization metadata)."
_INTERNAL = "internal"

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "tokenrelay_identity", default=None
)


def _client(key: ApiKey, metadata: Mapping[str, str | bytes]) -> Caller:
    return Caller(
        key.id, key.tier, key.tokens_per_minute, key.token_budget, requested_priority(metadata)
    )


class CallerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler but health's with the check above (see the module docstring).
    Place it after the border interceptor, so that its refusals are behind the border."""

    def __init__(
        self,
        tenants: Tenants,
        secret: Secret | None = None,
        clients: KeyStore | None = None,
        mutual_tls: bool = False,
    ) -> None:
        self._tenants = tenants
        self._secret = secret
        self._clients = clients if clients is not None and clients.enabled else None
        self._mutual = mutual_tls
        self._open = secret is None and not mutual_tls and self._clients is None
        self._wrap = functools.lru_cache(maxsize=512)(self._guarded)

    async def _reload(self) -> None:
        clients = self._clients
        if clients is not None and clients.maybe_reload():
            try:
                await asyncio.to_thread(clients.reload)
            except (OSError, ValueError) as exc:
                log.error(
                    "clients file unreadable; keeping the previous clients",
                    extra={"fields": {"error": str(exc)}},
                )

    def _by_certificate(self, context: Context) -> ApiKey | None:
        if self._clients is None:
            return None
        names = {
            bytes(v).decode(errors="replace")
            for v in context.auth_context().get("x509_subject_alternative_name", ())
        }
        return self._clients.find_san(names) if names else None

    async def _identify(self, context: Context) -> Caller | None:
        """The caller of the call, or None when it is not known."""
        metadata: dict[str, str | bytes] = dict(context.invocation_metadata() or ())
        raw = metadata.get("authorization", "")
        scheme, _, token = (raw if isinstance(raw, str) else "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if self._open:
            return caller_from_metadata(metadata) or Caller(_INTERNAL)
        if token and self._secret is not None and self._secret.matches(token):
            return caller_from_metadata(metadata) or Caller(_INTERNAL)
        await self._reload()
        if token and self._clients is not None:
            key = self._clients.find(token)
            if key is not None and not key.revoked:
                return _client(key, metadata)
        if self._mutual:
            key = self._by_certificate(context)
            if key is not None and not key.revoked:
                return _client(key, metadata)
            if self._secret is None and key is None:  # an internal component, as before
                return caller_from_metadata(metadata) or Caller(_INTERNAL)
        return None

    async def _admit(self, method: str, context: Context) -> None:
        caller = await self._identify(context)
        if caller is None:
            log.warning(
                "call refused: no or wrong credentials", extra={"fields": {"method": method}}
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
            return
        current_identity.set(self._tenants.identify(caller))

    def _guarded(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        behavior: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        admit = functools.partial(self._admit, method)
        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):

            async def generates(request: Any, context: Context) -> AsyncIterator[Any]:
                await admit(context)
                async with aclosing(behavior(request, context)) as messages:
                    async for message in messages:
                        yield message

            wrapped = generates
        else:

            async def answers(request: Any, context: Context) -> Any:
                await admit(context)
                return await behavior(request, context)

            wrapped = answers
        factory: Any = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(  # type: ignore[no-any-return]
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

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
        return self._wrap(method, handler)
