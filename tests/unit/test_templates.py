"""Chat templates (tokenrelay.templates)."""

from __future__ import annotations

import pytest

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
