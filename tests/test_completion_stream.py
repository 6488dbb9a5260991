"""Streamed /v1/completions whatever order the samples' outputs arrive in (in-process server)."""

from __future__ import annotations

import pytest


def _streamed(tiny_sdk, **kw) -> dict[int, tuple[str, list[str], list[float | None]]]:
    out: dict[int, tuple[str, list[str], list[float | None]]] = {}
    for chunk in tiny_sdk.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text, tokens, lps = out.get(c.index, ("", [], []))
            if not text:  # each sample's first chunk echoes its prompt, scored
                assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) > 1
            out[c.index] = (
                text + c.text,
                tokens + c.logprobs.tokens,
                lps + c.logprobs.token_logprobs,
            )
    return out


def test_a_sample_ahead_of_the_one_that_scores_the_prompt_waits_for_its_scores(
    tiny_sdk, monkeypatch
):
    """With echo and logprobs, only the first sample of a prompt scores it. Outputs that come
    before those scores are held, then sent with them, not sent without them."""
    from ember.server.routes import completions

    kw = dict(
        model="tiny",
        prompt=["hello there", "a b c d e"],
        max_tokens=4,
        n=3,
        seed=3,
        echo=True,
        logprobs=1,
        temperature=1.0,
    )
    in_order = _streamed(tiny_sdk, **kw)
    real = completions.merged_streams

    async def first_samples_last(state, jobs, base_id, ticket=None):
        items = [item async for item in real(state, jobs, base_id, ticket)]
        firsts = {j for j, (_, p) in enumerate(jobs) if p.prompt_logprobs is not None}
        for item in [it for it in items if it[0] not in firsts] + [
            it for it in items if it[0] in firsts
        ]:
            yield item

    monkeypatch.setattr(completions, "merged_streams", first_samples_last)
    reordered = _streamed(tiny_sdk, **kw)
    assert sorted(reordered) == list(range(6))
    for index, (text, tokens, lps) in in_order.items():
        assert reordered[index][:2] == (text, tokens)
        assert reordered[index][2][1:] == pytest.approx(lps[1:], abs=1e-5)
