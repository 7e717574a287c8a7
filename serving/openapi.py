"""The service's OpenAPI document (/docs.json) made valid OpenAPI 3.0, so that client generators and
validators accept the whole API.

BentoML writes two things that OpenAPI 3.0 does not allow:
  - a NumPy array argument (/logits `images`) as `{"type": "tensor", "dtype": ..., "format": "numpy-array"}`:
    here a nested JSON array of numbers, as the route actually takes it (N x 1 x R x R floats);
  - an optional field as `anyOf: [X, {"type": "null"}]` (JSON Schema 2020-12): here X with `nullable: true`.
Keywords OpenAPI 3.0 does not know become `x-` extensions.
"""

from __future__ import annotations

import json
from typing import Any

# The array route's input: images, channel, height, width.
TENSOR_DIMENSIONS = 4
OPENAPI_30_SCHEMA_KEYWORDS = frozenset(
    {
        "title", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength",
        "pattern", "maxItems", "minItems", "uniqueItems", "maxProperties", "minProperties", "required", "enum", "type",
        "allOf", "oneOf", "anyOf", "not", "items", "properties", "additionalProperties", "description", "format",
        "default", "nullable", "discriminator", "readOnly", "writeOnly", "xml", "externalDocs", "example", "deprecated", "$ref",
    }
)  # fmt: skip


def _tensor_schema(schema: dict) -> dict:
    dtype = schema.get("dtype", "float32")
    element: dict[str, Any] = {"type": "number", "format": "float" if "float32" in str(dtype) else "double"}
    if "int" in str(dtype):
        element = {"type": "integer"}
    nested = element
    for _ in range(TENSOR_DIMENSIONS):
        nested = {"type": "array", "items": nested}
    description = schema.get("description") or "a nested JSON array, images x 1 x R x R (R: `resolution` from POST /model)"
    return {**nested, "title": schema.get("title", "array"), "description": f"{description}; {dtype}"}


def _fix_schema(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_fix_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "tensor":
        return _tensor_schema(schema)
    fixed: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties") and isinstance(value, dict):
            fixed[key] = {name: _fix_schema(sub) for name, sub in value.items()}
        elif key in OPENAPI_30_SCHEMA_KEYWORDS or key.startswith("x-"):
            fixed[key] = _fix_schema(value)
        else:
            fixed[f"x-{key}"] = value
    for combiner in ("anyOf", "oneOf"):
        members = fixed.get(combiner)
        if isinstance(members, list) and any(m == {"type": "null"} for m in members):
            rest = [m for m in members if m != {"type": "null"}]
            del fixed[combiner]
            fixed["nullable"] = True
            if len(rest) == 1 and "$ref" not in rest[0]:
                fixed = {**rest[0], **fixed}
            else:
                fixed[combiner] = rest
    return fixed


def _walk(node: Any) -> Any:
    """Fix every `schema` object of the document and every entry of components.schemas."""
    if isinstance(node, list):
        return [_walk(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "schema":
            out[key] = _fix_schema(value)
        elif key == "schemas" and isinstance(value, dict):
            out[key] = {name: _fix_schema(s) for name, s in value.items()}
        else:
            out[key] = _walk(value)
    return out


def valid_openapi(document: dict) -> dict:
    """BentoML's document (as served: JSON keys) -> the same API in valid OpenAPI 3.0."""
    return _walk(json.loads(json.dumps(document)))
