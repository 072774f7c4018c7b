"""Settings (tokenrelay.config): the file, the environment registry, checks, and the TOML writer."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from _support import REPO
from tokenrelay.config import (
    ENVIRONMENT,
    Admission,
    ConfigError,
    EdgeSettings,
    EnvVar,
    ModelSpec,
    OrchestratorSettings,
    Retrieval,
    Routing,
    Settings,
    Timeouts,
    Tracing,
    load_settings,
    split_hostport,
    to_toml,
)
from tokenrelay.config.environment import markdown_table


def _load(tmp_path: Path, toml: str, **environ: str) -> Settings:
    path = tmp_path / "tokenrelay.toml"
    path.write_text(toml)
    return load_settings({"TOKENRELAY_CONFIG": str(path), **environ})


def _setting(settings: Settings, path: str) -> Any:
    value: Any = settings
    for name in path.split("."):
        value = getattr(value, name)
    return value


def test_repository_config_file_documents_the_defaults() -> None:
    assert load_settings({"TOKENRELAY_CONFIG": str(REPO / "tokenrelay.toml")}) == Settings()
    assert load_settings({}) == Settings()


def test_environment_overrides() -> None:
    settings = load_settings(
        {
            "TOKENRELAY_TRITON": "10.0.0.1:8001, 10.0.0.2:8001",
            "TOKENRELAY_ORCHESTRATOR_LISTEN": "0.0.0.0:6000",
            "TOKENRELAY_EDGE_ORCHESTRATOR": "orch:6000",
            "TOKENRELAY_LOG_LEVEL": "debug",
        }
    )
    assert settings.orchestrator.triton == ("10.0.0.1:8001", "10.0.0.2:8001")
    assert settings.nodes_for(settings.models[0]) == settings.orchestrator.triton
    assert settings.orchestrator.listen == "0.0.0.0:6000"
    assert settings.edge.orchestrator == "orch:6000"
    assert settings.log_level == "DEBUG"


# One valid value per variable (a new variable needs one), and what it becomes in Settings.
SAMPLES: dict[str, tuple[str, object]] = {
    "TOKENRELAY_ORCHESTRATOR_LISTEN": ("0.0.0.0:6000", "0.0.0.0:6000"),
    "TOKENRELAY_ORCHESTRATOR_METRICS": ("", ""),
    "TOKENRELAY_ORCHESTRATOR_HEALTH": ("127.0.0.1:9465", "127.0.0.1:9465"),
    "TOKENRELAY_ORCHESTRATOR_FRAMES": ("127.0.0.1:50052", "127.0.0.1:50052"),
    "TOKENRELAY_TRITON": ("a:1, ,b:2,", ("a:1", "b:2")),
    "TOKENRELAY_EDGE_LISTEN": ("[::1]:8081", "[::1]:8081"),
    "TOKENRELAY_EDGE_HEALTH": ("0.0.0.0:8082", "0.0.0.0:8082"),
    "TOKENRELAY_EDGE_ORCHESTRATOR": ("orch:6000", "orch:6000"),
    "TOKENRELAY_EDGE_ORCHESTRATOR_FRAMES": ("127.0.0.1:6001", "127.0.0.1:6001"),
    "TOKENRELAY_LOG_LEVEL": ("warning", "WARNING"),
    "TOKENRELAY_EVENT_LOOP": ("asyncio", "asyncio"),
    "TOKENRELAY_TRACING": ("otlp", "otlp"),
    "TOKENRELAY_TRACING_ENDPOINT": ("http://collector:4318/v1/traces",) * 2,
    "TOKENRELAY_VECTOR_STORE": ("none", "none"),
    "TOKENRELAY_QDRANT_PATH": ("/data/qdrant",) * 2,
    "TOKENRELAY_QDRANT_URL": ("http://qdrant:6333",) * 2,
}


@pytest.mark.parametrize(
    "var", [v for v in ENVIRONMENT if v.setting and not v.secret], ids=lambda v: v.name
)
def test_each_variable_overrides_the_setting_it_names(var: EnvVar) -> None:
    text, expected = SAMPLES[var.name]
    assert _setting(load_settings({var.name: text}), var.setting) == expected
    assert _setting(Settings(), var.setting) != expected


def test_an_override_wins_over_the_file(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        "[edge]\nlisten = '127.0.0.1:1'\n[orchestrator]\ntriton = ['x:1']\n",
        TOKENRELAY_EDGE_LISTEN="127.0.0.1:2",
        TOKENRELAY_TRITON="y:1",
    )
    assert settings.edge.listen == "127.0.0.1:2"
    assert settings.orchestrator.triton == ("y:1",)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[orchestrator]\nlisen = 'x:1'\n",
            "orchestrator.lisen: unknown key (did you mean listen?)",
        ),
        ("[edge]\nmax_body_bytes = 'big'\n", "edge.max_body_bytes: expected an integer, got 'big'"),
        ("[edge]\nmax_body_bytes = true\n", "edge.max_body_bytes: expected an integer, got True"),
        ("[edge]\nmax_body_bytes = 1.5\n", "edge.max_body_bytes: expected an integer, got 1.5"),
        ("[edge]\nlisten = 8080\n", "edge.listen: expected a string, got 8080"),
        ("[edge]\ncors_origins = 'https://a'\n", "edge.cors_origins: expected an array"),
        ("edge = 1\n", "edge: expected a table, got 1"),
        (
            "[[models]]\nid = 'a'\ntriton_model = 'a'\ndefault_max_tokens = 9999\n",
            "models[0]: model 'a': default_max_tokens (9999) must fit the context window (2048)",
        ),
        ("[[models]]\nid = 'a'\ntriton_model = 'a'\nnods = []\n", "models[0].nods: unknown key"),
        ("[[models]]\ntriton_model = 'a'\n", "models[0].id: required, and missing"),
        (
            "[[models]]\nid = ''\ntriton_model = 'a'\n",
            "models[0].id: must have at least 1 character, got ''",
        ),
        ("[extra]\n", "extra: unknown section"),
        ("[secrets]\ninternal = 'x'\n", "secrets: set them in the environment"),
        ("[edge]\nlisten = 'nowhere'\n", "edge.listen: expected host:port, got 'nowhere'"),
        ("[edge]\nlisten = 'host:99999'\n", "host:port"),
        (
            "[orchestrator]\nmetrics_listen = 'x'\n",
            "orchestrator.metrics_listen: expected host:port",
        ),
        ("[[models]]\nid = 'a'\ntriton_model = 'a'\nfallback = 'b'\n", "fallback must name"),
        ("[[models]]\nid = 'a'\ntriton_model = 'a'\nfallback = 'a'\n", "fallback must name"),
        (
            "[[models]]\nid = 'a'\ntriton_model = 'a'\n[[models]]\nid = 'a'\ntriton_model = 'b'\n",
            "models: duplicate model id 'a'",
        ),
        ("[orchestrator]\ntriton = []\n", "models: 'smollm2-135m-instruct' has no Triton nodes"),
        ("[orchestrator.breaker]\nfailure_rate = 1.5\n", "orchestrator.breaker.failure_rate: must"),
        ("[orchestrator.admission]\nmax_concurrent = 0\n", "orchestrator.admission.max_concurrent"),
        ("[orchestrator.routing]\nhedge_after_s = -1\n", "orchestrator.routing.hedge_after_s"),
        (
            "[orchestrator.routing]\nhedge_after_s = 90.0\n",
            "orchestrator: routing.hedge_after_s (90) must be shorter than timeouts.first_token_s",
        ),
        (
            "[orchestrator.timeouts]\nconnect_s = 0\n",
            "orchestrator.timeouts.connect_s: must be greater than 0, got 0",
        ),
        ("[orchestrator.timeouts]\ntotal_s = -5.0\n", "orchestrator.timeouts.total_s: must be"),
        (
            "[orchestrator.timeouts]\nfirst_token_s = 700.0\n",
            "orchestrator.timeouts: first_token_s (700) must not exceed total_s (600)",
        ),
        ("[orchestrator.timeouts]\nbetween_tokens_s = inf\n", "must be a finite number"),
        ("[orchestrator.timeouts]\nbetween_tokens_s = nan\n", "must be a finite number"),
        ("[orchestrator]\ntls_cert = 'c.pem'\n", "orchestrator: tls_cert and tls_key go together"),
        ("[orchestrator]\ntls_client_ca = 'ca.pem'\n", "tls_client_ca needs tls_cert"),
        ("[edge]\norchestrator_tls_key = 'k.pem'\n", "edge: orchestrator_tls_cert and orchestr"),
        ("event_loop = 'trio'\n", "event_loop: expected 'auto', 'uvloop' or 'asyncio', got 'trio'"),
        ("log_level = 'loud'\n", "log_level: expected 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ("[tracing]\nexporter = 'jaeger'\n", "tracing.exporter: expected 'none', 'console' or"),
        ("[retrieval]\nstore = 'faiss'\n", "retrieval.store: expected 'qdrant', 'pgvector' or"),
        ("[retrieval]\non_failure = 'retry'\n", "retrieval.on_failure: expected 'answer' or"),
        ("[retrieval]\nmin_score = 1.5\n", "retrieval.min_score: must be less than or equal to 1"),
        ("[retrieval]\ndefault_top_k = 40\n", "retrieval: default_top_k (40) must not exceed"),
        ("[retrieval]\nchunk_overlap = 1000\n", "retrieval: chunk_overlap (1000) must be less"),
        ("[retrieval]\ncontext_share = 0\n", "retrieval.context_share: must be greater than 0"),
        ("[retrieval]\nstore = 'pgvector'\n", "pgvector needs TOKENRELAY_POSTGRES_DSN"),
        ("[embeddings]\nbatch_size = 0\n", "embeddings.batch_size: must be greater than or equal"),
        ("log_level = 'INFO'\n[edge\n", "tokenrelay.toml: Expected ']'"),
    ],
)
def test_bad_config_is_refused_with_its_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load(tmp_path, toml)


def test_every_problem_is_named_at_once_and_an_override_names_its_variable(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError) as caught:
        _load(
            tmp_path,
            "[edge]\nmax_body_bytes = 0\n[orchestrator.limits]\nmax_mesages = 3\n",
            TOKENRELAY_EVENT_LOOP="trio",
            TOKENRELAY_TRITON="a:1,b:2",
            TOKENRELAY_EDGE_LISTEN="nowhere",
        )
    problems = str(caught.value).split("; ")
    assert problems == [
        "orchestrator.limits.max_mesages: unknown key (did you mean max_messages?)",
        "edge.listen (from TOKENRELAY_EDGE_LISTEN): expected host:port, got 'nowhere'",
        "edge.max_body_bytes: must be greater than or equal to 1, got 0",
        "event_loop (from TOKENRELAY_EVENT_LOOP): expected 'auto', 'uvloop' or 'asyncio',"
        " got 'trio'",
    ]
    with pytest.raises(ConfigError, match=r"TOKENRELAY_INTERNAL_SECRET_FILE: .*No such file"):
        load_settings({"TOKENRELAY_INTERNAL_SECRET_FILE": str(tmp_path / "missing")})


def test_secrets_come_from_the_environment_only_and_never_show(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-the-file\n")
    settings = load_settings(
        {
            "TOKENRELAY_INTERNAL_SECRET": "from-the-variable",
            "TOKENRELAY_INTERNAL_SECRET_FILE": str(secret_file),
            "TOKENRELAY_API_KEY": "tr-key-123",
            "TOKENRELAY_POSTGRES_DSN": "postgresql://u:hunter2@db/x",
            "TOKENRELAY_VECTOR_STORE": "pgvector",
        }
    )
    assert settings.secrets.internal is not None
    assert settings.secrets.internal.matches("from-the-variable")  # the variable wins
    assert settings.secrets.api_key is not None and settings.secrets.api_key.matches("tr-key-123")
    for shown in (repr(settings), str(settings), to_toml(settings)):
        for secret in ("from-the-variable", "tr-key-123", "hunter2"):
            assert secret not in shown
    assert "[secrets]" not in to_toml(settings)
    empty = load_settings(
        {"TOKENRELAY_INTERNAL_SECRET": "", "TOKENRELAY_INTERNAL_SECRET_FILE": str(secret_file)}
    )
    assert empty.secrets.internal is not None and empty.secrets.internal.matches("from-the-file")
    assert load_settings({"TOKENRELAY_API_KEY": ""}).secrets.api_key is None


def test_settings_built_in_code_are_checked_like_a_file() -> None:
    defaults = Settings()
    with pytest.raises(ValueError, match="greater than 0"):
        dataclasses.replace(defaults.orchestrator.timeouts, total_s=0)
    with pytest.raises(ValueError, match="must not exceed total_s"):
        Timeouts(first_token_s=10.0, total_s=5.0)
    with pytest.raises(ValueError, match="hedge_after_s"):
        OrchestratorSettings(routing=Routing(hedge_after_s=60.0))
    with pytest.raises(ValueError, match="duplicate model id"):
        dataclasses.replace(defaults, models=(defaults.models[0], defaults.models[0]))
    with pytest.raises(ValueError, match="Input should be"):
        EdgeSettings(cors_origins=["https://a"])  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.edge.listen = "0.0.0.0:80"  # type: ignore[misc]
    assert Admission(queue_timeout_s=5).queue_timeout_s == 5.0
    assert Settings(log_level="debug").log_level == "DEBUG"  # type: ignore[arg-type]


def test_to_toml_reads_back_equal(tmp_path: Path) -> None:
    assert _load(tmp_path, to_toml(Settings())) == Settings()
    defaults = Settings()
    changed = dataclasses.replace(
        defaults,
        log_level="DEBUG",
        event_loop="asyncio",
        orchestrator=dataclasses.replace(
            defaults.orchestrator,
            triton=("10.0.0.1:8001", "[::1]:8001"),
            metrics_listen="",
            timeouts=Timeouts(connect_s=0.25, first_token_s=1e-3, total_s=1e6),
            routing=Routing(hedge_after_s=1e-4, max_retries=0),
        ),
        edge=EdgeSettings(cors_origins=("https://chat.example", "*"), max_connections=1),
        models=(
            ModelSpec(
                "a",
                "a-model",
                nodes=("n:1",),
                fallback="b",
                chat_template="{% for m in messages %}[{{ m.role }}]\n{{ m.content }}{% endfor %}",
                default_system_prompt='Say "hi" \\ or \u00e9t\u00e9 \U0001f600\x7f\ttab\x00',
            ),
            ModelSpec("b", "b", owned_by="", context_window=1, default_max_tokens=1),
        ),
        tracing=Tracing(exporter="console", endpoint=""),
        retrieval=Retrieval(store="none", min_score=-1.0, chunk_overlap=0, on_failure="fail"),
    )
    text = to_toml(changed)
    assert _load(tmp_path, text) == changed
    assert "[[models]]" in text and "[orchestrator.timeouts]" in text


def test_readme_lists_the_environment_registry() -> None:
    readme = (REPO / "README.md").read_text()
    found = re.search(
        r"<!-- environment variables: .*? -->\n(.*?)<!-- end of environment variables -->",
        readme,
        re.DOTALL,
    )
    assert found is not None, "README.md lost the markers around its table of variables"
    assert found.group(1) == markdown_table(), "README.md: paste markdown_table() between them"
    names = [v.name for v in ENVIRONMENT]
    assert len(set(names)) == len(names) and all(n.startswith("TOKENRELAY_") for n in names)
    for var in ENVIRONMENT:
        if var.setting and not var.secret:
            _setting(Settings(), var.setting)  # names a real setting


def test_split_hostport() -> None:
    assert split_hostport("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_hostport("[::1]:0") == ("::1", 0)
    for bad in ("nowhere", ":80", "host:", "host:http", "host:65536"):
        with pytest.raises(ValueError, match="host:port"):
            split_hostport(bad)
