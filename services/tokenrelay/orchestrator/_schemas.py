"""JSON Schemas that callers send (tool parameters, response formats), checked before use.

A schema goes to the model as a decoding constraint, so a bad one must be refused before any
model time is spent: it must be JSON, an object, valid against the JSON Schema (2020-12)
meta-schema, and refer only to its own definitions (``$ref`` starting with ``#``): a grammar
compiler must never be asked to fetch a URL. Each refusal is an ``InvalidRequest`` naming the
field.

The meta-schema check is the costly part (about 1 ms for a small schema, a second for 250 KB),
so its verdicts are remembered by the schema's digest (agents send the same tools every turn),
and ``precheck`` lets the orchestrator run the checks of a new request on a worker thread before
it plans it on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from tokenrelay.errors import InvalidRequest

__all__ = ["MAX_ITEMS", "MAX_LENGTH", "bounded", "parse_schema", "precheck"]

# What a constraint allows where its schema sets no bound: a small model that starts repeating
# itself (the same array item, the same words in a string) must still close the JSON well within
# a default max_tokens, rather than be cut off mid-object.
MAX_ITEMS = 8
MAX_LENGTH = 128
# Integers with no bound get ±(10^15 - 1): an engine's grammar may let a small model write digits
# until max_tokens runs out (vLLM's xgrammar honours minimum/maximum; llama.cpp's grammar already
# stops at 16 digits).
MAX_INTEGER = 10**15 - 1
_DATA = frozenset({"enum", "const", "default", "examples", "required"})  # values, not schemas

_REMEMBERED = 1024  # verdicts kept (16-byte digests, so a few dozen KiB)
_verdicts: OrderedDict[bytes, str] = OrderedDict()  # digest → "" (valid) or what is wrong
_lock = threading.Lock()  # precheck runs on worker threads


def _meta_check(text: str, schema: dict[str, Any]) -> str:
    """What is wrong with ``schema`` by the 2020-12 meta-schema ("" if nothing), remembered."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    with _lock:
        verdict = _verdicts.get(digest)
        if verdict is not None:
            _verdicts.move_to_end(digest)
            return verdict
    try:
        Draft202012Validator.check_schema(schema)
        verdict = ""
    except SchemaError as exc:
        verdict = f"is not a valid JSON Schema: {exc.message[:200]}"
    except RecursionError:
        verdict = "nests too deeply"
    with _lock:
        _verdicts[digest] = verdict
        while len(_verdicts) > _REMEMBERED:
            _verdicts.popitem(last=False)
    return verdict


def _refs(node: Any) -> list[str]:
    """Every ``$ref`` value in ``node`` (iteratively: a schema may nest deeply)."""
    found, todo = [], [node]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if ref is not None:
                found.append(ref if isinstance(ref, str) else repr(ref))
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


def parse_schema(text: str, param: str, max_chars: int, *, object_only: bool) -> dict[str, Any]:
    """The schema in ``text``; raises ``InvalidRequest`` naming ``param`` when it is too long,
    not JSON, not a valid schema, not an object schema (``object_only``) or refers outside
    itself."""
    if len(text) > max_chars:
        raise InvalidRequest(f"'{param}' may have at most {max_chars} characters.", param)
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest(f"'{param}' is not valid JSON.", param) from None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON Schema object.", param)
    if object_only and schema.get("type", "object") != "object":
        raise InvalidRequest(f"'{param}' must describe an object (type 'object').", param)
    verdict = _meta_check(text, schema)
    if verdict:
        raise InvalidRequest(f"'{param}' {verdict}.", param)
    outside = [ref for ref in _refs(schema) if not ref.startswith("#")]
    if outside:
        raise InvalidRequest(
            f"'{param}' may refer only to its own definitions ('$ref' starting with '#');"
            f" found {outside[0][:100]!r}.",
            param,
        )
    return schema


def precheck(texts: Iterable[str], max_chars: int) -> None:
    """Check ``texts`` (schemas as JSON text) so that ``parse_schema`` finds their verdicts
    remembered. Never raises: refusals are ``parse_schema``'s, with the field's name."""
    for text in texts:
        if not text or len(text) > max_chars:
            continue
        try:
            schema = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(schema, dict):
            _meta_check(text, schema)


def bounded(schema: Any) -> Any:
    """A copy of ``schema`` whose arrays, free strings and integers have bounds: ``maxItems``
    (``MAX_ITEMS``, or ``minItems`` if more) where an array has none, ``maxLength``
    (``MAX_LENGTH``, or ``minLength`` if more) where a string has none and no ``enum``,
    ``const``, ``format`` or ``pattern``, ``minimum``/``maximum`` (±``MAX_INTEGER``, moved out
    to the other bound where that lies beyond) where an integer has neither bound on that side
    and no ``enum`` or ``const``. Every instance of the copy is an instance of ``schema``."""
    if isinstance(schema, list):
        return [bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA else bounded(v)) for k, v in schema.items()}
    kinds = out.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if "array" in kinds and "maxItems" not in out:
        low = out.get("minItems")
        out["maxItems"] = max(MAX_ITEMS, low if isinstance(low, int) else 0)
    free = not any(key in out for key in ("enum", "const", "format", "pattern"))
    if "string" in kinds and "maxLength" not in out and free:
        low = out.get("minLength")
        out["maxLength"] = max(MAX_LENGTH, low if isinstance(low, int) else 0)
    if "integer" in kinds and not any(key in out for key in ("enum", "const")):
        low, high = _integer_bounds(out)
        if high is None:
            out["maximum"] = max(MAX_INTEGER, low if low is not None else 0)
        if low is None:
            out["minimum"] = min(-MAX_INTEGER, high if high is not None else 0)
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The least and greatest integer the schema's bounds allow (None: unbounded that side)."""
    low, high = None, None
    if (value := _number(schema.get("minimum"))) is not None:
        low = math.ceil(value)
    if (value := _number(schema.get("exclusiveMinimum"))) is not None:
        low = math.floor(value) + 1 if low is None else max(low, math.floor(value) + 1)
    if (value := _number(schema.get("maximum"))) is not None:
        high = math.floor(value)
    if (value := _number(schema.get("exclusiveMaximum"))) is not None:
        high = math.ceil(value) - 1 if high is None else min(high, math.ceil(value) - 1)
    return low, high
