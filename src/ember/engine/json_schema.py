"""JSON Schema as the grammar compilers read it.

`close_objects` gives every object that lists its `properties` and says nothing of extra keys
`additionalProperties: false`. JSON Schema itself allows extra keys there; vLLM's default
backend (xgrammar's strict mode) and llama.cpp's schema converter do not, and a client that
calls `f(**arguments)` needs exactly the keys it declared. A schema that sets
`additionalProperties` (or `patternProperties`, `unevaluatedProperties`) keeps its choice;
`unevaluatedProperties: false` outside an intersection and `propertyNames` are rewritten as
keywords the compiler enforces (`unenforced_keywords` names those it would skip).
"""

from __future__ import annotations

import json
import re
from typing import Any

# Keys whose value is a subschema or a list of them, and keys whose value maps names to them.
_SUB = ("items", "prefixItems", "additionalProperties", "contains", "not", "if", "then", "else")
_SUB += ("anyOf", "oneOf", "allOf")  # allOf here has one member (pydantic annotates $refs so)
_MAP = ("properties", "$defs", "definitions", "dependentSchemas")
_OPEN = ("additionalProperties", "patternProperties", "unevaluatedProperties")

# JSON written as `json.dumps` writes it: a separator with one space, no free whitespace. Small
# models given free whitespace tend to write runs of newlines instead of the next key. Lenient:
# keywords the compiler does not implement (uniqueItems, which pydantic writes for a set; not;
# if/then) are not enforced rather than refused, as vLLM's backends treat them.
COMPACT_JSON = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": True,
}


def close_objects(schema: Any) -> Any:
    """A copy of `schema` whose objects with listed properties admit no other keys.

    An intersection of objects (an `allOf` of several members, or listed properties beside a
    `$ref`, `anyOf` or `oneOf`) is left as it is, and so is each definition it refers to: each
    part closed on its own would refuse the keys the others add. The rest is closed.
    """
    open_defs = _intersected_defs(schema)
    if open_defs is None:  # an intersection refers to the root or past a definition
        return schema
    return _close(schema, open_defs, schema)


# Keywords through which other subschemas evaluate an object's keys too.
_APPLICATORS = ("$ref", "anyOf", "oneOf", "allOf", "if", "then", "else", "dependentSchemas")


def _close(node: Any, open_defs: set[str], root: Any) -> Any:
    if isinstance(node, list):
        return [_close(n, open_defs, root) for n in node]
    if not isinstance(node, dict) or _is_intersection(node):
        return node
    out = dict(node)
    for key in _SUB:
        if isinstance(out.get(key), dict | list):
            out[key] = _close(out[key], open_defs, root)
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {
                k: v if f"#/{key}/{k}" in open_defs else _close(v, open_defs, root)
                for k, v in out[key].items()
            }
    _lower_property_names(out, root)
    if (
        out.get("unevaluatedProperties") is False
        and not any(k in out for k in _OPEN[:2])
        and not any(k in out for k in _APPLICATORS)
    ):
        # No other subschema evaluates a key here: only `properties` do, or nothing.
        out["additionalProperties"] = False
    if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN):
        out["additionalProperties"] = False
    return out


def _lower_property_names(node: dict[str, Any], root: Any) -> None:
    """`propertyNames` (which pydantic writes for a `dict` keyed by a Literal, an Enum or a
    pattern) as keywords the grammar compiler enforces: the names as optional `properties`, or
    the pattern as `patternProperties`, of the extra keys' schema. Other forms stay as they
    are (accepted and not enforced, as before)."""
    names = node.get("propertyNames")
    if isinstance(names, dict) and isinstance(names.get("$ref"), str) and len(names) == 1:
        names = _resolve(root, names["$ref"])  # an Enum's definition
    if not isinstance(names, dict) or "patternProperties" in node:
        return
    rule = {k: v for k, v in names.items() if k not in ("type", "title", "description")}
    if names.get("type", "string") not in ("string", "integer") or len(rule) != 1:
        return
    ((kind, value),) = rule.items()
    extra = node.get("additionalProperties", True)
    extra = extra if isinstance(extra, dict) else {} if extra is not False else None
    props = node.get("properties")
    props = props if isinstance(props, dict) else {}
    required = node.get("required")
    required = set(required) if isinstance(required, list) else set()
    if kind in ("enum", "const"):
        allowed = value if kind == "enum" else [value]
        if not isinstance(allowed, list) or not all(
            isinstance(n, str | int) and not isinstance(n, bool) for n in allowed
        ):
            return
        allowed = [str(n) for n in allowed]  # an IntEnum's keys are its values as text
        kept = {k: v for k, v in props.items() if k in allowed or k in required}
        if extra is not None:
            kept.update({n: extra for n in allowed if n not in kept})
        node["properties"] = kept
    elif kind == "pattern" and isinstance(value, str) and names.get("type", "string") == "string":
        try:
            pattern = re.compile(value)
        except re.error:
            return
        # patternProperties also applies to the listed keys it matches, which the extra keys'
        # schema did not: lower it only where that changes nothing.
        if extra and any(pattern.search(k) for k in props):
            return
        node["properties"] = {k: v for k, v in props.items() if pattern.search(k) or k in required}
        if extra is not None:
            node["patternProperties"] = {value: extra}
    else:
        return
    node["additionalProperties"] = False
    del node["propertyNames"]


# Keywords the grammar compiler does not implement that are accepted and not enforced, as
# vLLM's backends treat them: pydantic writes uniqueItems for a set and propertyNames for a dict
# keyed by a UUID or a constrained string (the forms not lowered above), and the others only
# narrow what a value may be. Any other unimplemented keyword (contains, dependentRequired...)
# is a 400 rather than a constraint silently dropped.
TOLERATED = frozenset(
    {"uniqueItems", "not", "if", "then", "else", "unevaluatedProperties", "propertyNames"}
)


def unenforced_keywords(warnings: list[str]) -> str | None:
    """Why a JSON Schema grammar would not hold the output to its schema, from the compiler's
    warnings on it (`validate_grammar_with_warnings`): the keywords it skips outside
    TOLERATED, or None."""
    skipped: set[str] = set()
    for warning in warnings:
        # 'Unimplemented keys: ["contains"]', with " (2 times)" after it when repeated.
        if found := re.match(r"Unimplemented keys: (\[.*?\])", warning):
            try:
                skipped.update(json.loads(found[1]))
            except ValueError:
                skipped.add(found[1])
    refused = sorted(skipped - TOLERATED)
    if not refused:
        return None
    return f"Ember cannot enforce the keyword(s) {', '.join(refused)}"


def _is_intersection(node: dict[str, Any]) -> bool:
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        return True
    return "properties" in node and any(k in node for k in ("$ref", "anyOf", "oneOf", "allOf"))


def _intersected_defs(schema: Any) -> set[str] | None:
    """The refs ("#/$defs/Name") of the definitions an intersection reaches, directly or
    through other definitions; None when one reaches something else (the root itself)."""
    found: set[str] = set()
    todo = [n for n in _walk(schema) if isinstance(n, dict) and _is_intersection(n)]
    while todo:
        for node in _walk(todo.pop()):
            ref = node.get("$ref") if isinstance(node, dict) else None
            if not isinstance(ref, str) or ref in found:
                continue
            parts = ref.split("/")
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
                return None
            target = schema.get(parts[1], {}).get(parts[2]) if isinstance(schema, dict) else None
            if not isinstance(target, dict):
                return None
            found.add(ref)
            todo.append(target)
    return found


def _walk(node: Any) -> list[Any]:
    """Every dict and list in `node`, itself included."""
    out, stack = [], [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            out.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return out


# JSON nesting (objects and arrays) a schema may have: the grammar compiler parses deeper
# documents into an error, and the walks here are recursive.
MAX_SCHEMA_NESTING = 100


def nested_too_deeply(node: Any, limit: int = MAX_SCHEMA_NESTING) -> bool:
    """Whether `node` nests objects and arrays more than `limit` levels (walked without
    recursion, so any depth a JSON parser lets through is safe to ask about)."""
    stack = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def schema_error(schema: Any) -> str | None:
    """Why no grammar can be built from this schema, checked alone (None: one can), so that a
    bad schema inside a combined grammar (tool calls, an answer format) is named by itself."""
    if problem := schema_problem(schema):
        return problem
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(close_objects(schema), COMPACT_JSON)
    except (ValueError, TypeError) as e:
        return str(e)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return "\n".join(messages).strip() if failed else unenforced_keywords(messages)


def schema_problem(schema: Any) -> str | None:
    """Why a grammar cannot be built from this schema before the compiler is asked (for a 400),
    or None: nested too deeply for the walks here and the compiler's parser, or a recursion no
    finite value ends."""
    if isinstance(schema, dict | list) and nested_too_deeply(schema):
        return f"nested more than {MAX_SCHEMA_NESTING} levels deep"
    if not has_finite_instance(schema):
        return (
            "no finite value matches it (a required property or item that nothing matches, or a "
            "$ref recursion with no way out: make the recursive property optional, or allow "
            "null or an empty array there)"
        )
    return None


def has_finite_instance(schema: Any) -> bool:
    """False when no finite JSON value can match `schema` because of its `$ref` recursion: an
    object that requires a key whose schema leads back to the object, with no way out (no
    optional branch, no `null`, no empty array). A grammar built from such a schema accepts
    no complete output, so the request is refused rather than run.

    Unsatisfiable schemas without recursion (minLength above maxLength, an empty enum) are the
    grammar compiler's to report. Where unsure (a `$ref` this cannot resolve, keywords it does
    not read), the answer is True.
    """
    refs: dict[str, bool] = {}
    _collect_refs(schema, refs)
    # The least fixed point: every `$ref` starts unsatisfiable and turns satisfiable once its
    # target is, given what is known so far. A reference is looked at again only when one its
    # target reads turns satisfiable, so a long chain of definitions costs its length once.
    readers: dict[str, set[str]] = {ref: set() for ref in refs}
    todo = list(refs)
    try:
        while todo:
            ref = todo.pop()
            if refs[ref]:
                continue
            read: set[str] = set()
            if _satisfiable(_resolve(schema, ref), refs, read):
                refs[ref] = True
                todo.extend(readers[ref])
            else:
                for other in read:
                    readers[other].add(ref)
        return _satisfiable(schema, refs, set())
    except RecursionError:
        return True


def _collect_refs(node: Any, refs: dict[str, bool]) -> None:
    if isinstance(node, list):
        for n in node:
            _collect_refs(n, refs)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            refs.setdefault(ref, False)
        for v in node.values():
            if isinstance(v, dict | list):
                _collect_refs(v, refs)


_UNRESOLVED = object()


def _resolve(root: Any, ref: str) -> Any:
    """The node a local reference ("#", "#/$defs/x") names, or _UNRESOLVED."""
    if ref != "#" and not ref.startswith("#/"):  # another document, or an $anchor
        return _UNRESOLVED
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _UNRESOLVED
    return node


def _satisfiable(node: Any, refs: dict[str, bool], read: set[str]) -> bool:
    """Whether a finite value matches `node`, taking each `$ref` as `refs` says (each one
    consulted is added to `read`)."""
    if node is _UNRESOLVED or node is True or not isinstance(node, dict | bool):
        return True
    if node is False:
        return False
    ref = node.get("$ref")
    if isinstance(ref, str):
        read.add(ref)
        if not refs.get(ref, True):
            return False
    all_of = node.get("allOf")
    if isinstance(all_of, list) and not all(_satisfiable(n, refs, read) for n in all_of):
        return False
    for key in ("anyOf", "oneOf"):
        members = node.get(key)
        if (
            isinstance(members, list)
            and members
            and not any(_satisfiable(n, refs, read) for n in members)
        ):
            return False
    if "enum" in node or "const" in node:
        return True
    types = node.get("type")
    if types is None:
        return True  # a string, number or null matches whatever the object keywords say
    types = types if isinstance(types, list) else [types]
    return any(_type_satisfiable(t, node, refs, read) for t in types)


def _type_satisfiable(
    kind: Any, node: dict[str, Any], refs: dict[str, bool], read: set[str]
) -> bool:
    if kind == "object":
        props = node.get("properties")
        props = props if isinstance(props, dict) else {}
        required = node.get("required")
        for key in required if isinstance(required, list) else []:
            if key in props:
                sub = props[key]
            elif "patternProperties" in node:
                continue  # which pattern names it is not worth deciding here
            else:
                sub = node.get("additionalProperties", True)
            if not _satisfiable(sub, refs, read):
                return False
        return True
    if kind == "array":
        min_items = node.get("minItems", 0)
        if not isinstance(min_items, int) or min_items <= 0:
            return True
        prefix = node.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = node.get("items", True)
        needed = prefix[:min_items]
        if len(prefix) < min_items:
            needed.append(items if isinstance(items, dict | bool) else True)
        return all(_satisfiable(n, refs, read) for n in needed)
    return True
