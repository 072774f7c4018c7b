"""JSON Schemas that callers send (tool parameters, response formats), checked before use.

A schema goes to the model as a decoding constraint, so a bad one must be refused before any
model time is spent: it must be JSON, an object, valid against the JSON Schema (2020-12)
meta-schema, and refer only to its own definitions (``$ref`` starting with ``#``): a grammar
compiler must never be asked to fetch a URL. Each refusal is an ``InvalidRequest`` naming the
field.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from tokenrelay.errors import InvalidRequest

__all__ = ["parse_schema"]


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
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(
            f"'{param}' is not a valid JSON Schema: {exc.message[:200]}", param
        ) from None
    except RecursionError:
        raise InvalidRequest(f"'{param}' nests too deeply.", param) from None
    outside = [ref for ref in _refs(schema) if not ref.startswith("#")]
    if outside:
        raise InvalidRequest(
            f"'{param}' may refer only to its own definitions ('$ref' starting with '#');"
            f" found {outside[0][:100]!r}.",
            param,
        )
    return schema
