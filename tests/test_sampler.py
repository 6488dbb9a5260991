"""Sampler behaviour: each test pins one stage of the pipeline against a hand or naive reference."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ember.engine.request import SamplingParams
from ember.engine.sampler import Sampler, SamplingRow, _top_p
from ember.native import cpu_kernels


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> SamplingRow:
    params = params or SamplingParams()
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt or []), list(output or []), gen, stop_ids)


def emitted(logits: torch.Tensor, params: SamplingParams, n: int = 2000) -> Counter[int]:
    """Draw n tokens from one logits row by batching n copies of it."""
    tokens, _ = Sampler()(logits.expand(n, -1), [row(params) for _ in range(n)])
    return Counter(tokens)


def chi_square(counts: Counter[int], probs: torch.Tensor, n: int) -> float:
    expected = probs * n
    return sum((counts.get(i, 0) - e) ** 2 / e for i, e in enumerate(expected.tolist()))


def naive_process(logits: list[float], r: SamplingRow) -> list[float]:
    """Straight-line reference for bias, min_tokens and the three penalties."""
    out = list(logits)
    p = r.params
    for tok, b in (p.logit_bias or {}).items():
        out[tok] += b
    if p.allowed_token_ids is not None:
        out = [v if tok in p.allowed_token_ids else -math.inf for tok, v in enumerate(out)]
    for word in p.bad_words_token_ids or []:
        *head, last = word
        if not head or r.output_token_ids[-len(head) :] == head:
            out[last] = -math.inf
    if len(r.output_token_ids) < p.min_tokens:
        for tok in r.stop_ids:
            out[tok] = -math.inf
    if p.repetition_penalty != 1.0:
        for tok in set(r.prompt_token_ids) | set(r.output_token_ids):
            if out[tok] > 0:
                out[tok] /= p.repetition_penalty
            else:
                out[tok] *= p.repetition_penalty
    counts = Counter(r.output_token_ids)
    for tok, c in counts.items():
        out[tok] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return out


def test_greedy_equals_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 1000)
    tokens, logprobs = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(8)])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 8


def test_mixed_greedy_and_random_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[1, 7] = 50.0  # the random row is effectively deterministic too
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 3
    tokens, _ = Sampler()(logits, [row(p) for p in params])
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0::2] == argmax[0::2]
    assert tokens[1] == 7


def test_temperature_sampling_matches_softmax() -> None:
    torch.manual_seed(1)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n, temp = 6000, 0.6
    counts = emitted(logits, SamplingParams(temperature=temp), n)
    # df = 4: the 0.999 quantile is 18.5; ignoring temperature would score in the hundreds.
    assert chi_square(counts, torch.softmax(logits / temp, -1), n) < 18.5
    assert chi_square(counts, torch.softmax(logits, -1), n) > 100


def test_seeded_and_unseeded_rows_in_one_batch_sample_from_softmax() -> None:
    torch.manual_seed(16)
    logits = torch.tensor([1.0, 0.0, 0.5, -0.5])
    n, temp = 3000, 1.5
    rows = []
    for s in range(n):  # interleaved: each seeded row has its own generator
        rows += [
            row(SamplingParams(temperature=temp, seed=s)),
            row(SamplingParams(temperature=temp)),
        ]
    tokens, _ = Sampler()(logits.expand(2 * n, -1), rows)
    want = torch.softmax(logits / temp, -1)
    assert chi_square(Counter(tokens[0::2]), want, n) < 16.3  # df=3, 0.999 quantile
    assert chi_square(Counter(tokens[1::2]), want, n) < 16.3


def test_top_k_keeps_only_k_largest() -> None:
    torch.manual_seed(2)
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5, 0.0])
    assert set(emitted(logits, SamplingParams(top_k=3))) == {1, 2, 4}


def test_wide_vocabulary_samples_across_chunks_and_never_picks_masked_tokens() -> None:
    """Mass spread over a 50k vocabulary (the C sampler sums it in chunks), most of it masked."""
    torch.manual_seed(3)
    vocab, keep = 50_000, [5, 300, 777, 1024, 25_000, 49_999]
    logits = torch.full((vocab,), -5.0)
    logits[keep] = torch.tensor([1.0, 2.0, 0.0, 1.5, 2.5, 0.5])
    n = 6000
    counts = emitted(logits, SamplingParams(top_k=len(keep)), n)
    assert set(counts) <= set(keep)
    want = torch.softmax(logits[keep], -1)
    assert chi_square(Counter({keep.index(t): c for t, c in counts.items()}), want, n) < 20.5


def test_native_sampler_edges() -> None:
    lib = cpu_kernels()
    if lib is None:
        pytest.skip("no C kernels on this machine")
    z = torch.full((3, 1000), float("-inf"))
    z[:, [10, 600, 601]] = torch.tensor([0.0, 0.0, 0.0])
    u = torch.tensor([0.0, 0.5, 1.0 - 1e-16], dtype=torch.float64)
    out = torch.empty(3, dtype=torch.long)
    lib.sample_logits(z.data_ptr(), 3, 1000, u.data_ptr(), out.data_ptr())
    assert out.tolist() == [10, 600, 601]  # u = 0 takes the first, u -> 1 the last with mass


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    torch.manual_seed(3)
    # Probabilities 0.4, 0.3, 0.2, 0.1, scattered so the sort order matters.
    probs = torch.tensor([0.2, 0.4, 0.1, 0.3])
    logits = probs.log()
    assert set(emitted(logits, SamplingParams(top_p=0.6))) == {1, 3}
    assert set(emitted(logits, SamplingParams(top_p=0.75))) == {0, 1, 3}
    assert set(emitted(logits, SamplingParams(top_p=0.05))) == {1}  # always the top token
    assert set(emitted(logits, SamplingParams(top_p=0.0))) == {1}  # OpenAI's and FastChat's 0


def test_top_p_applies_after_top_k_renormalises() -> None:
    torch.manual_seed(4)
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # After top_k=2 the survivors are 4/7 and 3/7, so 0.5 is reached by the first alone;
    # top_p on the un-renormalised 0.4 would keep both.
    assert set(emitted(logits, SamplingParams(top_k=2, top_p=0.5))) == {0}


def test_top_p_applies_after_temperature() -> None:
    torch.manual_seed(5)
    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    # At T=0.5 the probs are ~0.78, 0.20, 0.02; at T=1, 0.6 < 0.7 would also keep token 1.
    assert set(emitted(logits, SamplingParams(temperature=0.5, top_p=0.7))) == {0}
    assert set(emitted(logits, SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    torch.manual_seed(6)
    logits = torch.tensor([0.1, 0.5, 0.15, 0.2, 0.05]).log()
    # Threshold 0.25 * 0.5 = 0.125.
    assert set(emitted(logits, SamplingParams(min_p=0.25))) == {1, 2, 3}


def test_filters_only_touch_rows_that_ask() -> None:
    torch.manual_seed(7)
    n = 1500
    logits = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]).expand(2 * n, -1)  # near-uniform
    params = [SamplingParams(top_k=2), SamplingParams()] * n
    tokens, _ = Sampler()(logits, [row(p) for p in params])
    assert set(tokens[0::2]) == {3, 4}
    assert set(tokens[1::2]) == {0, 1, 2, 3, 4}


def test_penalties_and_bias_match_naive_reference() -> None:
    torch.manual_seed(8)
    vocab = 40
    rows = [
        row(SamplingParams(repetition_penalty=1.3), prompt=[1, 2, 3, 3], output=[4, 5]),
        row(SamplingParams(repetition_penalty=0.7), prompt=[6, 7], output=[7, 8]),
        row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 9], [9, 9, 10, 11]),
        row(SamplingParams(presence_penalty=-1.0), prompt=[2], output=[12, 12]),
        row(SamplingParams(logit_bias={0: 5.0, 39: -100.0, 13: 0.5})),
        row(
            SamplingParams(
                repetition_penalty=1.5,
                presence_penalty=1.0,
                frequency_penalty=-0.5,
                logit_bias={14: 2.0, 15: -3.0},
            ),
            prompt=[14, 16, 17],
            output=[15, 17, 17, 18],
        ),
        row(SamplingParams(), prompt=[1, 2, 3], output=[4, 4]),  # defaults: untouched
        row(SamplingParams(allowed_token_ids=[3, 30, 31], logit_bias={30: 2.0, 5: 1.0})),
        # Banned: 22 (one token), 24 after 23, 27 after 25 26; not 29 (28 is not last).
        row(
            SamplingParams(bad_words_token_ids=[[22], [23, 24], [25, 26, 27], [28, 29], [9, 9]]),
            prompt=[9],
            output=[28, 1, 25, 26, 23],
        ),
        row(SamplingParams(bad_words_token_ids=[[23, 24, 27]]), output=[24]),  # too short
        row(
            SamplingParams(min_tokens=2, logit_bias={20: 1.0}, repetition_penalty=1.2),
            prompt=[20],
            output=[5],
            stop_ids=frozenset({20, 21}),
        ),
    ]
    logits = torch.randn(len(rows), vocab) * 3
    before = logits.clone()
    got = Sampler().process_logits(logits, rows)
    want = torch.tensor([naive_process(logits[i].tolist(), r) for i, r in enumerate(rows)])
    torch.testing.assert_close(got, want)
    assert torch.equal(logits, before)  # the caller's logits are not written to


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [-1.0, -1.1, -5.0]])
    rows = [
        row(SamplingParams(temperature=0.0, repetition_penalty=1.2), prompt=[0]),
        row(SamplingParams(temperature=0.0, frequency_penalty=0.2), output=[0]),
        # A negative logit is multiplied by the penalty, so it too drops below its rival.
        row(SamplingParams(temperature=0.0, repetition_penalty=1.2), prompt=[0]),
    ]
    tokens, _ = Sampler()(logits, rows)
    assert tokens == [1, 1, 1]


def test_frequency_penalty_ignores_prompt_tokens() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    r = row(SamplingParams(temperature=0.0, frequency_penalty=2.0), prompt=[0, 0, 0])
    assert Sampler()(logits, [r])[0] == [0]


def test_min_tokens_blocks_stop_ids() -> None:
    torch.manual_seed(9)
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).expand(4, -1)
    stop = frozenset({1, 2})
    rows = [
        row(SamplingParams(temperature=0.0, min_tokens=3), output=[0], stop_ids=stop),
        row(SamplingParams(temperature=0.0, min_tokens=3), output=[0, 0, 0], stop_ids=stop),
        row(SamplingParams(temperature=0.0, min_tokens=0), stop_ids=stop),
        row(SamplingParams(temperature=1.0, min_tokens=5), output=[3], stop_ids=stop),
    ]
    tokens, _ = Sampler()(logits, rows)
    assert tokens[:3] == [3, 1, 1]
    # Random rows too: with 1 and 2 masked only 0 and 3 remain (3 about 73% of the time).
    sampled, _ = Sampler()(logits[:1].expand(1000, -1), [rows[3]] * 1000)
    assert set(sampled) == {0, 3}


def _generate(
    logits_steps: list[torch.Tensor], params: list[SamplingParams], target: int
) -> list[int]:
    """Run a few sampling steps over a batch; return the tokens of row `target`."""
    sampler = Sampler()
    rows = [row(p) for p in params]
    seq = []
    for step_logits in logits_steps:
        tokens, _ = sampler(step_logits[: len(rows)], rows)
        for r, t in zip(rows, tokens, strict=True):
            r.output_token_ids.append(t)
        seq.append(tokens[target])
    return seq


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    torch.manual_seed(10)
    vocab = 1000
    base = torch.randn(vocab)
    steps = 12
    seeded = SamplingParams(temperature=1.0, seed=1234, top_p=0.95)

    def batch_logits(n: int, pos: int) -> list[torch.Tensor]:
        out = []
        for _ in range(steps):
            step = torch.randn(n, vocab)
            step[pos] = base
            out.append(step)
        return out

    alone = _generate(batch_logits(1, 0), [seeded], 0)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=1.0),
        SamplingParams(top_k=5, repetition_penalty=1.1),
    ]
    first = _generate(batch_logits(5, 0), [seeded, *others], 0)
    middle = _generate(batch_logits(5, 2), [*others[:2], seeded, *others[2:]], 2)
    last = _generate(batch_logits(5, 4), [*others[::-1], seeded], 4)
    assert alone == first == middle == last
    assert len(set(alone)) > 1  # actually random, not a degenerate argmax
    other_seed = _generate(batch_logits(1, 0), [SamplingParams(temperature=1.0, seed=99)], 0)
    assert other_seed != alone


def test_logprobs_are_raw_log_softmax_with_rank_and_top() -> None:
    torch.manual_seed(11)
    logits = torch.randn(4, 100)
    logits[0, :4] = torch.tensor([20.0, 18.0, 18.0, 15.0])
    logits[1, :4] = torch.tensor([20.0, 18.0, 18.0, 15.0])
    rows = [
        # The bias makes token 3 the choice, but logprobs stay raw: three tokens beat it.
        row(SamplingParams(temperature=0.0, logprobs=5, logit_bias={3: 50.0})),
        # Token 2 ties token 1: only strictly larger logprobs count against the rank.
        row(SamplingParams(temperature=0.0, logprobs=0, logit_bias={2: 50.0})),
        row(SamplingParams(temperature=0.7, logprobs=3, repetition_penalty=2.0), prompt=[5]),
        row(SamplingParams(temperature=0.0)),
    ]
    tokens, logprobs = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert tokens[:2] == [3, 2]
    assert logprobs[3] is None
    for i in range(3):
        lp = logprobs[i]
        assert lp is not None
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(raw[i, tokens[i]].item(), abs=1e-5)
        assert lp.rank == 1 + int((raw[i] > raw[i, tokens[i]]).sum())
        k = rows[i].params.logprobs
        vals, ids = torch.topk(raw[i], k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=1e-5)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert logprobs[0] is not None and logprobs[0].rank == 4
    assert logprobs[1] is not None and logprobs[1].rank == 2 and logprobs[1].top == []


def test_low_precision_logits_are_accepted_and_not_modified() -> None:
    torch.manual_seed(12)
    logits = torch.randn(3, 64).to(torch.bfloat16)
    before = logits.clone()
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=2)),
        row(SamplingParams(top_k=3, logit_bias={0: 1.0}, seed=3)),
        row(SamplingParams(min_p=0.1, repetition_penalty=1.2), prompt=[1, 2]),
    ]
    tokens, logprobs = Sampler()(logits, rows)
    assert tokens[0] == logits.float().argmax(dim=-1)[0].item()
    assert logprobs[0] is not None
    assert logprobs[0].logprob == pytest.approx(
        torch.log_softmax(logits.float()[0], -1)[tokens[0]].item(), abs=1e-5
    )
    assert torch.equal(logits, before)


def test_float32_logits_not_modified_by_filters() -> None:
    torch.manual_seed(13)
    logits = torch.randn(4, 64)
    before = logits.clone()
    rows = [row(SamplingParams(top_k=2, top_p=0.5, min_p=0.2)) for _ in range(4)]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


@pytest.fixture(params=["native", "torch"])
def top_p_path(request, monkeypatch):
    """Run a top_p test on the C kernel and on the torch path (top-k candidates, then sort)."""
    if request.param == "native" and cpu_kernels() is None:
        pytest.skip("no C kernels on this machine")
    if request.param == "torch":
        monkeypatch.setattr("ember.engine.sampler.cpu_kernels", lambda: None)
    return request.param


def top_p_reference(logits: torch.Tensor, p: float, slack: float = 0.0) -> tuple[set, set]:
    """Tokens kept by the sort-everything definition, in float64: (surely kept, at the edge),
    where edge tokens have mass-before within `slack` of p (float32 sums may go either way)."""
    probs = logits.double().softmax(-1)
    sorted_probs, order = probs.sort(descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    edge = (before - p).abs() <= slack
    return set(order[(before < p) & ~edge].tolist()), set(order[edge].tolist())


def test_top_p_mask_matches_full_sort_for_peaked_and_flat_rows(top_p_path: str) -> None:
    # 3000 tokens: the peaked row settles within the top-k candidates, the flat ones need
    # the full-sort fallback; both must equal the sort-everything definition.
    torch.manual_seed(14)
    vocab = 3000
    logits = torch.cat([torch.randn(1, vocab) * 6, torch.randn(2, vocab) * 0.3])
    ps = torch.tensor([0.9, 0.8, 0.3])
    got = _top_p(logits, ps)
    for i in range(3):
        sure, edge = top_p_reference(logits[i], float(ps[i]))
        assert set(torch.isfinite(got[i]).nonzero().squeeze(1).tolist()) - edge == sure
    assert torch.isfinite(got[1]).sum() > 1024  # really took the fallback


@pytest.mark.parametrize("p", [1e-300, 1e-45, 0.0])
def test_a_top_p_too_small_for_float32_keeps_the_best_token(top_p_path: str, p: float) -> None:
    # 1e-300 passes `top_p > 0` but is 0 in float32: the cut must still keep the top token.
    torch.manual_seed(15)
    logits = torch.randn(3, 5000) * 3
    got = _top_p(logits, torch.tensor([p, p, 0.5], dtype=torch.float64).float())
    for i in range(2):
        assert torch.isfinite(got[i]).nonzero().squeeze(1).tolist() == [int(logits[i].argmax())]
    assert set(emitted(logits[0:1], SamplingParams(top_p=1e-300), n=50)) == {
        int(logits[0].argmax())
    }


def test_top_p_on_a_full_vocabulary_with_masked_and_far_tokens(top_p_path: str) -> None:
    torch.manual_seed(15)
    vocab = 49_152
    rows = [torch.randn(vocab) * scale for scale in (0.5, 2.0, 8.0)]
    far = torch.randn(vocab) - 60.0  # most tokens far below a few near the top
    far[:5] = torch.tensor([3.0, 2.5, 2.0, 0.0, -1.0])
    masked = torch.randn(vocab) * 2
    masked[::3] = float("-inf")  # top_k or logit_bias already removed these
    logits = torch.stack([*rows, far, masked])
    for p in (0.5, 0.9, 0.99):
        got = _top_p(logits, torch.full((len(logits),), p))
        for i in range(len(logits)):
            kept = set(torch.isfinite(got[i]).nonzero().squeeze(1).tolist())
            # The kernel sums in float64 and is exact here; torch's float32 cumsum is not.
            sure, edge = top_p_reference(logits[i], p, 0.0 if top_p_path == "native" else 1e-5)
            assert kept - edge == sure, (i, p)
            assert torch.equal(got[i][list(kept)], logits[i][list(kept)])  # survivors untouched


def test_seeded_row_uses_its_generators_exponential_noise() -> None:
    # The documented contract, so other samplers (e.g. a GPU one) can reproduce a seed:
    # token = argmax(softmax(logits / T) / Exp(1) noise drawn from the row's generator).
    torch.manual_seed(15)
    vocab, temp, seed = 500, 0.8, 42
    r = row(SamplingParams(temperature=temp, seed=seed))
    ref_gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        logits = torch.randn(1, vocab)
        noise = torch.empty(vocab).exponential_(generator=ref_gen)
        want = int((torch.softmax(logits[0] / temp, -1) / noise).argmax())
        tokens, _ = Sampler()(logits, [r])
        assert tokens == [want]
