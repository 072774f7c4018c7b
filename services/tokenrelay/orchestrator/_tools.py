"""Tool calls in a model's output: the catalog's formats, and the incremental parser.

A catalog model names its tool-call format (``tool_parser``), the one its chat template renders
and it was trained to write:

- ``hermes`` (ChatML models: Hermes, Qwen2.5, SmolLM2 here): each call is
  ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, anywhere in the answer, text around
  them allowed;
- ``llama3_json`` (Llama 3.1 and later): the answer *is* the calls, ``{"name": …, "parameters":
  {…}}``, separated by ``;``, optionally after ``<|python_tag|>``; an answer that does not start
  with ``{`` is text.

A forced call (``tool_choice`` required or a named function) is constrained by a JSON schema of
one call object in the format's own shape (``ToolFormat.call_schema``); constrained decoding
cannot produce the Hermes tags, so the forced answer is the bare object, which the parser reads
with ``forced=True``.

``ToolCallParser`` turns the answer's text, as it streams, into text and ``ToolCallDelta`` pieces:
text before a call goes out at once (only what could be the start of a tag is held back); a
call's first piece carries its id and name as soon as the name is read; its arguments go out as
the model writes them. What is held is bounded (``max_held`` characters): a call whose name has
not come within it is no call, and its text goes out as text. Output that does not parse as a call
goes out as text too, unless part of the call already went out (then the call ends there).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenrelay.generation import Tool, ToolCallDelta

__all__ = ["FORMATS", "Parsed", "ToolCallParser", "ToolFormat", "new_call_id"]

_MAX_KEY = 256  # characters of a key, or of a function name, as written (escapes included)
_ARGUMENT_KEYS = frozenset({"arguments", "parameters"})
_WHITESPACE = " \t\r\n"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a piece of output became: text to show, and pieces of tool calls."""

    text: str = ""
    calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """A tool-call format: the name of its arguments key, and whether calls are tagged."""

    name: str
    arguments_key: str
    tagged: bool  # hermes: <tool_call> … </tool_call>; else the answer starts with the calls

    def call_schema(self, tools: tuple[Tool, ...]) -> dict[str, Any]:
        """The JSON schema of one call of one of ``tools``, in this format's shape."""
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.name]},
                    self.arguments_key: (
                        json.loads(tool.parameters)
                        if tool.parameters
                        else {"type": "object", "properties": {}}
                    ),
                },
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for tool in tools
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def parser(
        self,
        *,
        forced: bool = False,
        parallel: bool = True,
        max_held: int = 16_384,
        new_id: Callable[[], str] = new_call_id,
    ) -> ToolCallParser:
        """A parser for one answer. ``forced``: the answer is one bare call object (constrained);
        ``parallel`` false: the answer ends after its first call (``ToolCallParser.done``)."""
        return ToolCallParser(
            tag=("<tool_call>", "</tool_call>") if self.tagged and not forced else None,
            prefix="" if self.tagged or forced else "<|python_tag|>",
            max_calls=1 if forced or not parallel else None,
            max_held=max_held,
            new_id=new_id,
        )


FORMATS: Mapping[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", "arguments", tagged=True),
    "llama3_json": ToolFormat("llama3_json", "parameters", tagged=False),
}


class _Failed(Exception):
    """The text is not a well-formed call object."""


class _CallScanner:
    """Reads one call object, ``{"name": "…", "arguments": {…}}``, a character at a time.

    Keys may come in any order; other keys are skipped. ``name`` is set once the name is read;
    ``arguments`` collects the arguments' JSON text as it is read (taken by the caller);
    ``complete`` is set at the object's closing brace. ``feed`` raises ``_Failed`` on anything
    that is not such an object.
    """

    def __init__(self, max_held: int) -> None:
        self._max_held = max_held
        self._state = "open"
        self._key: list[str] = []
        self._current = ""  # the key whose value is being read
        self._string = False  # inside a string (key, name or value)
        self._escape = False
        self._depth = 0
        self._value_kind = ""  # of the value being read: object, array, string, literal
        self._value: list[str] = []  # a name, or string-valued arguments, as written
        self.name: str | None = None
        self.arguments: list[str] = []
        self.saw_arguments = False
        self.complete = False

    def _string_char(self, ch: str) -> bool:
        """Track a string's escapes; True at its closing quote."""
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            return True
        return False

    def feed(self, ch: str) -> None:
        """Read one character (never after ``complete``)."""
        state = self._state
        if state == "open":
            if ch in _WHITESPACE:
                return
            if ch != "{":
                raise _Failed
            self._state = "key_or_end"
        elif state in ("key_or_end", "key"):
            if ch in _WHITESPACE:
                return
            if ch == '"':
                self._state, self._key = "key_text", []
            elif ch == "}" and state == "key_or_end":
                self._end()
            else:
                raise _Failed
        elif state == "key_text":
            if self._string_char(ch):
                self._current = _decode_string("".join(self._key))
                self._state = "colon"
            else:
                self._key.append(ch)
                if len(self._key) > _MAX_KEY:
                    raise _Failed
        elif state == "colon":
            if ch in _WHITESPACE:
                return
            if ch != ":":
                raise _Failed
            self._state = "value"
        elif state == "value":
            if ch in _WHITESPACE:
                return
            self._start_value(ch)
        elif state == "in_value":
            self._value_char(ch)
        elif ch in _WHITESPACE:  # after_value
            return
        elif ch == ",":
            self._state = "key"
        elif ch == "}":
            self._end()
        else:
            raise _Failed

    def _start_value(self, ch: str) -> None:
        key = self._current
        if key == "name" and (ch != '"' or self.name is not None):
            raise _Failed
        self._value = []
        self._state = "in_value"
        if ch in "{[":
            self._value_kind, self._depth = ("object" if ch == "{" else "array"), 1
        elif ch == '"':
            self._value_kind, self._string = "string", True
        elif ch in "-0123456789tfn":
            self._value_kind = "literal"
        else:
            raise _Failed
        if key in _ARGUMENT_KEYS:
            if self.saw_arguments or self._value_kind == "array":
                raise _Failed
            self.saw_arguments = True
        self._keep(ch)

    def _keep(self, ch: str) -> None:
        """A character of the current value: arguments stream; a name is collected."""
        if self._current in _ARGUMENT_KEYS and self._value_kind == "object":
            self.arguments.append(ch)
        elif self._current == "name" or self._current in _ARGUMENT_KEYS:
            self._value.append(ch)
            if len(self._value) > (_MAX_KEY if self._current == "name" else self._max_held):
                raise _Failed

    def _value_char(self, ch: str) -> None:
        kind = self._value_kind
        if kind == "literal":
            if ch in _WHITESPACE or ch in ",}":
                self._value_done()  # a literal ends at the character after it, which is
                self.feed(ch)  # then read as what follows the value
            else:
                self._keep(ch)
            return
        self._keep(ch)
        if self._string:
            if self._string_char(ch):
                self._string = False
                if kind == "string":
                    self._value_done()
        elif ch == '"':
            self._string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._value_done()

    def _value_done(self) -> None:
        self._state = "after_value"
        text = "".join(self._value)
        if self._current == "name":
            name = _decode_string(text[1:-1])
            if not name:
                raise _Failed
            self.name = name
        elif self._current in _ARGUMENT_KEYS and self._value_kind != "object":
            # Some models write the arguments as a JSON string holding the object, or null.
            if self._value_kind == "string":
                decoded = _decode_string(text[1:-1])
                try:
                    parsed = json.loads(decoded)
                except ValueError:
                    raise _Failed from None
                if not isinstance(parsed, dict):
                    raise _Failed
                self.arguments.append(decoded)
            elif text == "null":
                self.arguments.append("{}")
            else:
                raise _Failed

    def _end(self) -> None:
        if self.name is None:
            raise _Failed
        if not self.saw_arguments:
            self.arguments.append("{}")
        self._state = "complete"
        self.complete = True


def _decode_string(raw: str) -> str:
    try:
        value = json.loads(f'"{raw}"')
    except ValueError:
        raise _Failed from None
    assert isinstance(value, str)
    return value


class ToolCallParser:
    """Turns one answer's text into text and tool-call pieces, incrementally (see the module's
    docstring). Feed it the text as it comes, then ``close`` it once at the end. Not safe for
    concurrent use; one per answer."""

    def __init__(
        self,
        tag: tuple[str, str] | None,
        prefix: str,
        max_calls: int | None,
        max_held: int,
        new_id: Callable[[], str],
    ) -> None:
        """``tag``: the opening and closing tags around each call (None: the answer starts with
        its calls, after an optional ``prefix``); ``max_calls``: the answer ends after that many
        calls."""
        self._open, self._close = tag if tag is not None else ("", "")
        self._prefix = prefix
        self._max_calls = max_calls
        self._max_held = max_held
        self._new_id = new_id
        self._state = "text" if tag is not None else "start"
        self._held = ""  # text that may be the start of a tag (or, at the start, of a call)
        self._spaces = ""  # whitespace after a call, shown only if more text follows
        self._raw: list[str] = []  # the current call's text until its first piece goes out
        self._raw_size = 0
        self._scanner: _CallScanner | None = None
        self._announced = False
        self._text: list[str] = []
        self._pieces: list[ToolCallDelta] = []
        self.calls = 0  # calls whose first piece went out
        self.done = False  # the answer has had all the calls it may have

    @property
    def resumable(self) -> bool:
        """Whether everything fed so far went out as text (no call begun, nothing held back):
        then a continuation of the answer from that text may be fed to this parser."""
        return (
            not self.calls
            and not self.done
            and not self._held
            and not self._spaces
            and not self._raw
            and self._state in ("text", "start", "plain")
        )

    def feed(self, text: str) -> Parsed:
        """The text and call pieces that ``text`` (the next piece of the answer) completes."""
        if not self.done:
            self._run(text)
        return self._take()

    def close(self) -> Parsed:
        """The end of the answer: what was held back goes out (as text, when it did not turn
        out to be a call)."""
        if not self.done:
            if self._state in ("text", "start"):
                self._show(self._held)
            elif self._state == "call" and not self._announced:
                self._show(self._open + "".join(self._raw))
            self._held = ""
            self._flush_arguments()
            self.done = True
        return self._take()

    def _take(self) -> Parsed:
        text, pieces = "".join(self._text), tuple(self._pieces)
        self._text, self._pieces = [], []
        return Parsed(text, pieces)

    def _show(self, text: str) -> None:
        """Text of the answer. After a call, whitespace waits for something to follow it."""
        if not text:
            return
        if self.calls and not text.strip(_WHITESPACE):
            self._spaces += text
            return
        self._text.append(self._spaces + text)
        self._spaces = ""

    def _run(self, text: str) -> None:
        i = 0
        while i < len(text) and not self.done:
            state = self._state
            if state == "text":
                i = self._scan_text(text, i)
            elif state == "start":
                i = self._scan_start(text, i)
            elif state == "call":
                i = self._scan_call(text, i)
            elif state == "closing":
                i = self._scan_closing(text, i)
            elif state == "skipping":
                i = self._scan_skipping(text, i)
            elif state == "between":
                i = self._scan_between(text, i)
            else:  # "plain": the answer is text from here on
                self._show(self._held + text[i:])
                self._held, i = "", len(text)

    def _scan_text(self, text: str, i: int) -> int:
        """Text until an opening tag; a possible partial tag at the end is held."""
        buffer = self._held + text[i:]
        self._held = ""
        found = buffer.find(self._open)
        if found >= 0:
            self._show(buffer[:found])
            self._begin_call()
            # Continue after the tag, in ``text``'s own positions.
            return len(text) - (len(buffer) - found - len(self._open))
        keep = _partial_suffix(buffer, self._open)
        self._show(buffer[: len(buffer) - keep])
        self._held = buffer[len(buffer) - keep :]
        return len(text)

    def _scan_start(self, text: str, i: int) -> int:
        """The answer's (or, after ';', the next call's) first characters: a call starts with
        ``{`` (after whitespace and the optional prefix); anything else makes it text."""
        while i < len(text):
            held = self._held + text[i]
            body = held.lstrip(_WHITESPACE)
            prefix = self._prefix
            if prefix and body.startswith(prefix):
                body = body[len(prefix) :].lstrip(_WHITESPACE)
            elif prefix and prefix.startswith(body):
                body = ""  # the prefix may be coming
            if body == "{":
                self._held = ""
                self._begin_call(lead=held[:-1])
                return i  # the brace is the call's
            if body or len(held) > self._max_held:
                self._state = "plain"
                return i  # shown, with what was held, as text
            self._held = held
            i += 1
        return i

    def _begin_call(self, lead: str = "") -> None:
        """``lead``: what came before the call's text and goes out as text if it is none."""
        self._state = "call"
        self._scanner = _CallScanner(self._max_held)
        self._announced = False
        self._raw, self._raw_size = [lead], len(lead)
        self._spaces = ""  # whitespace between calls is no text

    def _scan_call(self, text: str, i: int) -> int:
        scanner = self._scanner
        assert scanner is not None
        start = i
        try:
            while i < len(text) and not scanner.complete:
                scanner.feed(text[i])
                i += 1
                if not self._announced and scanner.name is not None:
                    self._announce()  # the moment the name is known, whatever follows
                    start = i
        except _Failed:
            # The offending character is read again as text (it may open the next call).
            self._keep_raw(text[start:i])
            return self._failed(i)
        self._keep_raw(text[start:i])
        self._announce()
        if not self._announced and self._raw_size > self._max_held:
            return self._failed(i)  # no name within the bound: not a call
        if scanner.complete:
            self._finish_call()
        return i

    def _keep_raw(self, piece: str) -> None:
        if not self._announced:
            self._raw.append(piece)
            self._raw_size += len(piece)

    def _failed(self, i: int) -> int:
        """The current call is malformed at ``i``: its text is text again if none of it went
        out, else the call ends where it is."""
        if not self._announced:
            self._state = "text" if self._open else "plain"
            self._show(self._open + "".join(self._raw))
        else:
            self._flush_arguments()
            self._end_call()
            self._state = "skipping" if self._open else "plain"
        self._raw, self._raw_size = [], 0
        return i

    def _announce(self) -> None:
        """Send the call's first piece once its name is known; then its arguments as they come."""
        scanner = self._scanner
        assert scanner is not None
        if not self._announced and scanner.name is not None:
            self._announced = True
            self._raw, self._raw_size = [], 0
            self._pieces.append(
                ToolCallDelta(self.calls, self._new_id(), scanner.name, "".join(scanner.arguments))
            )
            scanner.arguments.clear()
            self.calls += 1
        elif self._announced:
            self._flush_arguments()

    def _flush_arguments(self) -> None:
        scanner = self._scanner
        if self._announced and scanner is not None and scanner.arguments:
            piece = "".join(scanner.arguments)
            scanner.arguments.clear()
            last = self._pieces[-1] if self._pieces else None
            if last is not None and last.index == self.calls - 1:
                # Merge into this feed's piece of the same call: fewer, larger pieces.
                self._pieces[-1] = ToolCallDelta(
                    last.index, last.id, last.name, last.arguments + piece
                )
            else:
                self._pieces.append(ToolCallDelta(self.calls - 1, arguments=piece))

    def _finish_call(self) -> None:
        self._flush_arguments()
        self._end_call()
        if self._open:
            self._state = "closing"
        else:
            self._state = "between"

    def _end_call(self) -> None:
        self._scanner = None
        self._announced = False
        if self._max_calls is not None and self.calls >= self._max_calls:
            self.done = True

    def _scan_closing(self, text: str, i: int) -> int:
        """After a call: whitespace and its closing tag. Anything else is text again (it may
        open the next call: some models leave the closing tag out)."""
        while i < len(text):
            held = self._held + text[i]
            rest = held.lstrip(_WHITESPACE)
            if not rest or self._close.startswith(rest):
                self._held = held
                if rest == self._close:
                    self._held, self._state = "", "text"
                    return i + 1
            else:
                self._held, self._state = held, "text"
                return i + 1
            i += 1
        return i

    def _scan_skipping(self, text: str, i: int) -> int:
        """After a malformed call whose first piece went out: drop everything up to and with
        the closing tag (holding only what may be its start)."""
        buffer = self._held + text[i:]
        found = buffer.find(self._close)
        if found >= 0:
            self._held, self._state = "", "text"
            return len(text) - (len(buffer) - found - len(self._close))
        keep = _partial_suffix(buffer, self._close)
        self._held = buffer[len(buffer) - keep :]
        return len(text)

    def _scan_between(self, text: str, i: int) -> int:
        """After an untagged call: ``;`` and the next call, or the end; anything else is text."""
        while i < len(text):
            ch = text[i]
            if ch in _WHITESPACE:
                self._held += ch
            elif ch == ";":
                self._held, self._state = "", "start"
                return i + 1
            else:
                self._held, self._state = "", "plain"
                return i
            i += 1
        return i


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (and is shorter)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
