"""Engine behaviour: prefix caching, preemption, abort, seeds, stopping."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

import ember
from ember.engine.request import SamplingParams, fan_out

from checkpoints import TINY_VOCAB


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


def test_shared_prefix_hits_the_cache_and_changes_nothing(tiny_llama):
    cached = ember.LLM(str(tiny_llama), dtype="float32", block_size=4)
    uncached = ember.LLM(
        str(tiny_llama), dtype="float32", block_size=4, enable_prefix_caching=False
    )
    prefix = _ids(40, seed=1)
    first, second = prefix + _ids(5, seed=2), prefix + _ids(7, seed=3)
    cached.generate([first], _greedy(10))
    hits_before = cached.engine.allocator.prefix_hits
    result = cached.generate([second], _greedy(10))[0]
    assert result.num_cached_tokens == 40  # ten full blocks of four
    assert cached.engine.allocator.prefix_hits - hits_before == 40
    expected = uncached.generate([second], _greedy(10))[0]
    assert result.outputs[0].token_ids == expected.outputs[0].token_ids
    assert uncached.engine.allocator.prefix_hits == 0


def test_whole_prompt_in_cache_still_computes_the_last_token(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32", block_size=4)
    prompt = _ids(16, seed=4)  # exactly four blocks
    a = llm.generate([prompt], _greedy(6))[0]
    b = llm.generate([prompt], _greedy(6))[0]
    assert b.num_cached_tokens == 12
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_small_kv_pool_preempts_and_still_gives_the_same_output(tiny_llama):
    prompts = [_ids(10 + 3 * i, seed=10 + i) for i in range(12)]
    roomy = ember.LLM(str(tiny_llama), dtype="float32", block_size=4)
    # 3 layers * 2 * 4 tokens * 2 heads * 16 dims * 4 bytes = 3 KiB a block: 40 blocks.
    tight = ember.LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory="120KiB")
    assert tight.engine.allocator.num_blocks == 40
    want = [r.outputs[0].token_ids for r in roomy.generate(prompts, _greedy(24))]
    got = [r.outputs[0].token_ids for r in tight.generate(prompts, _greedy(24))]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == want
    assert tight.engine.allocator.num_free_blocks == 40


def test_abort_frees_every_block(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32", block_size=4, enable_prefix_caching=False)
    engine = llm.engine
    total = engine.allocator.num_blocks
    for i in range(6):
        engine.add_request(f"r{i}", _ids(30, seed=i), _greedy(50))
    for _ in range(5):
        engine.step()
    assert engine.allocator.num_free_blocks < total
    for i in range(6):
        assert engine.abort(f"r{i}")
    assert engine.allocator.num_free_blocks == total
    assert not engine.has_work()


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32", block_size=4)
    prompt = _ids(12, seed=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    others = [_ids(5 + i, seed=100 + i) for i in range(7)]
    noisy = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(others[:3] + [prompt] + others[3:], [noisy] * 3 + [seeded] + [noisy] * 4)
    assert mixed[3].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate([prompt], other_seed)[0].outputs[0].token_ids != alone
    # Seeds are 64-bit: ones that differ only above the low 32 bits draw differently too.
    high = [dataclasses.replace(seeded, seed=1234 + k * 2**32) for k in (1, 2**31)]
    drawn = [llm.generate([prompt], p)[0].outputs[0].token_ids for p in high]
    assert alone != drawn[0] != drawn[1] != alone
    # A request's n samples take consecutive seeds; where they cross zero, all still differ.
    fanned = dataclasses.replace(seeded, n=4, seed=-2)
    samples = [o.token_ids for o in llm.generate([prompt], fanned)[0].outputs]
    assert len({tuple(t) for t in samples}) == 4
    # Nor does one of them land on -1, which means no seed: its draw is reproducible too.
    assert [p.seed for p in fan_out(fanned, 4)] == [-2, 2**64 - 1, 0, 1]
    # -1 is no seed at all, as vLLM reads it: two requests draw differently.
    unseeded = dataclasses.replace(seeded, seed=-1)
    assert unseeded.seed is None
    twice = [llm.generate([prompt], unseeded)[0].outputs[0].token_ids for _ in range(2)]
    assert twice[0] != twice[1]


def test_max_tokens_and_stop_token_ids_end_sequences(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32")
    prompt = _ids(8, seed=6)
    free = llm.generate([prompt], _greedy(10))[0].outputs[0]
    assert len(free.token_ids) == 10 and free.finish_reason == "length"
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    stopped = llm.generate([prompt], _greedy(10, stop_token_ids=[stop_at]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at
    assert stopped.token_ids == free.token_ids[: first + 1]


def test_stop_string_ends_the_text_before_it(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32")
    prompt = _ids(8, seed=7)
    free = llm.generate([prompt], _greedy(16))[0].outputs[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate([prompt], _greedy(16, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_min_tokens_holds_back_stop_strings(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32")
    # A greedy output whose token at index 1 comes again later: that token's text is the stop.
    for seed in range(50):
        prompt = _ids(8, seed=seed)
        free = llm.generate([prompt], _greedy(24))[0].outputs[0]
        stop = llm.tokenizer.decode(free.token_ids[1:2])
        if stop.strip() and stop in llm.tokenizer.decode(free.token_ids[4:]):
            break
    else:
        pytest.fail("no output repeats its second token")
    assert (
        llm.generate([prompt], _greedy(24, stop=[stop]))[0].outputs[0].text
        == free.text[: free.text.index(stop)]
    )
    # Completed within the first min_tokens tokens, it does not count (stop ids are masked
    # there instead: test_sampler), so the output runs on to its next occurrence.
    held = SamplingParams(temperature=0, max_tokens=24, stop=[stop], min_tokens=3)
    out = llm.generate([prompt], held)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == free.token_ids[: len(out.token_ids)] and len(out.token_ids) > 3
    head = llm.tokenizer.decode(free.token_ids[:3])
    assert out.text == head + free.text[len(head) :].split(stop)[0]


def test_a_first_line_held_as_possible_metadata_is_stop_checked_when_the_output_ends(
    tiny_llama,
):
    """ChatGLM3 holds a reply's first line while it may still name a tool. One ended by
    max_tokens was no metadata line but content, so a stop string in it ends the output."""
    llm = ember.LLM(str(tiny_llama), dtype="float32")
    for seed in range(50):
        prompt = _ids(8, seed=seed)
        free = llm.generate([prompt], _greedy(6))[0].outputs[0]
        if "\n" not in free.text and len(free.text.strip()) > 4:
            break
    else:
        pytest.fail("no output without a newline")
    text = free.text
    held = dict(metadata_line_names=[text + "zzz"])  # the whole output may begin that name
    assert llm.generate([prompt], _greedy(6, **held))[0].outputs[0].text == text
    stop = text[2:4]
    out = llm.generate([prompt], _greedy(6, stop=[stop], **held))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_logprobs_come_with_top_alternatives(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32")
    out = llm.generate([_ids(8, seed=8)], _greedy(5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.rank == 1  # greedy picks the top token
        assert len(lp.top) == 3 and lp.top[0][0] == token
        assert lp.logprob <= 0


def test_context_length_ends_generation(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32", max_model_len=20)
    out = llm.generate([_ids(15, seed=9)], _greedy(100))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_max_model_len_past_the_models_positions_is_refused(tiny_llama):
    own = json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=f"--max-model-len {own + 1} is longer than the {own}"):
        ember.LLM(str(tiny_llama), dtype="float32", max_model_len=own + 1)


def test_a_kv_cache_too_small_for_one_block_is_refused_with_the_sizes(tiny_llama):
    with pytest.raises(ValueError, match=r"no room for the KV cache: --kv-cache-memory leaves"):
        ember.LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory="1KiB")


def test_parallel_samples_of_one_prompt_share_its_blocks(tiny_llama):
    llm = ember.LLM(str(tiny_llama), dtype="float32", block_size=4)
    engine = llm.engine
    prompt = _ids(33, seed=11)  # eight full blocks and one token
    for i in range(4):
        engine.add_request(f"s{i}", prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=3))
    engine.step()  # all four admitted in one step
    tables = [s.block_table for s in engine.scheduler.running]
    assert len(tables) == 4
    assert all(t[:8] == tables[0][:8] for t in tables)  # the prompt's full blocks, shared
    assert engine.allocator.prefix_hits == 3 * 32
    while engine.has_work():
        engine.step()
    shared = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, n=3))[0]
    alone = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6))[0]
    assert all(o.token_ids == alone.outputs[0].token_ids for o in shared.outputs)


def test_prompt_logprobs_match_transformers(tiny_llama):
    import torch

    from checkpoints import _reference_model

    # A small token budget splits the prompt into chunks; scoring must stay aligned.
    llm = ember.LLM(str(tiny_llama), dtype="float32", block_size=4, max_num_batched_tokens=8)
    prompt = _ids(21, seed=12)
    llm.generate([prompt], _greedy(2))  # a cached copy must not be used for scoring
    result = llm.generate([prompt], _greedy(2, prompt_logprobs=2))[0]
    got = result.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(_reference_model(tiny_llama)(torch.tensor([prompt])).logits[0], -1)
    for pos, lp in enumerate(got[1:], start=1):
        assert lp.token_id == prompt[pos]
        assert abs(lp.logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        assert lp.rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1
        assert [t for t, _ in lp.top] == torch.topk(ref[pos - 1], 2).indices.tolist()
    # With n samples, the request still carries them once (the first sample computes them).
    shared = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=2, n=3, prompt_logprobs=2)
    )[0]
    assert len(shared.outputs) == 3
    assert [lp and lp.token_id for lp in shared.prompt_logprobs] == [None, *prompt[1:]]
    assert [lp.logprob for lp in shared.prompt_logprobs[1:]] == pytest.approx(
        [lp.logprob for lp in got[1:]], abs=1e-5
    )


def test_prompt_logprobs_survive_a_preemption_mid_prefill(tiny_llama):
    """A request preempted while its chunked prompt is being scored is recomputed in chunks of
    other edges; scoring used to wait for one starting exactly where it stopped, and the
    result came back short (197 or 24 of 230 entries)."""
    rng = random.Random(9)
    short = [rng.randrange(3, TINY_VOCAB) for _ in range(40)]
    long = [rng.randrange(3, TINY_VOCAB) for _ in range(230)]
    kw = dict(dtype="float32", block_size=8, max_num_batched_tokens=48)
    scored = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    alone = ember.LLM(str(tiny_llama), **kw).generate([long], scored)[0].prompt_logprobs
    tight = ember.LLM(str(tiny_llama), **kw, kv_cache_memory="200KiB")
    busy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    got = tight.generate([short, long], [busy, scored])[1].prompt_logprobs
    assert tight.engine.stats().num_preemptions > 0  # else this tests nothing
    assert len(got) == len(long) and got[0] is None
    assert [lp.token_id for lp in got[1:]] == long[1:]
    assert [lp.logprob for lp in got[1:]] == pytest.approx(
        [lp.logprob for lp in alone[1:]], abs=1e-5
    )


def test_a_cuda_device_keeps_its_index_and_binds_each_thread(monkeypatch):
    """CUDA's current device is per thread and Triton launches on it: the runner names its
    GPU with an index and makes it current on the threads that run the model."""
    import torch

    from ember.engine import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert runner.pick_device("cuda") == torch.device("cuda", 2)
    assert runner.pick_device("cuda:1") == torch.device("cuda", 1)
    assert runner.pick_device("auto") == torch.device("cuda", 2)
    assert runner.pick_device("cpu") == torch.device("cpu")
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    bound = runner.ModelRunner.__new__(runner.ModelRunner)
    bound.device = torch.device("cuda", 1)
    bound.bind_thread()
    bound.device = torch.device("cpu")
    bound.bind_thread()
    assert made_current == [torch.device("cuda", 1)]


def test_embedding_is_prefilled_in_budget_sized_chunks_and_matches_transformers(tiny_llama):
    import torch

    from checkpoints import _reference_model

    # A token budget of 8 splits a 29-token input into 4 chunks that read the cached prefix.
    llm = ember.LLM(str(tiny_llama), dtype="float32", block_size=4, max_num_batched_tokens=8)
    prompt = _ids(29, seed=13)
    got = torch.tensor(llm.embed(prompt)[0])
    with torch.no_grad():
        hidden = _reference_model(tiny_llama).model(torch.tensor([prompt])).last_hidden_state[0]
    want = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert llm.engine.allocator.usage() == 0.0  # its blocks went back to the pool
    text = "hello world"
    assert llm.embed(text) == llm.embed([llm.tokenizer.encode(text)])
    # Sharing passes with another input splits it into other chunks: equal up to rounding.
    assert llm.embed([text, prompt])[1] == pytest.approx(llm.embed(prompt)[0], abs=1e-6)


def test_an_embedding_input_may_fill_the_context_but_not_pass_it(tiny_llama):
    from ember.engine.core import PromptError

    llm = ember.LLM(str(tiny_llama), dtype="float32", block_size=4, max_model_len=32)
    assert len(llm.engine.embed(_ids(32, seed=14))) > 0
    with pytest.raises(PromptError, match="maximum context length is 32 tokens; the input has 33"):
        llm.engine.embed(_ids(33, seed=14))
    with pytest.raises(PromptError, match="outside the vocabulary"):
        llm.engine.embed([TINY_VOCAB])
    with pytest.raises(PromptError, match="at least one token"):
        llm.engine.embed([])
    assert llm.engine.allocator.usage() == 0.0


def test_a_lora_adapter_beside_the_model_is_not_read_as_its_weights(tmp_path):
    """A PEFT adapter saved into the model's folder was loaded as model weights (a KeyError)."""
    from safetensors.torch import save_file

    from checkpoints import write_checkpoint

    model_dir = write_checkpoint(tmp_path / "m")
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)}
    save_file(lora, str(model_dir / "adapter_model.safetensors"))
    llm = ember.LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB")
    params = ember.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(llm.generate([[1, 5, 9]], params)[0].outputs[0].token_ids) == 3


def test_a_cut_safetensors_file_is_named_as_such(tmp_path):
    from checkpoints import write_checkpoint

    model_dir = write_checkpoint(tmp_path / "m")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file.*fetch it again"):
        ember.LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB")


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_with_biases_everywhere_matches_transformers(tmp_path, bias):
    """transformers' Llama puts attention_bias on o_proj too, and mlp_bias on all three MLP
    layers; Ember had no place for them ("unexpected weight ... o_proj.bias")."""
    from checkpoints import reference_greedy, write_checkpoint

    model_dir = write_checkpoint(tmp_path / "m", **{bias: True})
    llm = ember.LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB")
    prompt = _ids(12, seed=21)
    params = ember.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    got = llm.generate([prompt], params)[0].outputs[0].token_ids
    assert got == reference_greedy(model_dir, prompt, 12)
