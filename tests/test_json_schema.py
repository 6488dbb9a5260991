"""Objects with listed properties admit no other keys, as vLLM's and llama.cpp's grammars do."""

from __future__ import annotations

import copy
import enum
import json
import uuid
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from ember.engine.json_schema import close_objects, has_finite_instance, nested_too_deeply
from ember.engine.structured import GrammarBackend, StructuredOutputsError, StructuredOutputsParams
from test_structured import _allowed


def test_objects_with_properties_are_closed_at_every_depth():
    schema = {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"name": {"type": "string"}}},
            "tags": {"type": "array", "items": {"properties": {"k": {"type": "string"}}}},
            "either": {"anyOf": [{"$ref": "#/$defs/Point"}, {"type": "null"}]},
            "pair": {"prefixItems": [{"properties": {"x": {}}}]},
        },
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    before = copy.deepcopy(schema)
    out = close_objects(schema)
    assert schema == before  # the caller's schema is not changed
    assert out["additionalProperties"] is False
    props = out["properties"]
    assert props["user"]["additionalProperties"] is False
    assert props["tags"]["items"]["additionalProperties"] is False
    assert props["pair"]["prefixItems"][0]["additionalProperties"] is False
    assert out["$defs"]["Point"]["additionalProperties"] is False
    assert props["either"]["anyOf"][1] == {"type": "null"}


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object"},  # no listed properties: any object, as json_object mode
        {"properties": {"a": {}}, "additionalProperties": True},
        {"properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
        {"properties": {"a": {}}, "patternProperties": {"^x": {}}},
        {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
        {"$ref": "#/$defs/A", "properties": {"b": {}}, "$defs": {"A": {"properties": {}}}},
        {"type": "string", "enum": ["properties"]},
    ],
)
def test_a_schema_that_says_what_extra_keys_may_do_keeps_it(schema):
    assert close_objects(schema) == schema


def test_an_intersection_leaves_only_itself_and_what_it_refers_to_open():
    """One allOf once left every object in the schema open to extra keys."""
    schema = {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"name": {"type": "string"}}},
            "meta": {"allOf": [{"$ref": "#/$defs/Id"}, {"required": ["id"]}]},
            "point": {"$ref": "#/$defs/Point"},
        },
        "$defs": {
            "Id": {"properties": {"id": {"type": "integer"}}, "allOf": [{"$ref": "#/$defs/Base"}]},
            "Base": {"properties": {"kind": {}}},
            "Point": {"properties": {"x": {}}},
        },
    }
    out = close_objects(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["user"]["additionalProperties"] is False
    assert out["$defs"]["Point"]["additionalProperties"] is False
    assert out["properties"]["meta"] == schema["properties"]["meta"]
    assert out["$defs"]["Id"] == schema["$defs"]["Id"]  # reached from the allOf
    assert out["$defs"]["Base"] == schema["$defs"]["Base"]  # and through Id
    # An intersection that refers to the root keeps the whole schema as it is.
    recursive = {"properties": {"a": {"allOf": [{"$ref": "#"}, {"required": ["a"]}]}}}
    assert close_objects(recursive) == recursive


def test_a_single_member_allof_is_closed():
    """pydantic writes a described $ref as an allOf of one member."""
    out = close_objects({"allOf": [{"properties": {"a": {}}}], "description": "d"})
    assert out["allOf"][0]["additionalProperties"] is False


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 5}}}


def _after(spec: StructuredOutputsParams, text: bytes) -> set[int]:
    backend = GrammarBackend("byte", 262)
    m = backend.matcher(spec)
    for b in text:
        assert m.accept(b), text
    return _allowed(backend.fill_bitmasks([m], [[]]), 0, 262)


def test_response_format_schema_allows_no_undeclared_key():
    # Without closing, "," (another key) would be allowed after the last declared property.
    assert _after(StructuredOutputsParams(json=SCHEMA), b'{"a": 5') == {ord("}")}
    assert _after(StructuredOutputsParams(json=json.dumps(SCHEMA)), b'{"a": 5') == {ord("}")}
    open_schema = {**SCHEMA, "additionalProperties": True}
    assert ord(",") in _after(StructuredOutputsParams(json=open_schema), b'{"a": 5')


@pytest.mark.parametrize(
    "fmt, text, end",
    [
        ("hermes", b'{"a": 5', b"}"),
        ("llama3_json", b'{"a": 5', b"}"),
        ("chatglm3", b"```python\ntool_call(a=5", b")"),  # keyword arguments: already closed
    ],
)
def test_forced_call_arguments_allow_no_undeclared_key(fmt, text, end):
    from ember.chat.tool_parsers import PARSERS

    tools = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]
    grammar = PARSERS[fmt].call_grammar(tools, "f")
    assert _after(StructuredOutputsParams(grammar=grammar), text) == set(end)


class Tree(BaseModel):
    value: int
    children: list[Tree]


class Node(BaseModel):
    name: str
    next: Node | None


class Expr(BaseModel):
    op: Literal["+", "*"]
    args: list[Expr | int] = Field(min_length=2)


LOOP = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


@pytest.mark.parametrize(
    "schema",
    [
        Tree.model_json_schema(),  # children may be []
        Node.model_json_schema(),  # next may be null
        Expr.model_json_schema(),  # an argument may be an int
        {"type": "object", "properties": {"a": {"$ref": "#"}}},  # "a" is optional
        {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # no type: "x" matches
        {"type": ["object", "null"], "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
        {"anyOf": [LOOP, {"type": "string"}]},
        {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"},
        {"$defs": {"a/b": {"type": "integer"}}, "type": "object", "required": ["x"]}
        | {"properties": {"x": {"$ref": "#/$defs/a~1b"}}},
    ],
    ids=[
        "tree",
        "linked-list",
        "expr",
        "optional",
        "untyped",
        "nullable",
        "anyof",
        "empty",
        "escaped-ref",
    ],
)
def test_a_recursive_schema_with_a_way_out_has_a_finite_instance(schema):
    assert has_finite_instance(schema)
    backend = GrammarBackend("byte", 262)
    backend.compile(StructuredOutputsParams(json=schema))  # and compiles


def test_a_reference_this_cannot_resolve_is_left_to_the_grammar_compiler():
    assert has_finite_instance({"$ref": "https://example.com/elsewhere.json"})
    assert has_finite_instance({"$ref": "#/$defs/missing"})
    anchored = {"$defs": {"a": {"$anchor": "a", "type": "integer"}}, **LOOP}
    assert has_finite_instance({**anchored, "properties": {"a": {"$ref": "#a"}}})


@pytest.mark.parametrize(
    "schema",
    [
        LOOP,
        {
            "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}},
            "$ref": "#/$defs/n",
        },
        # Two definitions that need each other.
        {
            "$defs": {
                "A": {
                    "type": "object",
                    "properties": {"b": {"$ref": "#/$defs/B"}},
                    "required": ["b"],
                },
                "B": {"type": "array", "prefixItems": [{"$ref": "#/$defs/A"}], "minItems": 1},
            },
            "$ref": "#/$defs/A",
        },
        {"type": "object", "properties": {"a": {"anyOf": [LOOP, LOOP]}}, "required": ["a"]}
        | {"$defs": {}},
        {"allOf": [{"type": "object"}, LOOP]},
        {"type": "object", "required": ["x"], "additionalProperties": {"$ref": "#"}},
    ],
    ids=["self", "array", "mutual", "anyof-of-loops", "allof", "additional"],
)
def test_a_recursion_with_no_way_out_is_refused_before_it_runs(schema):
    assert not has_finite_instance(schema)
    backend = GrammarBackend("byte", 262)
    with pytest.raises(StructuredOutputsError, match="no finite value"):
        backend.compile(StructuredOutputsParams(json=schema, param="response_format"))


@pytest.mark.parametrize("way_out", [True, False])
def test_a_long_chain_of_definitions_is_decided_by_its_last_link(way_out):
    n = 2000  # each link looked at a bounded number of times, whatever the order
    defs = {
        f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}}
        | {"required": ["x"]}
        for i in range(n)
    }
    defs[f"d{n}"] = {"type": "integer"} if way_out else {"$ref": "#/$defs/d0"}
    for order in (defs, dict(reversed(defs.items()))):
        assert has_finite_instance({"$defs": order, "$ref": "#/$defs/d0"}) is way_out


def test_nesting_is_measured_without_recursion_at_any_depth():
    node: list = []
    for _ in range(100_000):  # far past Python's recursion limit
        node = [node]
    assert nested_too_deeply(node)
    assert not nested_too_deeply({"a": [{"b": 1}]}, limit=3)  # object, array, object
    assert nested_too_deeply({"a": [{"b": {}}]}, limit=3)
    assert not nested_too_deeply({})


def _accepts(schema: dict, text: bytes) -> bool:
    backend = GrammarBackend("byte", 262)
    m = backend.matcher(StructuredOutputsParams(json=schema))
    return all(m.accept(b) for b in text) and m.is_accepting()


def test_unevaluated_properties_false_closes_a_plain_object():
    """Outside an intersection it means what additionalProperties: false does; it once left
    the object open (an extra key "b" went through)."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "unevaluatedProperties": False,
    }
    assert _accepts(schema, b'{"a": 1}')
    assert not _accepts(schema, b'{"a": 1, "b": 2}')
    assert not _accepts({"type": "object", "unevaluatedProperties": False}, b'{"b": 2}')


class Scores(BaseModel):
    by_colour: dict[Literal["red", "blue"], int]
    by_key: dict[str, int] = Field(json_schema_extra={"propertyNames": {"pattern": "^k"}})


def test_property_names_of_a_pydantic_dict_are_enforced():
    """pydantic writes `propertyNames` for a dict keyed by a Literal; the compiler skips that
    keyword, so it is rewritten as properties (or patternProperties) it enforces."""
    schema = Scores.model_json_schema()
    assert _accepts(schema, b'{"by_colour": {"red": 1, "blue": 2}, "by_key": {"k1": 3}}')
    assert _accepts(schema, b'{"by_colour": {}, "by_key": {}}')
    assert not _accepts(schema, b'{"by_colour": {"green": 1}, "by_key": {}}')
    assert not _accepts(schema, b'{"by_colour": {}, "by_key": {"x": 1}}')
    Scores.model_validate_json('{"by_colour": {"red": 1, "blue": 2}, "by_key": {"k1": 3}}')


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 42}}, "contains"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "dependentRequired": {"b": ["a"]},
            },
            "dependentRequired",
        ),
        (  # repeated: llguidance's warning then ends with " (2 times)"
            {
                "type": "object",
                "properties": {
                    "a": {"type": "array", "contains": {"const": 1}},
                    "b": {"type": "array", "contains": {"const": 2}},
                },
            },
            "contains",
        ),
        ({"type": "object", "dependencies": {"a": ["b"]}}, "dependencies"),
    ],
)
def test_a_keyword_the_grammar_would_skip_is_a_400_not_dropped(schema, keyword):
    """These once went through unenforced: `contains` 42 gave [1, 2, 3]."""
    from ember.engine.json_schema import schema_error

    with pytest.raises(StructuredOutputsError, match=keyword) as err:
        GrammarBackend("byte", 262).compile(StructuredOutputsParams(json=schema))
    assert "cannot enforce" in str(err.value)
    assert keyword in schema_error(schema)  # tool parameters alike


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},  # a pydantic set
        {"not": {"type": "string"}},
        {"type": "string", "format": "password"},  # an unknown format is an annotation
        {
            "allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}],
            "unevaluatedProperties": False,
        },
    ],
)
def test_tolerated_keywords_still_compile(schema):
    GrammarBackend("byte", 262).compile(StructuredOutputsParams(json=schema))


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Keyed(BaseModel):
    by_colour: dict[Colour, int]
    by_level: dict[Level, str]
    by_id: dict[uuid.UUID, str]
    short: dict[Annotated[str, Field(max_length=3)], int]


def test_dicts_pydantic_keys_by_enums_uuids_and_bounds_still_compile():
    """Forms of propertyNames that cannot be lowered stay accepted (as before); an Enum's,
    behind a $ref, is enforced."""
    schema = Keyed.model_json_schema()
    assert "$ref" in schema["properties"]["by_colour"]["propertyNames"]
    tail = b', "by_level": {"2": "x"}, "by_id": {}, "short": {"abc": 1}}'
    assert _accepts(schema, b'{"by_colour": {"red": 1}' + tail)
    assert not _accepts(schema, b'{"by_colour": {"green": 1}' + tail)
    assert not _accepts(
        schema, b'{"by_colour": {}, "by_level": {"3": "x"}, "by_id": {}, "short": {}}'
    )
    from openai.lib._pydantic import to_strict_json_schema

    from ember.engine.json_schema import schema_error

    assert schema_error(to_strict_json_schema(Keyed)) is None
    # zod's z.record(z.string(), ...) writes a propertyNames that constrains nothing.
    record = {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}}
    assert schema_error(record) is None and _accepts(record, b'{"any": 1}')


@pytest.mark.parametrize("applicator", ["$ref", "anyOf", "oneOf", "allOf"])
def test_unevaluated_properties_beside_an_applicator_is_left_alone(applicator):
    """Keys evaluated by a referenced or combined schema are allowed: closing the object here
    once refused every key ("required property 'a' is unsatisfiable")."""
    a = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    ref = {"$ref": "#/$defs/A"} if applicator == "$ref" else {applicator: [{"$ref": "#/$defs/A"}]}
    schema = {**ref, "unevaluatedProperties": False, "$defs": {"A": a}}
    assert _accepts(schema, b'{"a": 1}')


def test_a_property_names_pattern_is_not_lowered_onto_listed_keys_it_matches():
    """patternProperties would hold a listed key that matches it to the extra keys' schema too."""
    schema = {
        "type": "object",
        "properties": {"k1": {"type": "string"}},
        "additionalProperties": {"type": "integer"},
        "propertyNames": {"pattern": "^k"},
    }
    assert _accepts(schema, b'{"k1": "x"}')
