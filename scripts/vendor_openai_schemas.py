"""Copy the OpenAI response schemas the tests validate against into tests/schemas/.

    python scripts/vendor_openai_schemas.py [path/to/openai-openapi.json]

Takes the named component schemas and everything they reference from the official OpenAI API
description (default: ../shared/specs/openai-openapi.json), rewrites OpenAPI 3.0-style
``nullable: true`` as JSON Schema ``anyOf [..., null]`` (3.1 validators ignore ``nullable``), and
writes tests/schemas/openai-schemas.json with the upstream licence beside it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WANTED = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateEmbeddingResponse",
)
PREFIX = "#/components/schemas/"


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"][len(PREFIX) :]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*map(_refs, node)) if node else set()
    return set()


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False) is True:
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


def main() -> int:
    spec_path = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared/specs/openai-openapi.json"
    )
    schemas = json.loads(spec_path.read_text())["components"]["schemas"]
    todo, done = list(WANTED), {}
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done[name] = _nullable(schemas[name])
        todo.extend(_refs(schemas[name]) - done.keys())
    out = {
        "$comment": f"Vendored from the official OpenAI API description ({spec_path.name}), MIT"
        " licence in openai-openapi.LICENSE; regenerate with scripts/vendor_openai_schemas.py.",
        "components": {"schemas": dict(sorted(done.items()))},
    }
    target = ROOT / "tests/schemas"
    (target / "openai-schemas.json").write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    shutil.copyfile(
        spec_path.with_name("openai-openapi.LICENSE"), target / "openai-openapi.LICENSE"
    )
    print(f"wrote {len(done)} schemas to tests/schemas/openai-schemas.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
