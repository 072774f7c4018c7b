"""Security on real processes: TLS and mutual TLS on both internal hops, the internal secret,
API keys, slow and oversized clients, and schemathesis fuzzing the edge from its OpenAPI file."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import schemathesis
import tritonclient.grpc as triton_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from tritonclient.utils import InferenceServerException

from _support import REPO, assert_openai, make_certificates, wait_until
from tokenrelay.config import EdgeSettings, OrchestratorSettings, Settings, to_toml
from tokenrelay.security import new_key
from tokenrelay.stack import Stack, StackPorts
from tokenrelay.v1 import generation_pb2 as pb
from tokenrelay.v1 import generation_pb2_grpc as pb_grpc

API_KEY = new_key()
SECRET = "internal-" + new_key()
CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def _fast_repository(tmp: Path) -> Path:
    """The synthetic model without its pause between tokens (fuzzed requests may ask for
    thousands of tokens), and the embedding model."""
    repository = tmp / "fast_models"
    shutil.copytree(REPO / "triton_models" / "synthetic", repository / "synthetic")
    shutil.copytree(REPO / "triton_models" / "minilm", repository / "minilm")
    config = repository / "synthetic" / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            '{ key: "token_interval_ms", value: { string_value: "20" } }',
            '{ key: "token_interval_ms", value: { string_value: "0" } }',
        )
    )
    return repository


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, Path]]]:
    """Edge → orchestrator and orchestrator → Triton, both over mutual TLS, plus the secret."""
    folder = tmp_path_factory.mktemp("tls")
    certs = make_certificates(folder)
    stack = Stack(
        REPO / "triton_models",
        StackPorts.free(),
        models=("synthetic",),
        env={"TOKENRELAY_INTERNAL_SECRET": SECRET, "TOKENRELAY_API_KEY": API_KEY},
        triton_args=(
            "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={certs['server']}",
            f"--grpc-server-key={certs['server_key']}",
            f"--grpc-root-cert={certs['ca']}",
        ),
        fast_stop=True,
    )
    settings = Settings(
        orchestrator=OrchestratorSettings(
            tls_cert=str(certs["server"]),
            tls_key=str(certs["server_key"]),
            tls_client_ca=str(certs["ca"]),
            triton_tls_ca=str(certs["ca"]),
            triton_tls_cert=str(certs["orchestrator"]),
            triton_tls_key=str(certs["orchestrator_key"]),
        ),
        edge=EdgeSettings(
            orchestrator_tls_ca=str(certs["ca"]),
            orchestrator_tls_cert=str(certs["edge"]),
            orchestrator_tls_key=str(certs["edge_key"]),
        ),
    )
    config = folder / "tokenrelay.toml"
    config.write_text(to_toml(settings))
    stack.config = config
    with stack:
        yield stack, certs


def _credentials(certs: dict[str, Path], client: str | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs["ca"].read_bytes(),
        private_key=certs[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=certs[client].read_bytes() if client else None,
    )


def test_both_hops_over_mutual_tls_serve_requests(tls: tuple[Stack, dict[str, Path]]) -> None:
    stack, _ = tls
    response = httpx.post(
        f"{stack.edge_url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert_openai("CreateChatCompletionResponse", response.json())


@pytest.mark.parametrize(
    ("client", "metadata", "refused"),
    [
        (None, (("authorization", f"Bearer {SECRET}"),), grpc.StatusCode.UNAVAILABLE),
        ("rogue", (("authorization", f"Bearer {SECRET}"),), grpc.StatusCode.UNAVAILABLE),
        ("edge", (), grpc.StatusCode.UNAUTHENTICATED),
        ("edge", (("authorization", f"Bearer {SECRET}"),), None),
    ],
)
def test_orchestrator_wants_a_certificate_of_our_ca_and_the_secret(
    tls: tuple[Stack, dict[str, Path]],
    client: str | None,
    metadata: tuple[tuple[str, str], ...],
    refused: grpc.StatusCode | None,
) -> None:
    stack, certs = tls
    with grpc.secure_channel(stack.orchestrator_address, _credentials(certs, client)) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=5)
            code = None
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
    assert code == refused
    with (
        grpc.insecure_channel(stack.orchestrator_address) as plain,
        pytest.raises(grpc.RpcError),
    ):
        pb_grpc.GenerationServiceStub(plain).ListModels(pb.ListModelsRequest(), timeout=5)


def test_triton_wants_the_orchestrators_certificate(tls: tuple[Stack, dict[str, Path]]) -> None:
    stack, certs = tls
    good = triton_grpc.InferenceServerClient(
        stack.triton_grpc,
        ssl=True,
        root_certificates=str(certs["ca"]),
        private_key=str(certs["orchestrator_key"]),
        certificate_chain=str(certs["orchestrator"]),
    )
    assert good.is_server_ready()
    for client in (
        triton_grpc.InferenceServerClient(
            stack.triton_grpc, ssl=True, root_certificates=str(certs["ca"])
        ),
        triton_grpc.InferenceServerClient(stack.triton_grpc),
    ):
        with pytest.raises(InferenceServerException, match=r"(?i)unavailable"):
            client.is_server_ready(client_timeout=5)


def test_no_secret_reaches_the_logs(tls: tuple[Stack, dict[str, Path]]) -> None:
    stack, _ = tls
    httpx.post(  # a refused key is logged as refused, not shown
        f"{stack.edge_url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {API_KEY}x"},
        timeout=10,
    )
    for name in ("edge", "orchestrator", "triton"):
        text = (stack.logs / f"{name}.log").read_text()
        assert API_KEY not in text and SECRET not in text, name


LIMITS = Settings(edge=EdgeSettings(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=24))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with tight client limits, an API key and a synthetic model with no pause."""
    folder = tmp_path_factory.mktemp("guarded")
    config = folder / "tokenrelay.toml"
    config.write_text(to_toml(LIMITS))
    with Stack(
        _fast_repository(folder),
        StackPorts.free(),
        models=("synthetic", "minilm"),
        config=config,
        env={"TOKENRELAY_API_KEY": API_KEY},
        fast_stop=True,
    ) as stack:
        yield stack


def _chat(stack: Stack) -> int:
    return httpx.post(
        f"{stack.edge_url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    ).status_code


def _connect(stack: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.ports.edge), timeout=5)


def test_slow_loris_clients_are_cut_off_while_others_are_served(guarded: Stack) -> None:
    slow = [_connect(guarded) for _ in range(10)]
    began = time.monotonic()
    for sock in slow:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    while time.monotonic() - began < 0.8:
        for sock in slow:
            sock.sendall(b"X-Drip: 1\r\n")  # never the blank line that ends the headers
        assert _chat(guarded) == 200
        time.sleep(0.2)
    for sock in slow:
        sock.settimeout(3)
        with contextlib.suppress(ConnectionResetError):  # a reset is a close too
            assert sock.recv(1024) == b""  # closed by the edge
        sock.close()
    assert time.monotonic() - began < 3.0


def test_a_connection_past_the_cap_is_refused_and_capacity_comes_back(guarded: Stack) -> None:
    idle = [_connect(guarded) for _ in range(24)]
    # No wait for the edge to take them: it accepts connections in the order they came, so it
    # holds all 24 by the time it takes the next one.
    extra = _connect(guarded)
    extra.settimeout(3)
    refusal = extra.recv(4096)
    assert refusal.startswith(b"HTTP/1.1 503") and b'"error"' in refusal
    extra.close()
    for sock in idle:
        sock.close()

    def served() -> bool:  # refused (503, or closed mid-request) until the edge saw them close
        try:
            return _chat(guarded) == 200
        except httpx.TransportError:
            return False

    assert wait_until(served, step_s=0.05), "capacity never came back"


def test_oversized_and_slow_bodies_are_refused(guarded: Stack) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = httpx.post(
        f"{guarded.edge_url}/v1/chat/completions",
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers=headers,
        timeout=10,
    )
    assert big.status_code == 413
    assert_openai("ErrorResponse", big.json())
    sock = _connect(guarded)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\n".encode()
        + b"Content-Length: 100\r\n\r\n{"
    )
    sock.settimeout(5)
    began = time.monotonic()
    answer = sock.recv(4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert time.monotonic() - began < 3.0
    assert _chat(guarded) == 200


def test_openapi_description_is_served_and_kept_in_the_repository(guarded: Stack) -> None:
    served = httpx.get(f"{guarded.edge_url}/openapi.json", timeout=5).json()
    kept = json.loads((REPO / "services/tokenrelay/edge/openapi.json").read_text())
    assert served == kept


FUZZ_EXAMPLES = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_schemathesis_finds_no_5xx_and_only_openai_shaped_errors(guarded: Stack) -> None:
    raw = json.loads((REPO / "services/tokenrelay/edge/openapi.json").read_text())
    schema = schemathesis.openapi.from_dict(raw)
    operations: set[str] = set()
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode), real_model=st.booleans())
            @settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def run(case: schemathesis.Case, real_model: bool) -> None:
                if real_model and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "synthetic"  # past the catalog, into generation
                response = case.call(
                    base_url=guarded.edge_url,
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=30,
                )
                statuses[response.status_code] += 1
                case.validate_response(response, checks=CHECKS)
                if 400 <= response.status_code < 500:
                    assert_openai("ErrorResponse", response.json())

            with contextlib.suppress(Unsatisfiable):  # nothing negative to make of some routes
                run()
            operations.add(operation.label)
    print(f"schemathesis: {sum(statuses.values())} requests, statuses {sorted(statuses.items())}")
    assert len(operations) == 11
    assert statuses[200] >= 20 and statuses[400] >= 10, statuses  # both paths were reached
    assert not [s for s in statuses if s >= 500], statuses
    assert _chat(guarded) == 200  # and a well-formed request still succeeds
