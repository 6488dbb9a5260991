"""IncrementalDetokenizer: streamed text is valid UTF-8, reassembles exactly, never leaks stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.chat.detokenizer import IncrementalDetokenizer
from ember.chat.tokenizer import Tokenizer
from ember.engine.request import SamplingParams

from conftest import run_at_once

REPLACEMENT = "\ufffd"
CJK_EMOJI = "你好，世界！今天天气很好。🎉👍🏽 ok 🇫🇷 数据 done"


@pytest.fixture(scope="session")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The default model's byte-level BPE tokenizer, converted from its GGUF as `ember serve`
    converts it."""
    from ember.models.loader import converted_gguf_dir, default_model_path

    return Tokenizer.from_dir(converted_gguf_dir(default_model_path()))


@pytest.fixture(scope="session")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A tiny Llama-style tokenizer: "▁" for spaces, byte fallback, leading space stripped on
    decode. Trained offline, so the SentencePiece behaviours are tested without a download."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    corpus = [
        "the cat sat on the mat",
        "hello world, the quick brown fox jumps over the lazy dog",
        "Hello, how are you today? The answer is 42.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=150,
        special_tokens=specials,
        initial_alphabet=list(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'▁"
        ),
    )
    draft = RawTokenizer(models.BPE(unk_token="<unk>"))
    draft.normalizer = normalizer
    draft.pre_tokenizer = pre_tokenizer
    draft.train_from_iterator(corpus, trainer)
    model = json.loads(draft.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    for byte in range(256):  # byte fallback: every character outside the vocab is spelt in bytes
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    raw = RawTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    raw.normalizer = normalizer
    raw.pre_tokenizer = pre_tokenizer
    raw.add_special_tokens(specials)
    raw.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    out = tmp_path_factory.mktemp("sp_tokenizer")
    hf.save_pretrained(str(out))
    return Tokenizer.from_dir(out)


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(
    tok: Tokenizer,
    prompt: list[int],
    output: list[int],
    params: SamplingParams | None = None,
    step: int = 1,
) -> tuple[IncrementalDetokenizer, list[tuple[str, str | None]]]:
    """Feed `output` `step` ids at a time, stopping as the engine would; return every result."""
    detok = IncrementalDetokenizer(tok, prompt, params or SamplingParams())
    results = []
    for i in range(0, len(output), step):
        results.append(detok.add_tokens(output[i : i + step]))
        if results[-1][1] is not None:
            break
    return detok, results


def chat_prompt(tok: Tokenizer) -> list[int]:
    return ids_of(tok, "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")


# --- incremental decoding ------------------------------------------------------------------


def test_cjk_and_emoji_split_across_byte_tokens_never_yield_replacement_char(
    smol: Tokenizer,
) -> None:
    output = ids_of(smol, CJK_EMOJI)
    detok, results = stream(smol, chat_prompt(smol), output)
    assert len(output) > len(CJK_EMOJI) // 2  # many characters really span several tokens
    assert any(text == "" for text, _ in results)  # ...so some steps had to hold text back
    for text, _ in results:
        assert REPLACEMENT not in text
    assert "".join(text for text, _ in results) + detok.flush()[0] == CJK_EMOJI


def test_byte_fallback_characters_reassemble_without_replacement_char(
    sentencepiece: Tokenizer,
) -> None:
    text = "the cat 你好 🎉 sat"
    output = ids_of(sentencepiece, text)
    assert any(tok.startswith("<0x") for tok in sentencepiece.convert_ids_to_tokens(output))
    detok, results = stream(sentencepiece, ids_of(sentencepiece, "hello"), output)
    for chunk, _ in results:
        assert REPLACEMENT not in chunk
    assert detok.output_text + detok.flush()[0] == " " + text  # the space before "the" is kept


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_emitted_text_equals_full_decode_of_output(smol: Tokenizer, step: int) -> None:
    text = "Sure! Here's code:\n```python\ndef f(x):\n    return x ** 2  # 平方\n```\nDone 🎉."
    output = ids_of(smol, text)
    detok, _ = stream(smol, chat_prompt(smol), output, step=step)
    detok.flush()
    assert detok.output_text == smol.decode(output) == text


def test_first_output_token_keeps_its_leading_space_with_sentencepiece(
    sentencepiece: Tokenizer,
) -> None:
    prompt = ids_of(sentencepiece, "hello")
    output = ids_of(sentencepiece, "hello world")[len(prompt) :]
    assert sentencepiece.decode(output) == "world"  # decoded alone, the space is stripped
    text, _ = IncrementalDetokenizer(sentencepiece, prompt, SamplingParams()).add_tokens(output)
    assert text == " world"


def test_first_output_token_keeps_its_leading_space_with_byte_level_bpe(smol: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smol, ids_of(smol, "Say"), SamplingParams())
    assert detok.add_tokens(ids_of(smol, " hello")) == (" hello", None)


def test_prompt_text_is_never_emitted(smol: Tokenizer) -> None:
    detok, _ = stream(smol, chat_prompt(smol), ids_of(smol, "Hi"))
    detok.flush()
    assert detok.output_text == "Hi"


def test_flush_emits_an_incomplete_final_character_as_full_decode_does(smol: Tokenizer) -> None:
    output = ids_of(smol, "ok 🎉")[:-1]  # cut inside the emoji's bytes
    detok, results = stream(smol, chat_prompt(smol), output)
    assert detok.output_text == "ok"
    assert detok.flush()[0] == smol.decode(output)[len("ok") :]
    assert detok.output_text == smol.decode(output)


def test_special_tokens_are_skipped_when_skip_special_tokens(smol: Tokenizer) -> None:
    output = ids_of(smol, "a<|im_end|>b")
    assert smol.eos_token_id in output
    detok, _ = stream(smol, [], output, SamplingParams(skip_special_tokens=True))
    detok.flush()
    assert detok.output_text == "ab"


def test_special_tokens_are_kept_when_not_skip_special_tokens(smol: Tokenizer) -> None:
    output = ids_of(smol, "a<|im_end|>b")
    detok, _ = stream(smol, [], output, SamplingParams(skip_special_tokens=False))
    detok.flush()
    assert detok.output_text == "a<|im_end|>b" == smol.decode(output, skip_special_tokens=False)


def test_cost_per_step_does_not_grow_with_sequence_length(smol: Tokenizer) -> None:
    decoded_lengths: list[int] = []

    class Counting(Tokenizer):
        def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
            decoded_lengths.append(len(token_ids))
            return super().decode(token_ids, skip_special_tokens)

    counting = Counting(smol.hf)
    output = ids_of(counting, CJK_EMOJI * 30)
    assert len(output) > 1000
    detok, _ = stream(counting, chat_prompt(counting), output, SamplingParams(stop=["STOP"]))
    detok.flush()
    assert detok.output_text == CJK_EMOJI * 30
    assert max(decoded_lengths) <= 10


# --- stop strings --------------------------------------------------------------------------


def assert_never_leaks(results: list[tuple[str, str | None]], before_stop: str) -> None:
    """After every step the text so far must be a prefix of the text before the stop."""
    so_far = ""
    for text, _ in results:
        so_far += text
        assert before_stop.startswith(so_far), so_far


def test_stop_string_spanning_several_tokens_is_never_emitted_even_partially(
    smol: Tokenizer,
) -> None:
    before, stop = "The answer is 42.", "<END_OF_ANSWER>"
    output = ids_of(smol, before + stop + " trailing text")
    assert len(ids_of(smol, stop)) >= 3
    detok, results = stream(smol, chat_prompt(smol), output, SamplingParams(stop=[stop]))
    assert_never_leaks(results, before)
    assert results[-1][1] == stop
    assert detok.output_text == before
    assert detok.flush()[0] == ""


def test_stop_string_completed_by_a_multibyte_character(smol: Tokenizer) -> None:
    before, stop = "ok ", "数据🎉"
    output = ids_of(smol, before + stop + "x")
    detok, results = stream(smol, [], output, SamplingParams(stop=[stop]))
    assert_never_leaks(results, before)
    assert results[-1] == ("", stop)
    assert detok.output_text == before


def test_include_stop_str_in_output_emits_the_stop_string_once_it_matched(
    smol: Tokenizer,
) -> None:
    before, stop = "The answer is 42.", "<END_OF_ANSWER>"
    output = ids_of(smol, before + stop + " trailing text")
    params = SamplingParams(stop=[stop], include_stop_str_in_output=True)
    detok, results = stream(smol, chat_prompt(smol), output, params)
    assert_never_leaks(results[:-1], before)  # still held back until it is whole
    assert results[-1][1] == stop
    assert detok.output_text == before + stop


def test_stop_string_overlapping_its_own_prefix_matches(smol: Tokenizer) -> None:
    # "ab" is held as the start of "abc", then "a" restarts it: the match begins in held text.
    output = [ids_of(smol, ch)[0] for ch in "xababcz"]
    detok, results = stream(smol, [], output, SamplingParams(stop=["abc"]))
    assert [text for text, _ in results] == ["x", "", "", "ab", "", ""]
    assert results[-1][1] == "abc"
    assert detok.output_text == "xab"


def test_stop_string_arriving_whole_in_one_step_truncates_the_step(smol: Tokenizer) -> None:
    output = ids_of(smol, "Hello STOP world")
    detok = IncrementalDetokenizer(smol, [], SamplingParams(stop=["STOP"]))
    assert detok.add_tokens(output) == ("Hello ", "STOP")


def test_stop_string_completing_first_wins(smol: Tokenizer) -> None:
    output = ids_of(smol, "one two three")
    detok, _ = stream(smol, [], output, SamplingParams(stop=["three", "two"]), step=1000)
    assert detok.output_text == "one "


def test_flush_returns_text_held_back_as_a_possible_stop_when_no_stop_matched(
    smol: Tokenizer,
) -> None:
    output = ids_of(smol, "Hello <END")
    detok, results = stream(smol, [], output, SamplingParams(stop=["<END_OF_ANSWER>"]))
    assert all(stop is None for _, stop in results)
    assert detok.output_text == "Hello "
    assert detok.flush()[0] == "<END"
    assert detok.output_text == "Hello <END"


def test_text_is_not_held_back_when_no_stop_strings(smol: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smol, [], SamplingParams())
    assert detok.add_tokens(ids_of(smol, "Hello <END")) == ("Hello <END", None)


def test_tokens_after_a_stop_string_are_ignored(smol: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smol, [], SamplingParams(stop=["STOP"]))
    detok.add_tokens(ids_of(smol, "a STOP"))
    assert detok.add_tokens(ids_of(smol, " more")) == ("", None)
    assert detok.flush()[0] == ""
    assert detok.output_text == "a "


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_stop_strings_skip_the_metadata_line(smol: Tokenizer, step: int) -> None:
    # A ChatGLM3 reply: a metadata line, then the content; "\n" stops only the content.
    output = ids_of(smol, "\nHello there\nsecond line")
    params = SamplingParams(stop=["\n"], metadata_line_names=[])
    detok, results = stream(smol, [], output, params, step=step)
    assert results[-1][1] == "\n"
    assert detok.output_text == "\nHello there"


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_a_tool_name_metadata_line_is_skipped_too(smol: Tokenizer, step: int) -> None:
    output = ids_of(smol, "get_weather\ntool_call(city='Paris')")
    params = SamplingParams(stop=["weather", "city"], metadata_line_names=["get_weather"])
    detok, results = stream(smol, [], output, params, step=step)
    assert results[-1][1] == "city"
    assert detok.output_text == "get_weather\ntool_call("


@pytest.mark.parametrize("step", [1, 2, 1000])
@pytest.mark.parametrize("names", [[], ["get_weather"]])
def test_a_first_line_that_is_no_metadata_is_content_for_stop_strings(
    smol: Tokenizer, step: int, names: list[str]
) -> None:
    """A reply that skips the metadata line: its first line is text, and stops apply to it
    (they once waited for a first newline that might never come)."""
    output = ids_of(smol, "Hello STOP there")
    params = SamplingParams(stop=["STOP"], metadata_line_names=names)
    detok, results = stream(smol, [], output, params, step=step)
    assert results[-1][1] == "STOP"
    assert detok.output_text == "Hello "


def test_a_first_line_held_as_possible_metadata_and_ended_is_content(smol: Tokenizer) -> None:
    """A reply that ends (eos, max_tokens) on a line held as a possible tool name has no
    metadata line: that line is its content, so stop strings apply to it at the end."""
    output = ids_of(smol, "get_wea")
    params = SamplingParams(stop=["wea"], metadata_line_names=["get_weather"])
    detok, results = stream(smol, [], output, params)
    assert all(text == "" for text, _ in results)
    assert detok.flush() == ("get_", "wea") and detok.output_text == "get_"
    # No stop string in it: all of it, and a possible start of one too.
    params = SamplingParams(stop=["weather"], metadata_line_names=["get_weather"])
    detok, _ = stream(smol, [], output, params)
    assert detok.flush() == ("get_wea", None) and detok.output_text == "get_wea"
    # Within min_tokens, no stop string counts.
    params = SamplingParams(stop=["wea"], metadata_line_names=["get_weather"], min_tokens=9)
    detok, _ = stream(smol, [], output, params)
    assert detok.flush() == ("get_wea", None)


def test_a_stop_string_in_text_held_for_a_cut_character_ends_it_at_flush(
    smol: Tokenizer,
) -> None:
    """SmolLM2's token 10003 is "о" and the first byte of another Cyrillic letter: its text is
    held for the rest of that letter. Ended there (length, eos), the held text was emitted
    without a look for stop strings: "о�" came out past the stop string "о"."""
    assert smol.decode([10003]) == "о\ufffd"
    detok, results = stream(smol, [], [10003], SamplingParams(stop=["о"]))
    assert results == [("", None)]
    assert detok.flush() == ("", "о") and detok.output_text == ""
    detok, _ = stream(
        smol, [], [10003], SamplingParams(stop=["о"], include_stop_str_in_output=True)
    )
    assert detok.flush() == ("о", "о")
    detok, _ = stream(smol, [], [10003], SamplingParams(stop=["x"]))
    assert detok.flush() == ("о\ufffd", None)  # no stop string: all of it, as before


@pytest.mark.parametrize("step", [1, 3])
def test_stop_strings_count_only_after_min_tokens(smol: Tokenizer, step: int) -> None:
    # As in vLLM: like eos, a stop string cannot end the output within its first min_tokens
    # tokens; the first one completed after them does.
    output = [ids_of(smol, ch)[0] for ch in "a.b.c.d.e"]
    params = SamplingParams(stop=["."], min_tokens=4)
    detok, results = stream(smol, [], output, params, step=step)
    assert results[-1][1] == "."
    assert detok.output_text == "a.b.c"
    # min_tokens tokens with no stop string among them change nothing.
    detok, results = stream(smol, [], output, SamplingParams(stop=["."], min_tokens=1))
    assert detok.output_text == "a"


def test_a_stop_string_begun_before_min_tokens_and_ended_after_counts(smol: Tokenizer) -> None:
    # As in vLLM, whose check looks back over the stop string's length from each new token.
    output = [ids_of(smol, ch)[0] for ch in "abcd"]
    detok, results = stream(smol, [], output, SamplingParams(stop=["bc"], min_tokens=2))
    assert results == [("a", None), ("", None), ("", "bc")]
    assert detok.output_text == "a"
    # Ended within min_tokens, it does not count, and its text is released.
    detok, results = stream(smol, [], output, SamplingParams(stop=["bc"], min_tokens=3))
    assert [r[1] for r in results] == [None] * 4 and detok.output_text == "abcd"


@pytest.mark.parametrize("names", [None, ["get_weather"]])
def test_min_tokens_hold_for_a_first_line_held_as_possible_metadata(
    smol: Tokenizer, names: list[str] | None
) -> None:
    """A first line held while it might name a tool, then found to be content, is checked for
    stop strings as it would have been unheld: none may end within min_tokens."""
    output = [ids_of(smol, piece)[0] for piece in ("g", "e", "t")] + ids_of(smol, " is here")
    params = SamplingParams(stop=["ge"], min_tokens=3, metadata_line_names=names)
    detok, results = stream(smol, [], output, params)
    assert all(stop is None for _, stop in results)
    assert detok.output_text + detok.flush()[0] == "get is here"


def test_min_tokens_keeps_the_metadata_line_unchecked(smol: Tokenizer) -> None:
    output = ids_of(smol, "\nHello there\nsecond line")
    params = SamplingParams(stop=["\n"], metadata_line_names=[], min_tokens=1)
    detok, results = stream(smol, [], output, params)
    assert results[-1][1] == "\n"
    assert detok.output_text == "\nHello there"


def test_kept_special_tokens_are_written_and_the_others_skipped(smol: Tokenizer) -> None:
    start, end = smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")
    output = ids_of(smol, "a") + [start] + ids_of(smol, "b") + [end] + ids_of(smol, "c")
    params = SamplingParams(keep_special_token_ids=[start])
    detok, _ = stream(smol, chat_prompt(smol), output, params)
    assert detok.output_text == "a<|im_start|>bc"


def test_plain_and_special_encodes_on_threads_at_once_do_not_race(smol: Tokenizer) -> None:
    """Large prompts are tokenized on worker threads while others are tokenized on the event
    loop; text read as plain (a typed "<|im_start|>" stays text) and as a template (it is the
    control token) must each come out right, and neither may fail."""
    marker = "<|im_start|>"
    plain, special = smol.encode_plain(marker), smol.encode(marker, add_special_tokens=False)
    assert plain != special and len(special) == 1
    problems: list[str] = []

    def repeat(fn, want) -> None:
        try:
            for _ in range(300):
                if fn(marker) != want:
                    problems.append(f"{fn.__name__} gave other ids")
        except Exception as e:  # noqa: BLE001 (tokenizers' "Already borrowed" among them)
            problems.append(repr(e))

    def big() -> None:
        for _ in range(3):
            smol.encode("hello world, " * 20_000)

    run_at_once(
        lambda: repeat(smol.encode_plain, plain),
        lambda: repeat(lambda t: smol.encode(t, False), special),
        big,
    )
    assert not problems, problems[:3]


def test_plain_text_is_not_cut_by_a_truncation_saved_in_tokenizer_json(
    smol: Tokenizer, tmp_path: Path
) -> None:
    """Some uploads save a truncation (or padding) in tokenizer.json; transformers turns it off
    for each call, and the tokenizer of plain text must not keep it either."""
    smol.hf.backend_tokenizer.enable_truncation(max_length=8)
    try:
        smol.hf.save_pretrained(str(tmp_path))
    finally:
        smol.hf.backend_tokenizer.no_truncation()
    saved = Tokenizer.from_dir(tmp_path)
    text = " ".join(["word"] * 20)
    assert len(saved.encode(text, add_special_tokens=False)) == 20
    assert saved.encode_plain(text) == saved.encode(text, add_special_tokens=False)
