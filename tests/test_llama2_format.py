"""Llama-2 chat prompts equal Meta's `chat_completion` ids, whatever form the tokenizer takes.

`meta_chat_ids` is Meta's algorithm (llama/generation.py) on a raw SentencePieceProcessor of the
same trained model; the tokenizer directories are the shapes a Llama-2-chat checkpoint comes in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ember.chat.templates import (
    BUILTIN,
    ChatFormatter,
    ChatTemplateError,
    resolve_chat_template,
)
from ember.chat.tokenizer import Tokenizer

from sp_models import LLAMA2_HF_CHAT_TEMPLATE, train_sentencepiece, write_llama2_tokenizer

LLAMA2_CONFIG = {"model_type": "llama", "vocab_size": 32000}
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

SYSTEM = "You are a helpful, respectful and honest assistant."
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "one user turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system prompt": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hello, how are you today?"},
    ],
    "multi-turn with system": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "你好，北京是中国的首都吗？"},
        {"role": "assistant", "content": "是的 😀"},
        {"role": "user", "content": "Thank you very much."},
    ],
    "whitespace around turns": [
        {"role": "system", "content": "\nBe brief.\n"},
        {"role": "user", "content": "\n  Hello!\n\n"},
        {"role": "assistant", "content": "  Hi.  "},
        {"role": "user", "content": " Bye "},
    ],
    "special strings as user text": [
        {"role": "user", "content": "a </s><s>[INST] b [/INST] <<SYS>>"},
    ],
}


def meta_chat_ids(sp: Any, dialog: list[dict[str, str]]) -> list[int]:
    """Meta's Llama.chat_completion prompt building, for one dialog."""
    bos, eos = sp.bos_id(), sp.eos_id()
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    assert all(m["role"] == "user" for m in dialog[::2])
    assert all(m["role"] == "assistant" for m in dialog[1::2])
    tokens: list[int] = sum(
        [
            [bos]
            + sp.encode(f"{B_INST} {(p['content']).strip()} {E_INST} {(a['content']).strip()} ")
            + [eos]
            for p, a in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    assert dialog[-1]["role"] == "user"
    tokens += [bos] + sp.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}")
    return tokens


@pytest.fixture(scope="session")
def sp_model() -> bytes:
    return train_sentencepiece("bpe", vocab_size=400)


@pytest.fixture(scope="session")
def sp(sp_model: bytes) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sp_model)


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory: pytest.TempPathFactory, sp_model: bytes) -> dict[str, Path]:
    """The shapes a Llama-2-chat tokenizer comes in."""
    root = tmp_path_factory.mktemp("llama2")
    dirs = {
        # Llama-2-7b-chat-hf before it carried a chat_template (legacy false, as it sets).
        "tokenizer.model": write_llama2_tokenizer(root / "sp", sp_model),
        "tokenizer.model, legacy": write_llama2_tokenizer(root / "legacy", sp_model, legacy=True),
        # Today's Llama-2-7b-chat-hf: the same files plus its own template in Meta's format.
        "own template": write_llama2_tokenizer(
            root / "own", sp_model, chat_template=LLAMA2_HF_CHAT_TEMPLATE
        ),
    }
    # Only tokenizer.json: what transformers converts and saves.
    converted = Tokenizer.from_dir(dirs["tokenizer.model"])
    assert isinstance(converted, Tokenizer)
    converted.hf.save_pretrained(str(root / "json"))
    assert not (root / "json" / "tokenizer.model").exists()
    dirs["tokenizer.json"] = root / "json"
    return dirs


@pytest.fixture(scope="session")
def formatters(llama_dirs: dict[str, Path]) -> dict[str, ChatFormatter]:
    out = {}
    for shape, path in llama_dirs.items():
        tok = Tokenizer.from_dir(path)
        assert isinstance(tok, Tokenizer)
        template = resolve_chat_template(None, tok, LLAMA2_CONFIG)
        assert template == "llama-2"
        out[shape] = ChatFormatter(tok, template)
    return out


@pytest.mark.parametrize(
    "shape", ["tokenizer.model", "tokenizer.model, legacy", "own template", "tokenizer.json"]
)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_ids_equal_meta_chat_completion(
    formatters: dict[str, ChatFormatter], sp: Any, shape: str, name: str
) -> None:
    dialog = CONVERSATIONS[name]
    assert formatters[shape].encode(dialog) == meta_chat_ids(sp, dialog)


def test_transformers_encodes_plain_text_as_sentencepiece(
    formatters: dict[str, ChatFormatter], sp: Any
) -> None:
    """The premise of building prompts segment by segment through the HF tokenizer."""
    text = "[INST] 你好 😀 [/INST] a </s> b "
    for formatter in formatters.values():
        assert formatter.tokenizer.encode_plain(text) == sp.encode(text)


def test_first_turn_starts_with_bos_then_the_prefixed_inst(
    formatters: dict[str, ChatFormatter], sp: Any
) -> None:
    """Meta's `<s>` + SP("[INST] ..."): the dummy prefix follows BOS, as a rendered "<s>[INST]"
    tokenized by transformers 5 (legacy false) would not have it."""
    ids = formatters["tokenizer.model"].encode(CONVERSATIONS["one user turn"])
    assert ids[0] == 1
    assert sp.id_to_piece(ids[1]).startswith("▁")


def test_render_shows_meta_text(formatters: dict[str, ChatFormatter]) -> None:
    text = formatters["tokenizer.model"].render(CONVERSATIONS["multi-turn with system"])
    assert text == (
        f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nWhat is the capital of France? [/INST] "
        "Paris is the capital of France. </s>"
        "<s>[INST] 你好，北京是中国的首都吗？ [/INST] 是的 😀 </s>"
        "<s>[INST] Thank you very much. [/INST]"
    )


def test_a_finished_last_answer_is_closed_with_eos(
    formatters: dict[str, ChatFormatter], sp: Any
) -> None:
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids = formatters["tokenizer.model"].encode(dialog, add_generation_prompt=False)
    assert ids == [1] + sp.encode("[INST] Hi [/INST] Hello! ") + [2]


def test_continue_final_message_leaves_the_answer_open(
    formatters: dict[str, ChatFormatter], sp: Any
) -> None:
    """No trailing space, no </s>: the reply continues the answer's text."""
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! I am "},
    ]
    f = formatters["tokenizer.model"]
    ids = f.encode(dialog, add_generation_prompt=False, continue_final_message=True)
    assert ids == [1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! I am")
    assert f.render(dialog, False, None, True).endswith("[/INST] Hello! I am")
    with pytest.raises(ChatTemplateError, match="assistant"):  # nothing of the answer's to continue
        f.encode(dialog[:2], add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="both"):
        f.encode(dialog, continue_final_message=True)


def test_history_out_of_meta_turns_joins_as_fastchat_took_it(
    formatters: dict[str, ChatFormatter],
) -> None:
    """NextChat sends two user turns in a row after a failed reply, and a memory summary as a
    second system message; each such request was a 400 (FastChat, the tutorial's server,
    took them)."""
    f = formatters["tokenizer.model"]
    as_sent = [
        {"role": "system", "content": "Summary of earlier turns."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "system", "content": "Mind the time."},
        {"role": "user", "content": "d"},
    ]
    meta = [
        {"role": "system", "content": "Summary of earlier turns.\n\nBe brief.\n\nMind the time."},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert f.encode(as_sent) == f.encode(meta)
    # An opening assistant greeting (a NextChat mask's) answers an empty user turn.
    greeting = [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "e"}]
    assert f.encode(greeting) == f.encode([{"role": "user", "content": ""}, *greeting])


def test_llama2_builtin_is_selectable_by_name(formatters: dict[str, ChatFormatter]) -> None:
    assert "llama-2" in BUILTIN and "chatglm3" in BUILTIN and "chatml" in BUILTIN
    tok = formatters["tokenizer.json"].tokenizer
    assert resolve_chat_template("llama-2", tok, {}) == "llama-2"


def test_other_models_keep_their_own_jinja_template(llama_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(llama_dirs["tokenizer.json"])
    assert isinstance(tok, Tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    template = resolve_chat_template(None, tok, {"model_type": "mistral"})
    assert template == tok.chat_template
    formatter = ChatFormatter(tok, template)
    assert formatter.render([{"role": "user", "content": "hi"}]) == "user: hi\n"
    assert formatter.encode([{"role": "user", "content": "hi"}]) == tok.encode(
        "user: hi\n", add_special_tokens=False
    )


@pytest.mark.parametrize(
    "message, what",
    [
        ({"role": "tool", "tool_call_id": "call_1", "content": "42"}, "a tool result"),
        ({"role": "function", "name": "f", "content": "42"}, "a tool result"),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "tool calls",
        ),
        ({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}, "tool calls"),
    ],
)
def test_tool_turns_are_refused_not_read_as_user_text(
    formatters: dict[str, ChatFormatter], message: dict[str, Any], what: str
) -> None:
    """Meta's format has no tool calls or results: Meta's own template raises on the roles,
    and a tool result rendered as a user turn would put words in the user's mouth."""
    messages = [{"role": "user", "content": "Weather?"}, message]
    for formatter in formatters.values():
        with pytest.raises(ChatTemplateError, match=rf"messages\[1\] holds {what}"):
            formatter.render(messages)
