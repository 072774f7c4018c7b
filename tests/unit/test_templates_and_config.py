"""Chat templates and settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from _support import REPO
from tokenrelay.config import Settings, load_settings
from tokenrelay.generation import ChatMessage
from tokenrelay.templates import ChatTemplate


def test_chatml_adds_default_system_prompt_only_when_missing() -> None:
    template = ChatTemplate("chatml", "Be brief.")
    user = [ChatMessage("user", "Hi")]
    assert template.render(user) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own = template.render([ChatMessage("system", "Be long."), *user])
    assert "Be brief." not in own and own.startswith("<|im_start|>system\nBe long.")


def test_llama3_and_custom_templates() -> None:
    rendered = ChatTemplate("llama3").render([ChatMessage("user", " Hi ")])
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Hi<|eot_id|>" in rendered
    custom = ChatTemplate("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>")
    assert custom.render([ChatMessage("user", "x")]) == "[user]x>"
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_repository_config_file_documents_the_defaults() -> None:
    assert load_settings({"TOKENRELAY_CONFIG": str(REPO / "tokenrelay.toml")}) == Settings()


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


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[orchestrator]\nlisen = 'x:1'\n", "unknown key"),
        ("[edge]\nmax_body_bytes = 'big'\n", "expected int"),
        ("[[models]]\nid = 'a'\ntriton_model = 'a'\ndefault_max_tokens = 9999\n", "context window"),
        ("[extra]\n", "unknown section"),
        ("[edge]\nlisten = 'nowhere'\n", "host:port"),
        ("[[models]]\nid = 'a'\ntriton_model = 'a'\nfallback = 'b'\n", "fallback must name"),
        ("[[models]]\nid = 'a'\ntriton_model = 'a'\nfallback = 'a'\n", "fallback must name"),
        ("[orchestrator.breaker]\nfailure_rate = 1.5\n", "failure_rate"),
        ("[orchestrator.admission]\nmax_concurrent = 0\n", "admission"),
        ("[orchestrator.routing]\nhedge_after_s = -1\n", "routing"),
    ],
)
def test_bad_config_is_refused_with_its_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ValueError, match=message):
        load_settings({"TOKENRELAY_CONFIG": str(path)})
