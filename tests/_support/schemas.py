"""Validation against the official OpenAI schemas (vendored in ``tests/schemas/``)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO = Path(__file__).resolve().parent.parent.parent
SCHEMAS = REPO / "tests" / "schemas" / "openai-schemas.json"


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
