"""Structured outputs: the llguidance backend on small tokenizers, and the engine under grammars."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest
import torch

import ember
from ember.engine.request import SamplingParams
from ember.engine.structured import (
    GrammarBackend,
    StructuredOutputsError,
    StructuredOutputsParams,
)

from checkpoints import TINY_VOCAB

# Every string and number is bounded, so a random-weight model must finish the object.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
            "maxItems": 2,
        },
    },
    "required": ["ok", "n", "color", "tags"],
    "additionalProperties": False,
}


def _byte_backend(vocab: int = 262) -> GrammarBackend:
    return GrammarBackend("byte", vocab)


def _allowed(bitmask: torch.Tensor, row: int, vocab: int) -> set[int]:
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")[:vocab]
    return set(np.nonzero(bits)[0].tolist())


def _walk(backend: GrammarBackend, spec: StructuredOutputsParams, seed: int, steps: int = 400):
    """Pick random allowed tokens until the grammar ends; the bytes written."""
    rng = random.Random(seed)
    m = backend.matcher(spec)
    out = []
    for _ in range(steps):
        if m.is_terminated():
            break
        allowed = _allowed(backend.fill_bitmasks([m], [[]]), 0, backend.vocab_size)
        token = rng.choice(sorted(allowed))
        assert m.accept(token)
        out.append(token)
    assert m.is_terminated()
    return out


# ------------------------------------------------------------------ backend, byte tokenizer


def test_json_schema_mask_only_allows_what_the_schema_allows():
    backend = _byte_backend()
    m = backend.matcher(StructuredOutputsParams(json=SCHEMA))
    assert _allowed(backend.fill_bitmasks([m], [[]]), 0, 262) == {ord("{")}
    for b in b'{"ok": ':
        assert m.accept(b)
    assert _allowed(backend.fill_bitmasks([m], [[]]), 0, 262) == {ord("t"), ord("f")}
    assert not m.is_accepting()


@pytest.mark.parametrize("seed", range(5))
def test_random_walks_under_a_schema_give_valid_json(seed):
    backend = _byte_backend()
    out = _walk(backend, StructuredOutputsParams(json=SCHEMA), seed)
    jsonschema.validate(json.loads(bytes(out)), SCHEMA)


def test_rollback_returns_to_the_earlier_state():
    backend = _byte_backend()
    m = backend.matcher(StructuredOutputsParams(regex=r"(ab|cd)x"))
    assert m.accept(ord("a")) and m.accept(ord("b"))
    assert m.rollback(2)
    assert _allowed(backend.fill_bitmasks([m], [[]]), 0, 262) == {ord("a"), ord("c")}
    for b in b"cdx":
        assert m.accept(b)
    assert m.is_terminated()


def test_a_forbidden_token_is_refused():
    backend = _byte_backend()
    m = backend.matcher(StructuredOutputsParams(choice=["yes", "no"]))
    assert not m.accept(ord("x"))
    assert m.is_error()


def test_stop_tokens_are_allowed_only_where_the_output_is_complete():
    backend = _byte_backend()
    spec = StructuredOutputsParams(regex=r"a+")
    m = backend.matcher(spec)
    assert 7 not in _allowed(backend.fill_bitmasks([m], [[7]]), 0, 262)
    assert m.accept(ord("a"))
    assert 7 in _allowed(backend.fill_bitmasks([m], [[7]]), 0, 262)
    assert ord("a") in _allowed(backend.fill_bitmasks([m], [[7]]), 0, 262)


def test_batch_fill_matches_one_at_a_time():
    backend = _byte_backend()
    specs = [
        StructuredOutputsParams(json=SCHEMA),
        StructuredOutputsParams(choice=["red", "green"]),
        StructuredOutputsParams(regex=r"[0-9]{3}"),
        StructuredOutputsParams(json_object=True),
    ]
    matchers = [backend.matcher(s) for s in specs]
    matchers[1].accept(ord("g"))
    together = backend.fill_bitmasks(matchers, [[]] * 4)
    for i, m in enumerate(matchers):
        assert torch.equal(together[i], backend.fill_bitmasks([m], [[]])[0])


def test_regex_digits_are_ascii_digits():
    # llguidance reads \d as any Unicode digit; a regex's user (as vLLM's) means 0-9.
    backend = _byte_backend()
    digits = set(range(ord("0"), ord("9") + 1))
    for regex in (r"\d{3}", r"[\d]{3}", r"[\d.]{3}"):
        m = backend.matcher(StructuredOutputsParams(regex=regex))
        allowed = _allowed(backend.fill_bitmasks([m], [[]]), 0, 256)
        assert allowed == digits | ({ord(".")} if "." in regex else set()), regex
    m = backend.matcher(StructuredOutputsParams(regex=r"\D"))
    assert not _allowed(backend.fill_bitmasks([m], [[]]), 0, 256) & digits


def test_choice_regex_and_grammar_walks_end_in_their_language():
    backend = _byte_backend()
    for seed in range(3):
        out = bytes(_walk(backend, StructuredOutputsParams(choice=["red", "green"]), seed))
        assert out in (b"red", b"green")
        out = bytes(_walk(backend, StructuredOutputsParams(regex=r"[0-9]{4}-[0-9]{2}"), seed))
        assert len(out) == 7 and out[4:5] == b"-" and out.replace(b"-", b"").isdigit()
        grammar = 'start: "(" item ("," item)* ")"\nitem: /[a-c]/'
        out = bytes(_walk(backend, StructuredOutputsParams(grammar=grammar), seed))
        assert out.startswith(b"(") and out.endswith(b")")


def test_a_choice_of_many_strings_compiles_and_ends_in_one_of_them():
    """Thousands of choices (a parser row holds 2,000 items at most), some prefixes of others,
    one empty: every walk ends in exactly one of them."""
    backend = _byte_backend()
    choices = ["c", *(f"c{i}" for i in range(5000)), "c1-x"]
    spec = StructuredOutputsParams(choice=choices)
    # A walk may end with the tokenizer's end of text (ids past the bytes) where a choice is
    # complete but a longer one could go on.
    outs = {bytes(t for t in _walk(backend, spec, seed) if t < 256).decode() for seed in range(40)}
    assert outs <= set(choices) and len(outs) > 10
    m = backend.matcher(spec)
    for token in b"c4999":
        assert m.accept(token)
    assert m.is_accepting()
    assert not backend.matcher(spec).accept(ord("d"))
    m = backend.matcher(StructuredOutputsParams(choice=["", *choices]))
    assert m.is_accepting() and m.accept(ord("c"))  # the empty choice, or go on


def test_grammar_errors_come_without_the_parser_state_and_grammar():
    """llguidance appends its state and the grammar (kilobytes) to some messages."""
    from ember.engine.structured import readable_error

    raw = 'Parser Error: too many items\n<state>\n{"compute_time_us": 3}\n</state><grammar>\nstart: x\n</grammar>'
    assert readable_error(raw) == "Parser Error: too many items"
    assert len(readable_error("x" * 10_000)) == 500
    backend = _byte_backend()
    with pytest.raises(StructuredOutputsError) as err:
        backend.compile(StructuredOutputsParams(regex="(a{1000}){1000}"))
    assert "<state>" not in str(err.value) and len(str(err.value)) <= 600


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "frob"}}}}, "frob"),
        ({"regex": "[a-"}, "unclosed character class"),
        ({"grammar": "start: nothing_here"}, "nothing_here"),
        ({"json": "{not json"}, "JSON"),
    ],
)
def test_an_uncompilable_spec_names_its_problem(spec, words):
    backend = _byte_backend()
    with pytest.raises(StructuredOutputsError) as err:
        backend.compile(StructuredOutputsParams.of(spec))
    assert words in str(err.value)


def test_spec_needs_exactly_one_kind():
    with pytest.raises(StructuredOutputsError):
        StructuredOutputsParams()
    with pytest.raises(StructuredOutputsError):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(StructuredOutputsError):
        SamplingParams(structured_outputs={"jsn": {}})
    assert SamplingParams(structured_outputs={"choice": ["a"]}).structured_outputs.choice == ["a"]


def test_compiles_are_cached_by_spec():
    backend = _byte_backend()
    a = backend.compile(StructuredOutputsParams(json=SCHEMA))
    assert backend.compile(StructuredOutputsParams(json=json.loads(json.dumps(SCHEMA)))) is a
    assert backend.compile_async(StructuredOutputsParams(json=SCHEMA)).result() is a


def test_apply_bitmask_bans_exactly_the_zero_bits():
    vocab = 100
    backend = GrammarBackend("byte", vocab)
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (3, backend.words), dtype=torch.int32, generator=gen
    )
    logits = torch.randn(5, vocab + 7, generator=gen)  # padded logit rows past the bitmask
    want = logits.clone()
    rows = [0, 2, 3]
    for i, row in enumerate(rows):
        for t in range(vocab + 7):
            word = int(bitmask[i, t // 32]) if t < backend.words * 32 else 0
            if t >= vocab or not (word >> (t % 32)) & 1:
                want[row, t] = float("-inf")
    backend.apply_bitmask(logits, rows, bitmask)
    assert torch.equal(logits, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_bitmask_on_the_gpu_matches_the_cpu():
    backend = GrammarBackend("byte", 250)
    gen = torch.Generator().manual_seed(1)
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (4, backend.words), dtype=torch.int32, generator=gen
    )
    logits = torch.randn(6, 256, generator=gen)
    on_gpu = logits.cuda()
    backend.apply_bitmask(logits, [0, 1, 3, 5], bitmask)
    backend.apply_bitmask(on_gpu, [0, 1, 3, 5], bitmask)
    assert torch.equal(on_gpu.cpu(), logits)


def test_chatglm3_sentencepiece_bridge(tmp_path):
    from ember.chat.tokenizer import ChatGLM3Tokenizer

    from sp_models import train_sentencepiece

    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece("bpe", 400))
    tok = ChatGLM3Tokenizer(tmp_path / "tokenizer.model")
    vocab = -(-tok.vocab_size // 64) * 64  # the model's padded logit rows
    backend = GrammarBackend(tok, vocab)
    spec = StructuredOutputsParams(json=SCHEMA)
    specials = set(tok.special_ids.values())
    for seed in range(3):
        rng = random.Random(seed)
        m = backend.matcher(spec)
        out = []
        while not m.is_terminated():
            allowed = _allowed(backend.fill_bitmasks([m], [[]]), 0, vocab)
            assert allowed and not allowed & specials and max(allowed) < tok.vocab_size
            token = rng.choice(sorted(allowed))
            assert m.accept(token)
            out.append(token)
        # The pieces' bytes as the bridge gave them agree with SentencePiece's decoding.
        jsonschema.validate(json.loads(tok.decode(out)), SCHEMA)


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model runs fastest on one thread, and far faster on a busy machine."""
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama, one_thread):
    return ember.LLM(
        str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory="8MiB", num_threads=1
    )


def _json_outputs(results) -> list[str]:
    return [o.text for r in results for o in r.outputs]


def test_engine_output_validates_across_seeds_and_sampling_settings(tiny_llm):
    spec = {"json": SCHEMA}
    params = [
        SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured_outputs=spec)
        for s in range(4)
    ] + [
        SamplingParams(
            max_tokens=120, temperature=0.8, top_p=0.9, top_k=50, structured_outputs=spec
        ),
        SamplingParams(max_tokens=120, temperature=0, logprobs=3, structured_outputs=spec),
        SamplingParams(max_tokens=120, temperature=1.2, n=3, seed=7, structured_outputs=spec),
        SamplingParams(max_tokens=120, repetition_penalty=1.3, min_p=0.05, structured_outputs=spec),
    ]
    results = tiny_llm.generate([[5, 6, 7, 8]] * len(params), params)
    for r in results:
        for o in r.outputs:
            assert o.finish_reason == "stop"
            jsonschema.validate(json.loads(o.text), SCHEMA)
    lps = results[5].outputs[0].logprobs
    assert lps and all(np.isfinite(lp.logprob) for lp in lps)


def test_seeded_structured_output_is_reproducible(tiny_llm):
    p = SamplingParams(max_tokens=120, temperature=1.0, seed=3, structured_outputs={"json": SCHEMA})
    a = tiny_llm.generate([[9, 10, 11]], p)[0].outputs[0]
    b = tiny_llm.generate([[9, 10, 11]], p)[0].outputs[0]
    assert a.token_ids == b.token_ids


def test_constrained_rows_leave_unconstrained_rows_alone(tiny_llm):
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[3 + i, 40 + i, 90 + i] for i in range(6)]
    alone = [r.outputs[0].token_ids for r in tiny_llm.generate(prompts, free)]
    spec = {"json": SCHEMA}
    mixed_params = [
        free
        if i % 2 == 0
        else SamplingParams(max_tokens=120, temperature=0, structured_outputs=spec)
        for i in range(6)
    ]
    mixed = tiny_llm.generate(prompts, mixed_params)
    for i, r in enumerate(mixed):
        if i % 2 == 0:
            assert r.outputs[0].token_ids == alone[i]
        else:
            jsonschema.validate(json.loads(r.outputs[0].text), SCHEMA)


def test_structured_output_survives_preemption(tiny_llama, one_thread):
    prompts = [[3 + i] * (10 + 3 * i) for i in range(10)]
    params = SamplingParams(max_tokens=120, temperature=0, structured_outputs={"json": SCHEMA})
    roomy = ember.LLM(str(tiny_llama), dtype="float32", block_size=4, num_threads=1)
    tight = ember.LLM(
        str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory="120KiB", num_threads=1
    )
    want = [o.token_ids for r in roomy.generate(prompts, params) for o in r.outputs]
    got = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for r in got for o in r.outputs] == want
    for text in _json_outputs(got):
        jsonschema.validate(json.loads(text), SCHEMA)
    assert tight.engine.allocator.num_free_blocks == tight.engine.allocator.num_blocks


def test_max_tokens_cuts_structured_output_with_length(tiny_llm):
    p = SamplingParams(max_tokens=4, temperature=0, structured_outputs={"json": SCHEMA})
    out = tiny_llm.generate([[5, 6]], p)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith("{")


def test_stop_string_ends_structured_output(tiny_llm):
    p = SamplingParams(
        max_tokens=60, temperature=0, stop=[","], structured_outputs={"json": SCHEMA}
    )
    out = tiny_llm.generate([[5, 6]], p)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == ","
    assert out.text.startswith('{"ok": ') and "," not in out.text


def test_choice_and_regex_through_the_offline_api(tiny_llm):
    choices = ["alpha", "beta gamma", "delta"]
    for seed in range(3):
        p = SamplingParams(
            max_tokens=20, temperature=1, seed=seed, structured_outputs={"choice": choices}
        )
        assert tiny_llm.generate([[7, 8]], p)[0].outputs[0].text in choices
        p = SamplingParams(
            max_tokens=20, seed=seed, structured_outputs={"regex": r"[0-9]{2}-[a-f]{3}"}
        )
        text = tiny_llm.generate([[7, 8]], p)[0].outputs[0].text
        assert len(text) == 6 and text[2] == "-" and text[:2].isdigit()


def test_the_prefix_cache_does_not_change_structured_output(tiny_llm):
    prompt = list(range(3, 3 + 24))  # six blocks of four, cached after the first run
    p = SamplingParams(max_tokens=120, temperature=0, structured_outputs={"json": SCHEMA})
    first = tiny_llm.generate([prompt], p)[0]
    second = tiny_llm.generate([prompt], p)[0]
    assert second.num_cached_tokens > 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids


def test_vocab_sized_prompt_ids_are_fine(tiny_llm):
    # The tiny model's logits are exactly TINY_VOCAB wide: masks cover every row.
    assert tiny_llm.engine.structured.vocab_size == TINY_VOCAB


# ------------------------------------------------------------------ forced tool calls

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "pattern": "^[A-Z][a-z]{0,6}$"},
                    "unit": {"enum": ["c", "f"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set.flag",
            "parameters": {
                "type": "object",
                "properties": {"on": {"type": "boolean"}, "note": {"type": "null"}},
                "additionalProperties": False,
            },
        },
    },
]


# Schemas that refer to their own definitions (pydantic writes $defs; draft 7 definitions).
REF_SCHEMA = {
    "$defs": {"Loc": {"type": "object", "properties": {"city": {"type": "string"}}}},
    "type": "object",
    "properties": {"loc": {"$ref": "#/$defs/Loc"}},
    "required": ["loc"],
    "additionalProperties": False,
}
REF_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "definitions": {"U": {"enum": ["c", "f"]}},
                "type": "object",
                "properties": {"unit": {"$ref": "#/definitions/U"}, "days": {"type": "integer"}},
                "required": ["unit"],
            },
        },
    },
    TOOLS[1],
]
CASES = {"plain": (TOOLS, SCHEMA), "refs": (REF_TOOLS, REF_SCHEMA)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "chatglm3"])
@pytest.mark.parametrize("function", [None, "get_weather", "set.flag"])
def test_forced_call_grammar_always_gives_a_call_that_parses_and_validates(fmt, function, case):
    from ember.chat.tool_parsers import PARSERS, make_parser

    tools, _ = CASES[case]
    parser_cls = PARSERS[fmt]
    backend = _byte_backend()
    spec = StructuredOutputsParams(grammar=parser_cls.call_grammar(tools, function))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    seen = set()
    for seed in range(6):
        text = bytes(_walk(backend, spec, seed)).decode()
        res = make_parser(fmt, list(schemas)).parse(parser_cls.forced_prefix(function) + text)
        assert len(res.tool_calls) == 1, text
        call = res.tool_calls[0]
        assert function is None or call.name == function
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        seen.add(call.name)
    assert function is not None or len(seen) == 2  # "required" may pick any of the tools


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "chatglm3"])
@pytest.mark.parametrize("max_calls", [None, 1])
def test_required_grammar_gives_one_or_more_valid_calls(fmt, max_calls):
    """tool_choice "required": at least one call, each valid; more than one only where the
    format writes several calls in a reply (Hermes) and parallel_tool_calls is not false."""
    from ember.chat.tool_parsers import PARSERS, make_parser

    parser_cls = PARSERS[fmt]
    spec = StructuredOutputsParams(grammar=parser_cls.required_grammar(TOOLS, max_calls))
    backend = _byte_backend()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    counts = set()
    for seed in range(16):
        walked = _walk(backend, spec, seed, steps=800)
        text = bytes(t for t in walked if t < 256).decode()  # past 255: the end of the reply
        res = make_parser(fmt, list(schemas)).parse(parser_cls.forced_prefix(None) + text)
        assert res.tool_calls and not res.content.strip(), text
        for call in res.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        counts.add(len(res.tool_calls))
    assert (max(counts) > 1) == (fmt == "hermes" and max_calls is None)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "chatglm3"])
@pytest.mark.parametrize("max_calls", [None, 1])
def test_answer_or_call_grammar_gives_the_json_answer_or_valid_calls(fmt, max_calls, case):
    """tool_choice auto with a JSON response_format: every reply is the answer, matching its
    schema, or calls that parse and validate; random walks take both branches. With refs:
    Llama 3.1's union of all the schemas once left their "#/$defs/..." pointing at nothing."""
    from ember.chat.tool_parsers import PARSERS, make_parser

    tools, answer_schema = CASES[case]
    grammar = PARSERS[fmt].answer_or_call_grammar(tools, answer_schema, max_calls)
    spec = StructuredOutputsParams(grammar=grammar)
    backend = _byte_backend()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    answers = calls = most_calls = 0
    for seed in range(24):
        walked = _walk(backend, spec, seed, steps=800)
        text = bytes(t for t in walked if t < 256).decode()  # past 255: the end of the reply
        res = make_parser(fmt, list(schemas)).parse(text)
        if res.tool_calls:
            assert not res.content.strip(), text
            for call in res.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            calls += 1
            most_calls = max(most_calls, len(res.tool_calls))
        else:
            jsonschema.validate(json.loads(res.content), answer_schema)
            answers += 1
    assert answers and calls
    parallel = fmt == "hermes" and max_calls is None
    assert (most_calls > 1) == parallel


def test_logprobs_of_masked_alternatives_are_finite(tiny_llm):
    p = SamplingParams(max_tokens=8, temperature=0, logprobs=5, structured_outputs={"json": SCHEMA})
    out = tiny_llm.generate([[5, 6]], p)[0].outputs[0]
    first = out.logprobs[0]  # only "{" is allowed: every alternative is masked
    assert first.logprob == pytest.approx(0.0, abs=1e-5)
    assert all(np.isfinite(v) and v >= -9999.0 for _, v in first.top)
