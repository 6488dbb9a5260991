"""Tiny SentencePiece models trained in the tests, saved as the real models' tokenizer files.

They are trained like Llama-2's and ChatGLM3's (byte fallback, dummy prefix, no whitespace
folding) on a small multilingual corpus, so byte-fallback pieces, CJK and emoji all occur, and
the directories look like the real ones on disk.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = """The quick brown fox jumps over the lazy dog.
Hello, how are you today? I am fine, thank you very much.
[INST] What is the capital of France? [/INST] Paris is the capital of France.
<<SYS>> You are a helpful, respectful and honest assistant. <</SYS>>
What's the weather like in Beijing and Paris today?
```python
tool_call(city='Paris', unit='celsius')
```
{"name": "get_weather", "description": "Get the current weather", "parameters": {}}
你好，世界！今天天气很好，我们一起去公园散步吧。
人工智能正在改变世界，大语言模型可以回答各种问题。
北京是中国的首都，上海是一座美丽的城市。
Bonjour le monde. Ça va bien, merci beaucoup.
Guten Tag! Wie geht es Ihnen? Mir geht es gut.
def add(a, b):
    return a + b
Numbers such as 12345 and 67890 appear here, 3.14 too.
"""

# Llama-2-7b-chat-hf's tokenizer_config.json, without its chat_template.
LLAMA2_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "model_max_length": 4096,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
}

# The chat_template that Llama-2-7b-chat-hf's tokenizer_config.json carries (Meta's format).
LLAMA2_HF_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# ChatGLM3-6B's tokenizer_config.json (its remote-code class, which Ember never runs).
CHATGLM3_TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm3-6b",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


def train_sentencepiece(model_type: str = "bpe", vocab_size: int = 400) -> bytes:
    """A serialized SentencePiece model: <unk>=0, <s>=1, </s>=2, then bytes and pieces."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 10),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_llama2_tokenizer(
    out: Path, model: bytes, chat_template: str | None = None, legacy: bool = False
) -> Path:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json, as Llama-2-chat-hf."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    config = dict(LLAMA2_TOKENIZER_CONFIG, legacy=legacy)
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


def write_chatglm3_tokenizer(out: Path, model: bytes, tokenizer_config: bool = True) -> Path:
    """tokenizer.model + tokenizer_config.json + config.json, as THUDM/chatglm3-6b."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    if tokenizer_config:
        (out / "tokenizer_config.json").write_text(json.dumps(CHATGLM3_TOKENIZER_CONFIG))
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config))
    return out
