"""AsyncEngine: streams per request from the engine thread, abort, bad input."""

from __future__ import annotations

import asyncio
import random

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
