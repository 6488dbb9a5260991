"""AsyncEngine: streams per request from the engine thread, abort, bad input."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from ember.config import EngineConfig, from_env
from ember.engine.async_engine import AsyncEngine
from ember.engine.core import EngineCore, PromptError
from ember.engine.request import SamplingParams

from checkpoints import TINY_VOCAB


@pytest.fixture(scope="module")
def engine(tiny_llama):
    cfg = from_env(EngineConfig, model=str(tiny_llama), dtype="float32", block_size=4)
    eng = AsyncEngine(EngineCore(cfg))
    yield eng
    eng.shutdown()


def _tiny_engine(tiny_llama, admission=None, **settings) -> AsyncEngine:
    cfg = from_env(EngineConfig, model=str(tiny_llama), dtype="float32", block_size=4, **settings)
    return AsyncEngine(EngineCore(cfg), admission)


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


async def _collect(engine, ids, params, rid):
    tokens, text, last = [], "", None
    async for out in engine.generate(ids, params, rid):
        tokens += out.new_token_ids
        text += out.new_text
        last = out
    return tokens, text, last


def test_concurrent_streams_match_the_offline_engine(engine, tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [_ids(5 + 4 * i, seed=i) for i in range(8)]

    async def main():
        return await asyncio.gather(
            *(_collect(engine, p, params, f"c{i}") for i, p in enumerate(prompts))
        )

    results = asyncio.run(main())
    want = tiny_llm.generate(prompts, params)
    for (tokens, text, last), ref in zip(results, want):
        assert tokens == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text
        assert last.finished and last.finish_reason == "length"


def test_abandoned_stream_frees_its_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    total = engine.core.allocator.num_blocks

    async def main():
        agen = engine.generate(_ids(30, seed=50), params, "gone")
        async for _ in agen:
            break  # the client went away after the first token
        await agen.aclose()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not engine.core.has_work():
                break

    asyncio.run(main())
    assert not engine.core.has_work()
    assert engine.core.allocator.num_free_blocks == total


def test_bad_prompt_is_refused_before_streaming(engine):
    async def main():
        async for _ in engine.generate([], SamplingParams(), "empty"):
            pass

    with pytest.raises(PromptError):
        asyncio.run(main())
    with pytest.raises(PromptError):
        asyncio.run(_collect(engine, [TINY_VOCAB + 5], SamplingParams(), "oov"))


def test_admission_counts_work_at_the_check_and_gives_it_back(tiny_llama):
    import gc

    from ember.engine.async_engine import Admission, EngineOverloadedError

    cfg = from_env(EngineConfig, model=str(tiny_llama), dtype="float32", block_size=4)
    eng = AsyncEngine(EngineCore(cfg), Admission(max_waiting_requests=2, max_waiting_tokens=0))
    try:
        first = eng.check_admission(1, 5)
        second = eng.check_admission(1, 5)  # counted at once: a burst cannot slip past
        with pytest.raises(EngineOverloadedError) as e:
            eng.check_admission(1, 5)
        assert e.value.retry_after >= 1
        del first, second  # tickets no generate() took are given back
        gc.collect()
        assert (eng.waiting_seqs, eng.waiting_tokens) == (0, 0)
        ticket = eng.check_admission(1, 5)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        tokens, _, last = asyncio.run(_collect_with(eng, _ids(5, seed=3), params, "t", ticket))
        assert len(tokens) == 3 and last.finished
        del ticket
        gc.collect()
        assert (eng.waiting_seqs, eng.waiting_tokens) == (0, 0)
    finally:
        eng.shutdown()


def test_samples_of_one_prompt_are_admitted_for_one_prompts_work(tiny_llama):
    """The n samples of a request share its prompt through the prefix cache, so admission
    counts the prompt once (plus each copy's last block), not n times over."""
    from ember.engine.async_engine import Admission

    prompt = _ids(30, seed=4)  # 7 full blocks of 4, and 2 tokens: each copy computes those 2
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=1)
    eng = _tiny_engine(tiny_llama, Admission(max_waiting_requests=0, max_waiting_tokens=70))
    cold = _tiny_engine(tiny_llama, enable_prefix_caching=False)
    try:
        jobs = [(prompt, params)] * 4
        assert eng.prompt_work(jobs) == 30 + 3 * 2
        assert cold.prompt_work(jobs) == 4 * 30  # nothing to share
        scored = SamplingParams(prompt_logprobs=0)  # every position computed: no cache hits
        assert eng.prompt_work([(prompt, scored)] * 2) == 60
        assert eng.prompt_work([(prompt, params), (_ids(9, seed=5), params)]) == 39

        # 36 tokens waiting, so a 30-token request still fits the bound of 70 (4 x 30 would
        # have left no room for it).
        ticket = eng.check_admission(4, eng.prompt_work(jobs))
        other = eng.check_admission(1, 30)
        del other

        async def main(ticket):
            return await asyncio.gather(
                *(_collect_with(eng, ids, p, f"s{i}", ticket) for i, (ids, p) in enumerate(jobs))
            )

        results = asyncio.run(main(ticket))
        assert all(len(tokens) == 3 and last.finished for tokens, _, last in results)
        del ticket
        import gc

        gc.collect()
        assert (eng.waiting_seqs, eng.waiting_tokens) == (0, 0)  # what each took is given back
    finally:
        eng.shutdown()
        cold.shutdown()


async def _collect_with(engine, ids, params, rid, ticket):
    tokens, text, last = [], "", None
    async for out in engine.generate(ids, params, rid, ticket):
        tokens += out.new_token_ids
        text += out.new_text
        last = out
    return tokens, text, last


def test_engine_death_fails_every_open_request_and_reports(tiny_llama):
    from ember.engine.async_engine import EngineDeadError
    from ember.engine.faults import Faults

    deaths = []
    cfg = from_env(EngineConfig, model=str(tiny_llama), dtype="float32", block_size=4)
    core = EngineCore(cfg)
    core.faults = Faults(step_ids=frozenset({2}))  # _ids() never draws ids below 3
    eng = AsyncEngine(core, on_death=deaths.append)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        async def run(ids, rid):
            try:
                await _collect(eng, ids, long, rid)
            except EngineDeadError:
                return "dead"
            return "finished"

        others = [asyncio.create_task(run(_ids(6, seed=i), f"o{i}")) for i in range(3)]
        await asyncio.sleep(0)  # the others are queued first
        fatal = await run([2, 8, 9], "fatal")
        return fatal, await asyncio.gather(*others)

    try:
        fatal, others = asyncio.run(main())
        assert fatal == "dead" and others == ["dead"] * 3
        for _ in range(500):  # the engine thread reports once the streams have their errors
            if deaths:
                break
            time.sleep(0.01)
        assert len(deaths) == 1 and eng.error is not None
        with pytest.raises(EngineDeadError):
            asyncio.run(_collect(eng, _ids(4, seed=9), long, "late"))
    finally:
        eng.shutdown()


def test_a_long_embedding_lets_streams_step_between_its_chunks(tiny_llama):
    eng = _tiny_engine(tiny_llama, max_num_batched_tokens=8)
    total = eng.core.allocator.num_blocks
    steps: list[int] = []  # engine steps run so far
    chunks: list[int] = []  # the step count when each embedding chunk ran
    tokens: list[int] = []
    step, advance = eng.core.step, eng.core.embed_step

    def counting_step():
        steps.append(1)
        return step()

    jobs: list[int] = []  # the request (batch) each chunk belonged to

    def counting_advance(batch):
        chunks.append(len(steps))
        jobs.append(id(batch))
        return advance(batch)

    eng.core.step, eng.core.embed_step = counting_step, counting_advance
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def stream():
        async for out in eng.generate(_ids(6, seed=3), params, "s"):
            tokens.extend(out.new_token_ids)

    async def main():
        task = asyncio.create_task(stream())
        while not tokens:
            await asyncio.sleep(0.001)
        vec = await eng.embed(_ids(40, seed=4))  # 5 chunks of the 8-token budget
        await task
        return vec

    try:
        vec = asyncio.run(main())
        assert len(chunks) == 5
        assert all(b > a for a, b in zip(chunks, chunks[1:])), chunks  # steps in between
        want = asyncio.run(eng.call(lambda core: core.embed(_ids(40, seed=4))))
        assert vec == pytest.approx(want, abs=1e-6)

        async def cancelled():
            begun = len(chunks)
            task = asyncio.create_task(eng.embed(_ids(40, seed=5)))
            while len(chunks) < begun + 2:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await eng.call(lambda core: None)  # after the posted clean-up

        asyncio.run(cancelled())
        assert eng.core.allocator.num_free_blocks == total

        async def two_at_once():
            del jobs[:]
            await asyncio.gather(eng.embed(_ids(24, seed=8)), eng.embed(_ids(24, seed=9)))
            await eng.call(lambda core: None)

        asyncio.run(two_at_once())
        assert len(jobs) == 6 and len(set(jobs)) == 2  # three budget-sized passes each,
        assert jobs[0] != jobs[1]  # taking turns
        assert eng.core.allocator.num_free_blocks == total
    finally:
        eng.shutdown()


def test_short_embedding_inputs_share_forward_passes_and_equal_their_single_vectors(tiny_llama):
    eng = _tiny_engine(tiny_llama, max_num_batched_tokens=16)
    total = eng.core.allocator.num_blocks
    passes: list[list[int]] = []  # the chunk lengths of each forward pass
    chunks = eng.core.runner.embed_chunks

    def counting(parts):
        passes.append([end - start for _, _, start, end in parts])
        return chunks(parts)

    # Ten inputs of 5 tokens, a 20-token one and a 3-token one under a budget of 16: every
    # pass but the last is full, inputs split across passes as chunked prefill splits them.
    inputs = [_ids(5, seed=20 + i) for i in range(10)] + [_ids(20, seed=40), _ids(3, seed=41)]
    try:
        alone = [asyncio.run(eng.embed(ids)) for ids in inputs]
        eng.core.runner.embed_chunks = counting
        together = asyncio.run(eng.embed_all(inputs))
        asyncio.run(eng.call(lambda core: None))  # after the posted clean-up
        assert passes == [[5, 5, 5, 1], [4, 5, 5, 2], [3, 5, 5, 3], [2, 14], [6, 3]]
        for got, want in zip(together, alone):
            assert got == pytest.approx(want, abs=1e-5)
        assert eng.core.allocator.num_free_blocks == total
    finally:
        eng.shutdown()


def test_embedding_inputs_start_only_as_the_kv_room_allows(tiny_llama):
    from ember.engine.core import EmbeddingBatch

    eng = _tiny_engine(tiny_llama, kv_cache_memory="64KiB", max_num_batched_tokens=512)
    core = eng.core
    try:
        free = core.allocator.num_free_blocks
        size = (free // 2) * 4  # two such inputs fill the pool
        inputs = [_ids(size, seed=50 + i) for i in range(3)]
        batch = EmbeddingBatch(inputs)
        assert not core.embed_step(batch)  # the third waited for room
        assert batch.next == 2 and batch.vectors[2] is None and None not in batch.vectors[:2]
        assert core.embed_step(batch) and core.allocator.num_free_blocks == free
        assert [len(v) for v in batch.vectors] == [len(batch.vectors[0])] * 3
        assert batch.vectors[2] == pytest.approx(core.embed(inputs[2]), abs=1e-5)
    finally:
        eng.shutdown()


def test_an_embedding_without_room_in_the_kv_cache_is_overloaded_not_lost(tiny_llama):
    from ember.engine.async_engine import EngineOverloadedError

    eng = _tiny_engine(tiny_llama, kv_cache_memory="64KiB")
    capacity = eng.core.allocator.num_blocks * 4
    params = SamplingParams(temperature=0, max_tokens=capacity // 2, ignore_eos=True)
    started = asyncio.Event()

    async def stream():
        async for _ in eng.generate(_ids(capacity // 2 - 4, seed=6), params, "big"):
            started.set()

    async def main():
        task = asyncio.create_task(stream())
        await started.wait()
        with pytest.raises(EngineOverloadedError) as e:
            await eng.embed(_ids(capacity // 2 + 8, seed=7))
        assert e.value.retry_after >= 1 and "retry" in str(e.value)
        await task  # the stream it met goes on to the end
        vec = await eng.embed(_ids(capacity // 2 + 8, seed=7))  # room again
        await eng.call(lambda core: None)  # after the posted clean-up
        return vec

    try:
        assert len(asyncio.run(main())) > 0
        assert eng.core.allocator.num_free_blocks == eng.core.allocator.num_blocks
    finally:
        eng.shutdown()


def test_embeddings_count_against_admission_and_the_request_timeout(tiny_llama):
    from ember.engine.async_engine import (
        Admission,
        EngineOverloadedError,
        RequestTimeoutError,
    )

    eng = _tiny_engine(tiny_llama, Admission(max_waiting_requests=1), max_num_batched_tokens=4)
    total = eng.core.allocator.num_blocks
    try:

        async def two():
            first = asyncio.create_task(eng.embed_all([_ids(60, seed=1)]))
            await asyncio.sleep(0)  # the first is admitted and counted
            with pytest.raises(EngineOverloadedError):
                await eng.embed_all([_ids(8, seed=2)])
            with pytest.raises(PromptError):  # bad input: refused before admission
                await eng.embed_all([_ids(8, seed=2), []])
            return await first

        assert len(asyncio.run(two())[0]) > 0
        assert eng.waiting_seqs == 0 and eng.waiting_tokens == 0

        # 60 chunks of a 4-token budget take several times longer, so the timer fires even
        # when a loaded host starves the event loop (with 15 it once finished first).
        eng.request_timeout = 0.02
        with pytest.raises(RequestTimeoutError):
            asyncio.run(eng.embed_all([_ids(240, seed=3)]))
        # That loop closed with a chunk still running; its result has nowhere to go, and
        # the engine must go on.
        time.sleep(0.2)
        assert eng.error is None
        asyncio.run(eng.call(lambda core: None))  # after the posted clean-up
        assert eng.core.allocator.num_free_blocks == total
        assert eng.waiting_seqs == 0 and eng.waiting_tokens == 0
    finally:
        eng.shutdown()


def test_retry_after_follows_the_rate_waiting_prompts_drain_not_decode_speed(tiny_llama):
    """Retry-After estimates when waiting prompts will have started: prefill speed counts,
    the decode steps of a long stream with nothing waiting do not (they ran the estimate up
    to its 60 s cap, so clients slept far longer than the queue took)."""
    eng = _tiny_engine(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)

    async def stream() -> float:
        """Decode tokens per second of one stream, after its first token."""
        times = []
        async for out in eng.generate(_ids(200, seed=3), params, "long"):
            times += [time.perf_counter()] * len(out.new_token_ids)
        return (len(times) - 1) / (times[-1] - times[0])

    try:
        decode_rate = asyncio.run(stream())
        # Work the size of 10 s of this decoding waits: prefill clears it far sooner.
        assert eng.retry_after(int(10 * decode_rate)) <= 3
        assert eng.retry_after(10**9) == 60  # capped
    finally:
        eng.shutdown()


def test_embedding_requests_short_of_kv_room_wait_for_each_other(tiny_llama):
    """Two requests whose inputs cannot hold KV blocks at once: the second waits for the
    first's blocks (they come back as its inputs finish), rather than being refused."""
    eng = _tiny_engine(tiny_llama, kv_cache_memory="64KiB", max_num_batched_tokens=8)
    core = eng.core
    try:
        free = core.allocator.num_free_blocks
        size = (free // 2 + 1) * 4  # two such inputs never fit together

        async def both():
            return await asyncio.gather(
                eng.embed_all([_ids(size, seed=60)]), eng.embed_all([_ids(size, seed=61)])
            )

        first, second = asyncio.run(both())
        assert len(first[0]) == len(second[0]) > 0
        asyncio.run(eng.call(lambda core: None))  # after the posted clean-ups
        assert core.allocator.num_free_blocks == free
    finally:
        eng.shutdown()
