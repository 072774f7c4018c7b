"""Chat templates: turn a conversation into the prompt text a model was trained on.

Templates are Jinja2, rendered in a sandbox the way Hugging Face tokenizers render their
``chat_template`` (variables ``messages``, ``add_generation_prompt``, ``default_system``), so a
model's template can be copied from its ``tokenizer_config.json`` into the catalog unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenrelay.errors import InvalidRequest
from tokenrelay.generation import ChatMessage

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate"]

# ChatML, as SmolLM2-Instruct's tokenizer_config.json has it, with the default system prompt
# made a variable. Generation stops at <|im_end|>, the model's end-of-generation token.
_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3 instruct format, for the GPU catalog.
_LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% if messages[0]['role'] != 'system' and default_system %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + default_system + '<|eot_id|>' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "llama3": _LLAMA3}


def _raise_exception(message: str) -> NoReturn:
    raise InvalidRequest(message, param="messages")


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_ENV.globals["raise_exception"] = _raise_exception


class ChatTemplate:
    """A compiled chat template. ``render`` is pure and safe to call concurrently."""

    def __init__(self, source: str, default_system: str = "") -> None:
        """``source`` is a builtin name (``chatml``, ``llama3``) or Jinja2 text.

        Raises ``ValueError`` when the Jinja2 text does not compile.
        """
        text = BUILTIN_TEMPLATES.get(source, source)
        try:
            self._template = _ENV.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from exc
        self._default_system = default_system

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for ``messages``, ending where the assistant's answer begins.

        Raises ``InvalidRequest`` when the template refuses the conversation.
        """
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            default_system=self._default_system,
        )
