"""Helpers of the test tiers: OpenAI schema validation, Triton metrics, a fake token source."""

from __future__ import annotations

import asyncio
import json
import random
import re
import urllib.request
from collections.abc import AsyncGenerator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tokenrelay.config import Settings
from tokenrelay.errors import UpstreamUnavailable
from tokenrelay.generation import Delta, FinishReason, Sampling
from tokenrelay.orchestrator._admission import AdmissionControl
from tokenrelay.orchestrator._metrics import RelayMetrics
from tokenrelay.orchestrator._plan import Planner
from tokenrelay.orchestrator._pool import NodePool
from tokenrelay.orchestrator._relay import Relay
from tokenrelay.retrieval import Retriever

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "openai-schemas.json"


@cache
def _registry() -> tuple[Registry, dict[str, Any]]:
    document = json.loads(SCHEMAS.read_text())
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    return Registry().with_resource("urn:openai", resource), document


def assert_openai(schema: str, instance: Any) -> None:
    """Fail unless ``instance`` validates against the official OpenAI schema ``schema``."""
    registry, document = _registry()
    assert schema in document["components"]["schemas"], schema
    validator = Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{schema}"}, registry=registry
    )
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{schema}: " + "; ".join(
        f"{list(e.path)}: {e.message[:200]}" for e in errors[:5]
    )


def relay_for(
    settings: Settings,
    pool: NodePool,
    retriever: Retriever | None = None,
    metrics: RelayMetrics | None = None,
) -> Relay:
    """A relay composed as the orchestrator composes it (``server.Orchestrator``)."""
    return Relay(
        settings,
        Planner(settings.models, settings.orchestrator.limits),
        pool,
        AdmissionControl(settings.orchestrator.admission),
        metrics or RelayMetrics(m.id for m in settings.models),
        retriever,
    )


def triton_metric(metrics_url: str, name: str, **labels: str) -> float:
    """The value of one sample on Triton's Prometheus endpoint (0 when absent)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


class FakeSource:
    """An in-memory ``TokenSource`` for unit and in-process tests.

    Streams ``words`` one per ``interval_s``; records each generation's prompt and whether it was
    closed early (cancelled). ``fail_with`` raises instead of streaming; ``first_delay_s`` delays
    the first token.
    """

    def __init__(
        self,
        name: str = "fake:1",
        words: tuple[str, ...] = ("Hello", " world", "!"),
        interval_s: float = 0.0,
        first_delay_s: float = 0.0,
        ready: bool = True,
        fail_with: BaseException | None = None,
    ) -> None:
        self._name = name
        self.words = words
        self.interval_s = interval_s
        self.first_delay_s = first_delay_s
        self.is_ready = ready
        self.fail_with = fail_with
        self.prompts: list[str] = []
        self.samplings: list[Sampling] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = 0
        self.finished = 0
        self.closed = False
        self.ended = asyncio.Event()  # set when a generation ends, whichever way

    @property
    def name(self) -> str:
        return self._name

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling: Sampling,
        request_id: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[Delta, None]:
        self.headers.append(dict(headers))
        self.prompts.append(prompt)
        self.samplings.append(sampling)
        done = False
        try:
            await asyncio.sleep(self.first_delay_s)
            if self.fail_with is not None:
                raise self.fail_with
            limit = sampling.max_tokens or len(self.words)
            words = self.words[:limit]
            for i, word in enumerate(words):
                if i:
                    await asyncio.sleep(self.interval_s)
                last = i == len(words) - 1
                reason = None
                if last:
                    reason = FinishReason.LENGTH if limit < len(self.words) else FinishReason.STOP
                yield Delta(word, 1, len(prompt.split()), reason)
            done = True
        finally:
            if done:
                self.finished += 1
            else:
                self.cancelled += 1
            self.ended.set()

    async def ready(self, model: str) -> bool:
        return self.is_ready

    async def close(self) -> None:
        self.closed = True


WORDS = ("zorblatt", "quenvik", "veltrax", "toaster", "marmot", "banana")


class FakeEmbedder:
    """Bag-of-known-words vectors: texts sharing words are similar, others orthogonal."""

    name = "fake-embedder"

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def embed(
        self, model: str, texts: Sequence[str], request_id: str, timeout_s: float
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        self.calls.append(len(texts))
        vectors = np.zeros((len(texts), 8), np.float32)
        for i, text in enumerate(texts):
            for j, word in enumerate(WORDS):
                vectors[i, j] = text.lower().count(word)
            vectors[i, 7] = 0.01
            vectors[i] /= np.linalg.norm(vectors[i])
        return vectors, np.array([len(t.split()) for t in texts], np.uint32)


def unavailable() -> UpstreamUnavailable:
    return UpstreamUnavailable("The inference node is unavailable.")


T = TypeVar("T")


class Clock:
    """A fake monotonic clock: tests move ``now`` by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ordered(random.Random):
    """An rng that always takes the first candidates, so routing ties go to the first node."""

    def choice(self, seq: Sequence[T]) -> T:
        return seq[0]

    def sample(self, population: Sequence[T], k: int, **_: Any) -> list[T]:  # type: ignore[override]
        return list(population[:k])


def make_certificates(folder: Path) -> dict[str, Path]:
    """A test CA and certificates it signs, as PEM files in ``folder``: ``ca``; ``server`` (for
    127.0.0.1 and localhost) and the clients ``edge`` and ``orchestrator`` (``*.crt``/``*.key``
    pairs, keys by name + ``_key``); and ``rogue`` (a client certificate from another CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        paths[name] = folder / f"{name}.crt"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def authority(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def leaf(
        name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca[0].subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        write(name, builder.sign(ca[1], hashes.SHA256()), key)

    ca = authority("tokenrelay test CA")
    write("ca", *ca)
    leaf("server", ca, server=True)
    leaf("edge", ca, server=False)
    leaf("orchestrator", ca, server=False)
    leaf("rogue", authority("someone else"), server=False)
    return paths


class SpanSink:
    """An OTLP/HTTP traces receiver on loopback (a thread): collects every span it is sent.

    ``spans()`` returns them as dicts: name, trace_id, span_id, parent (hex), kind, service,
    attributes (a flat dict) and status code.
    """

    def __init__(self) -> None:
        import http.server
        import threading

        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        received: list[Any] = []
        self._received = received
        self._lock = threading.Lock()
        lock = self._lock

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = trace_service_pb2.ExportTraceServiceRequest()
                if "json" in self.headers.get("Content-Type", ""):
                    json_format.Parse(body, request)  # Triton's exporter sends OTLP/JSON
                else:
                    request.ParseFromString(body)
                with lock:
                    received.append(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def spans(self) -> list[dict[str, Any]]:
        def value(v: Any) -> Any:
            kind = v.WhichOneof("value")
            if kind == "array_value":
                return [value(x) for x in v.array_value.values]
            return getattr(v, kind) if kind else None

        out = []
        with self._lock:
            requests = list(self._received)
        for request in requests:
            for resource in request.resource_spans:
                service = next(
                    (
                        value(a.value)
                        for a in resource.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        out.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "service": service,
                                "attributes": {a.key: value(a.value) for a in span.attributes},
                                "status": span.status.code,
                            }
                        )
        return out

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
