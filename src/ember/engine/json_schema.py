"""JSON Schema as the grammar compilers read it.

`close_objects` gives every object that lists its `properties` and says nothing of extra keys
`additionalProperties: false`. JSON Schema itself allows extra keys there; vLLM's default
backend (xgrammar's strict mode) and llama.cpp's schema converter do not, and a client that
calls `f(**arguments)` needs exactly the keys it declared. A schema that sets
`additionalProperties` (or `patternProperties`, `unevaluatedProperties`) keeps its choice.
"""

from __future__ import annotations

from typing import Any

# Keys whose value is a subschema or a list of them, and keys whose value maps names to them.
_SUB = ("items", "prefixItems", "additionalProperties", "contains", "not", "if", "then", "else")
_SUB += ("anyOf", "oneOf", "allOf")  # allOf here has one member (pydantic annotates $refs so)
_MAP = ("properties", "$defs", "definitions", "dependentSchemas")
_OPEN = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` whose objects with listed properties admit no other keys.

    A schema that intersects objects (an `allOf` of several members, or listed properties beside
    a `$ref`, `anyOf` or `oneOf`) is returned as it is: each part closed on its own would refuse
    the keys the others add.
    """
    if _has_intersection(schema):
        return schema
    return _close(schema)


def _close(node: Any) -> Any:
    if isinstance(node, list):
        return [_close(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _SUB:
        if isinstance(out.get(key), dict | list):
            out[key] = _close(out[key])
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {k: _close(v) for k, v in out[key].items()}
    if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN):
        out["additionalProperties"] = False
    return out


def _has_intersection(node: Any) -> bool:
    if isinstance(node, list):
        return any(_has_intersection(n) for n in node)
    if not isinstance(node, dict):
        return False
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        return True
    if "properties" in node and any(k in node for k in ("$ref", "anyOf", "oneOf", "allOf")):
        return True
    return any(_has_intersection(v) for v in node.values() if isinstance(v, dict | list))
