"""Tokenizers: one face for the engine and the server over two kinds of tokenizer.

* `Tokenizer` wraps a Hugging Face tokenizer (tokenizer.json, or a SentencePiece model that
  transformers converts).
* `ChatGLM3Tokenizer` is ChatGLM3's SentencePiece model plus its nine special tokens, written
  here so that no remote code runs (the model's own tokenizer is remote code, and it breaks on
  transformers >= 4.45).

`Tokenizer.from_dir` picks the right one for a directory. The engine needs encode, decode, the
vocabulary size and the special ids; chat formats live in `templates.py` and `chatglm3.py`.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

# ChatGLM3's special tokens, in id order, right after the SentencePiece vocabulary
# (64789.. for the real model). SentencePiece never produces them from text.
CHATGLM3_SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)


class InvalidTextError(ValueError):
    """Text that is not Unicode: a lone UTF-16 surrogate, which JSON can carry as an escape
    (\\ud800) but no tokenizer can read. The client gets a 400."""


def require_unicode(text: str) -> str:
    """text, if every code point in it is a character; else InvalidTextError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTextError(
            f"The text has a lone UTF-16 surrogate (\\u{ord(text[e.start]):04x} at character "
            f"{e.start}), which is not a Unicode character: escape each astral character as a "
            "surrogate pair, or send it as UTF-8."
        ) from None
    return text


def non_unicode_field(value: Any, path: str) -> tuple[str, str] | None:
    """The first string in `value` (JSON: dicts, lists, strings) that is not Unicode: its field
    path ("messages.2.content") and where in it ("\\ud800 at character 5"); None when all are."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                return where, f"\\u{ord(item[e.start]):04x} at character {e.start}"
        elif isinstance(item, dict):
            for key, v in reversed(item.items()):
                stack.append((v, f"{where}.{key}"))
                stack.append((key, where))  # a key is named by the object that holds it
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{where}.{i}") for i, v in reversed(list(enumerate(item))))
    return None


class BaseTokenizer(ABC):
    """What the engine, the detokenizer, the chat formats and the server use of a tokenizer."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    # The model's own Jinja chat template, if it ships one that Ember can use.
    chat_template: str | None
    all_special_ids: frozenset[int]
    # Ids besides eos_token_id that end a reply (e.g. ChatGLM3's <|user|>): the engine stops
    # on them too.
    stop_token_ids: frozenset[int]

    @classmethod
    def from_dir(cls, path: str | Path) -> BaseTokenizer:
        """The tokenizer a model directory asks for: ChatGLM3's, or a Hugging Face one."""
        path = Path(path)
        if _is_chatglm3_dir(path):
            return ChatGLM3Tokenizer(path / "tokenizer.model")
        from transformers import AutoTokenizer

        return Tokenizer(AutoTokenizer.from_pretrained(str(path)))

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of a prompt; add_special_tokens adds what the model puts before plain text."""

    @abstractmethod
    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` as ordinary text: nothing added before it, and any special-token
        string in it (say "</s>" in a user's message) stays text instead of becoming that id."""

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. "<|observation|>"), or None if there is none."""

    def token_text(self, token_id: int) -> str:
        """One token's text as it reads inside a text (logprobs' tokens), special tokens
        included. SentencePiece decodes a lone token without its leading space ("▁b" as "b"),
        so the token is decoded after another one whose text is then taken off."""
        text = self._token_texts.get(token_id)
        if text is None:
            anchor, head = self._anchor
            both = self.decode(anchor + [token_id], skip_special_tokens=False)
            if both.startswith(head):
                text = both[len(head) :]
            else:  # the two merged (a cleanup of spaces): the lone token's text
                text = self.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    @functools.cached_property
    def _token_texts(self) -> dict[int, str]:
        return {}

    @functools.cached_property
    def _anchor(self) -> tuple[list[int], str]:
        ids = self.encode_plain("a")[-1:]
        return ids, self.decode(ids, skip_special_tokens=False)


class Tokenizer(BaseTokenizer):
    """Wraps a `transformers` tokenizer loaded from a model directory."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.chat_template = getattr(hf_tokenizer, "chat_template", None)
        self.all_special_ids = frozenset(hf_tokenizer.all_special_ids)
        self.stop_token_ids = frozenset()
        # Plain text has a Rust tokenizer of its own that reads special-token strings as text.
        # transformers' split_special_tokens=True flips that setting on the shared one for the
        # call, which races with prompts tokenized at once on other threads (and the flip,
        # while another thread encodes, is tokenizers' "Already borrowed" error).
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._plain = None
        if backend is not None:
            from tokenizers import Tokenizer as RustTokenizer

            self._plain = RustTokenizer.from_str(backend.to_str())
            self._plain.encode_special_tokens = True
            # tokenizer.json may carry a truncation or padding, which transformers turns off
            # for each call: off for good in the copy.
            self._plain.no_truncation()
            self._plain.no_padding()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        text = require_unicode(text)
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_plain(self, text: str) -> list[int]:
        text = require_unicode(text)
        if self._plain is not None:
            return self._plain.encode_batch([text], add_special_tokens=False)[0].ids
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(token_ids))

    def token_to_id(self, token: str) -> int | None:
        token_id = self.hf.convert_tokens_to_ids(token)
        # Unknown tokens come back as the unk id (or None), which is not this token's id.
        if token_id is None or (token_id == self.hf.unk_token_id and token != self.hf.unk_token):
            return None
        return int(token_id)


class ChatGLM3Tokenizer(BaseTokenizer):
    """ChatGLM3's tokenizer: a SentencePiece model, then nine special tokens after its pieces.

    Matches the official `tokenization_chatglm.py`: `encode(text)` is `[gMASK], sop` followed
    by the SentencePiece ids (with its dummy prefix), and special-token strings inside text are
    ordinary text. Decoding renders the nine special tokens outside SentencePiece, so the text
    after one starts as a fresh SentencePiece decode (its dummy-prefix space dropped), exactly
    as the official decoder does.
    """

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.sp_size: int = self.sp.get_piece_size()
        # e.g. special_ids["<|observation|>"] == 64797 for the real model.
        self.special_ids: dict[str, int] = {
            token: self.sp_size + i for i, token in enumerate(CHATGLM3_SPECIAL_TOKENS)
        }
        self.vocab_size = self.sp_size + len(CHATGLM3_SPECIAL_TOKENS)
        # Prompts start with [gMASK] sop; the SentencePiece <s> is never used.
        self.bos_token_id = None
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id: int = self.sp.unk_id()  # the official tokenizer pads with <unk>
        # The model's tokenizer_config.json template needs special-token splitting of text,
        # which would let user text forge role tokens; Ember's chatglm3 format builds ids.
        self.chat_template = None
        self.prefix_ids: list[int] = [self.special_ids["[gMASK]"], self.special_ids["sop"]]
        self.stop_token_ids = frozenset(
            {self.eos_token_id, self.special_ids["<|user|>"], self.special_ids["<|observation|>"]}
        )
        # <unk>, <s>, </s> and the like are special too: kept out of text when skipping.
        sp_specials = {
            i for i in range(self.sp_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        self.all_special_ids = frozenset(sp_specials | set(self.special_ids.values()))
        self._outside_sp: dict[int, str] = {i: self.sp.id_to_piece(i) for i in sp_specials}
        self._outside_sp.update({i: t for t, i in self.special_ids.items()})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encode_plain(text)
        return self.prefix_ids + ids if add_special_tokens else ids

    def encode_plain(self, text: str) -> list[int]:
        return list(self.sp.encode(require_unicode(text)))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []  # consecutive ordinary SentencePiece ids, decoded together
        for token_id in token_ids:
            token_id = int(token_id)
            if 0 <= token_id < self.sp_size and token_id not in self._outside_sp:
                run.append(token_id)
                continue
            if run:
                parts.append(self.sp.decode(run))
                run = []
            if not skip_special_tokens:
                # Ids past the vocabulary (the model's padded logit rows) decode to nothing.
                parts.append(self._outside_sp.get(token_id, ""))
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        out = []
        for token_id in token_ids:
            token_id = int(token_id)
            if token_id in self._outside_sp:
                out.append(self._outside_sp[token_id])
            elif 0 <= token_id < self.sp_size:
                out.append(self.sp.id_to_piece(token_id))
            else:
                out.append("")  # an unused logit row has no token
        return out

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_ids:
            return self.special_ids[token]
        token_id = self.sp.piece_to_id(token)
        if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id):
            return None
        return int(token_id)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_chatglm3_dir(path: Path) -> bool:
    """A ChatGLM3 tokenizer: its SentencePiece model plus the remote ChatGLMTokenizer class.

    GLM-4 also says model_type "chatglm", but names ChatGLM4Tokenizer (a tiktoken file), so the
    tokenizer class decides whenever tokenizer_config.json names one.
    """
    if not (path / "tokenizer.model").is_file():
        return False
    tokenizer_class = _read_json(path / "tokenizer_config.json").get("tokenizer_class")
    if tokenizer_class:
        return tokenizer_class == "ChatGLMTokenizer"
    return _read_json(path / "config.json").get("model_type") == "chatglm"
