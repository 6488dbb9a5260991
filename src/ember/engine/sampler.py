"""Turn a batch of next-token logits into sampled token ids (and their logprobs).

Every stage works on the whole batch with tensor ops and is skipped outright when no row
needs it: most batches are all-default, and a [256, 150k] float32 pass costs ~150 MB of
memory traffic, so the cheapest stage is the one that never runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember.engine.request import Logprob, SamplingParams
from ember.native import cpu_kernels

# Guards the exponential race: exponential_() may return exactly 0, and p / 0 is inf
# (or NaN for a filtered p == 0, which argmax would happily pick).
_MIN_EXP_NOISE = 1e-20


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the batch."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # per-request generator when params.seed is set, else None
    # eos ids + params.stop_token_ids: masked while len(output) < min_tokens
    stop_ids: frozenset[int]


# top_p first looks for its cut among this many of the most likely tokens: a top-k is
# an order of magnitude cheaper than sorting the vocabulary, and real distributions
# nearly always reach top_p well within it. Rows whose cut lies beyond it fall back to
# a full sort.
_TOP_P_CANDIDATES = 1024


def _top_p_keep(probs: torch.Tensor, ps: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask for the top k of each row, and whether the top k settles the row's cut."""
    top, order = torch.topk(probs, k, dim=-1)  # sorted, descending
    cum = top.cumsum(dim=-1)
    # Keep a token while the mass strictly before it is still short of top_p; the top
    # token has nothing before it, so it always survives.
    keep_sorted = (cum - top) < ps.unsqueeze(1)
    keep_sorted[:, 0] = True  # also where ps is 0 (a top_p below float32's smallest value)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep_sorted)
    # Settled when the top k already reach top_p: every later token is then dropped.
    return keep, (cum[:, -1] >= ps) | (k == probs.shape[1])


def _top_p(s: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Mask all but the smallest set of most likely tokens whose probability reaches ps."""
    lib = cpu_kernels() if s.device.type == "cpu" and s.dtype == torch.float32 else None
    if lib is not None:  # no top-k search: 5-10 ms at 32 rows of 49k instead of ~25
        out = s.contiguous().clone()
        p = ps.to(torch.float32).contiguous()
        lib.top_p_mask(out.data_ptr(), out.shape[0], out.shape[1], p.data_ptr())
        return out
    probs = s.softmax(dim=-1)
    vocab = probs.shape[1]
    keep, settled = _top_p_keep(probs, ps, min(vocab, _TOP_P_CANDIDATES))
    if not bool(settled.all()):
        rest = (~settled).nonzero().squeeze(1)
        keep[rest] = _top_p_keep(probs[rest], ps[rest], vocab)[0]
    return s.masked_fill(~keep, float("-inf"))


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _per_row(
    rows: list[SamplingRow],
    sel: list[int],
    field: str,
    batch: int,
    default: float,
    device: torch.device,
) -> torch.Tensor:
    """A [batch] float32 tensor of one SamplingParams field for the rows in sel."""
    values = [default] * batch
    for i in sel:
        values[i] = float(getattr(rows[i].params, field))
    return torch.tensor(values, dtype=torch.float32, device=device)


def _seen_pairs(
    rows: list[SamplingRow], sel: list[int], with_prompt: bool, vocab: int, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Distinct (batch row, token id) pairs the rows in sel have seen, with occurrence counts."""
    seqs = [
        (rows[i].prompt_token_ids + rows[i].output_token_ids)
        if with_prompt
        else rows[i].output_token_ids
        for i in sel
    ]
    lengths = _long([len(s) for s in seqs], device)
    row_ids = torch.repeat_interleave(_long(sel, device), lengths)
    token_ids = _long(list(itertools.chain.from_iterable(seqs)), device)
    # One flat key per pair makes dedup a single sort instead of a per-row loop.
    keys, counts = torch.unique(row_ids * vocab + token_ids, return_counts=True)
    return (keys // vocab, keys % vocab), counts.to(torch.float32)


class Sampler:
    """Stateless: all per-request state (history, generator) arrives in the rows."""

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[Logprob | None]]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), V], got {tuple(logits.shape)}")
        device = logits.device
        batch = len(rows)

        x = self.process_logits(logits, rows)
        tokens = torch.empty(batch, dtype=torch.long, device=device)

        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            g = x if len(greedy) == batch else x[_long(greedy, device)]
            tokens[_long(greedy, device)] = g.argmax(dim=-1)
        if rand:
            tokens[_long(rand, device)] = self._sample_random(x, [rows[i] for i in rand], rand)

        token_list: list[int] = tokens.tolist()
        return token_list, self._logprobs(logits, rows, tokens, token_list)

    @torch.inference_mode()
    def process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Apply logit_bias, allowed_token_ids, bad_words, min_tokens, repetition and
        presence/frequency penalties.

        Returns float32 logits; never writes into `logits` (the caller may reuse it). Every
        stage is a sparse update at the (row, token) pairs it concerns, so its cost follows
        the number of tokens involved, not B * V.
        """
        device = logits.device
        vocab = logits.shape[1]
        x = logits.float()
        owned = x is not logits  # .float() is a no-op on float32 input: copy before writing

        def writable() -> torch.Tensor:
            nonlocal x, owned
            if not owned:
                x, owned = x.clone(), True
            return x

        # logit_bias: one scatter over all (row, token) pairs (dict keys are unique per row).
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_vals: list[float] = []
        for i, r in enumerate(rows):
            for tok, b in (r.params.logit_bias or {}).items():
                bias_rows.append(i)
                bias_cols.append(tok)
                bias_vals.append(float(b))
        if bias_rows:
            writable().index_put_(
                (_long(bias_rows, device), _long(bias_cols, device)),
                torch.tensor(bias_vals, dtype=torch.float32, device=device),
                accumulate=True,
            )

        # allowed_token_ids: every other token is impossible (only rows that set it pay O(V)).
        for i, r in enumerate(rows):
            allowed = r.params.allowed_token_ids
            if allowed is not None:
                keep = torch.full((vocab,), float("-inf"), device=device)
                keep[_long([t for t in allowed if t < vocab], device)] = 0.0
                writable()[i] += keep

        # bad_words: a word's last token is impossible right after the rest of it (at once
        # for a one-token word), as vLLM applies them, over the generated tokens.
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for i, r in enumerate(rows):
            out = r.output_token_ids
            for word in r.params.bad_words_token_ids or ():
                head = word[:-1]  # the tokens that must come just before the banned one
                if word[-1] < vocab and (not head or out[-len(head) :] == head):
                    ban_rows.append(i)
                    ban_cols.append(word[-1])
        if ban_rows:
            writable()[_long(ban_rows, device), _long(ban_cols, device)] = float("-inf")

        # min_tokens: stop ids are impossible until the request has produced enough.
        stop_rows: list[int] = []
        stop_cols: list[int] = []
        for i, r in enumerate(rows):
            if r.stop_ids and len(r.output_token_ids) < r.params.min_tokens:
                ids = [t for t in r.stop_ids if t < vocab]
                stop_rows.extend([i] * len(ids))
                stop_cols.extend(ids)
        if stop_rows:
            writable()[_long(stop_rows, device), _long(stop_cols, device)] = float("-inf")

        # repetition_penalty (HF/vLLM): over prompt + output, shrink positive logits and
        # push negative ones further down, so the penalty always makes a token less likely.
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:
            (r_idx, t_idx), _ = _seen_pairs(rows, rep, True, vocab, device)
            pen = _per_row(rows, rep, "repetition_penalty", len(rows), 1.0, device)[r_idx]
            vals = writable()[r_idx, t_idx]
            x[r_idx, t_idx] = torch.where(vals > 0, vals / pen, vals * pen)

        # presence/frequency (OpenAI): subtractive, counted over generated tokens only.
        pf = [
            i
            for i, r in enumerate(rows)
            if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0)
            and r.output_token_ids
        ]
        if pf:
            (r_idx, t_idx), counts = _seen_pairs(rows, pf, False, vocab, device)
            freq = _per_row(rows, pf, "frequency_penalty", len(rows), 0.0, device)[r_idx]
            pres = _per_row(rows, pf, "presence_penalty", len(rows), 0.0, device)[r_idx]
            writable().index_put_((r_idx, t_idx), -(freq * counts + pres), accumulate=True)

        return x

    def _sample_random(
        self, x: torch.Tensor, rows: list[SamplingRow], rand: list[int]
    ) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race, for non-greedy rows."""
        device = x.device
        n, vocab = len(rows), x.shape[1]
        z = x if n == x.shape[0] else x[_long(rand, device)]

        temps = [r.params.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            z = z / torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1)

        def on_rows(sel: list[int], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            # Filters are out-of-place so z may still alias the caller's logits.
            if len(sel) == n:
                return fn(z)
            idx = _long(sel, device)
            out = z.clone()
            out[idx] = fn(z[idx])
            return out

        # top_k: mask everything below each row's k-th largest value (ties at it survive).
        tk = [j for j, r in enumerate(rows) if 0 < r.params.top_k < vocab]
        if tk:
            ks = _long([rows[j].params.top_k for j in tk], device)

            def top_k(s: torch.Tensor) -> torch.Tensor:
                top = torch.topk(s, int(ks.max()), dim=-1).values
                kth = top.gather(1, (ks - 1).unsqueeze(1))
                return s.masked_fill(s < kth, float("-inf"))

            z = on_rows(tk, top_k)

        # top_p: only rows that asked, so rounding in a full cumsum can't trim a top_p=1 row.
        tp = [j for j, r in enumerate(rows) if r.params.top_p < 1.0]
        if tp:
            ps = torch.tensor(
                [rows[j].params.top_p for j in tp], dtype=torch.float32, device=device
            )
            z = on_rows(tp, lambda s: _top_p(s, ps))

        out = torch.empty(n, dtype=torch.long, device=device)
        unseeded = [j for j, r in enumerate(rows) if r.generator is None]
        mp = [j for j, r in enumerate(rows) if r.params.min_p > 0.0]
        lib = cpu_kernels() if device.type == "cpu" and z.dtype == torch.float32 else None
        if unseeded and not mp and lib is not None:
            # Inverse CDF straight from the logits in C: no probability matrix, no float64
            # copy, no search (the sampler at 32 rows of 49k: 6.4 ms before, 1.5-2 ms now).
            idx = _long(unseeded, device)
            zu = (z if len(unseeded) == n else z[idx]).contiguous()
            u = torch.rand(len(unseeded), dtype=torch.float64)
            picked = torch.empty(len(unseeded), dtype=torch.long)
            lib.sample_logits(zu.data_ptr(), len(unseeded), vocab, u.data_ptr(), picked.data_ptr())
            out[idx] = picked
            if len(unseeded) == n:
                return out
            unseeded = []

        probs = z.softmax(dim=-1)

        # min_p: relative to the row's top prob; filtering and renormalising commute with
        # the race below (argmax is scale-free), so zeroing is enough.
        if mp:
            min_p = torch.zeros(n, 1, dtype=torch.float32, device=device)
            min_p[_long(mp, device), 0] = torch.tensor(
                [rows[j].params.min_p for j in mp], dtype=torch.float32, device=device
            )
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)

        # Unseeded rows: inverse CDF, one uniform draw per row (drawing V noise values per row
        # costs ~10x more on the CPU). float64 keeps the running sum exact enough at V ~ 150k.
        if unseeded:
            p = probs if len(unseeded) == n else probs[_long(unseeded, device)]
            cdf = p.double().cumsum_(dim=-1)
            u = torch.rand(len(unseeded), 1, dtype=torch.float64, device=device) * cdf[:, -1:]
            # right=True: the first token whose cumulative mass exceeds u, never a zero-mass one.
            picked = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)
            out[_long(unseeded, device)] = picked
        # Seeded rows: exponential race, argmax(p / q) with q ~ Exp(1), exactly V draws from the
        # row's own generator per step, so a seed gives the same tokens whatever the batch.
        for j, r in enumerate(rows):
            if r.generator is not None:
                q = torch.empty(vocab, dtype=torch.float32, device=device)
                q.exponential_(generator=r.generator).clamp_(min=_MIN_EXP_NOISE)
                out[j] = (probs[j] / q).argmax()
        return out

    def _logprobs(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        tokens: torch.Tensor,
        token_list: list[int],
    ) -> list[Logprob | None]:
        """Logprobs of the sampled tokens under the raw model distribution (vLLM's default)."""
        out: list[Logprob | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return out
        device = logits.device
        idx = _long(want, device)
        # Masked tokens (structured outputs) have -inf, which JSON cannot carry: -9999 as vLLM.
        lp = torch.log_softmax(logits[idx].float(), dim=-1).clamp_(min=-9999.0)
        chosen = lp.gather(1, tokens[idx].unsqueeze(1))
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
        chosen_list = chosen.squeeze(1).tolist()
        kmax = max(rows[i].params.logprobs or 0 for i in want)
        top_vals_l: list[list[float]] = []
        top_ids_l: list[list[int]] = []
        if kmax > 0:
            top_vals, top_ids = torch.topk(lp, min(kmax, lp.shape[1]), dim=-1)
            top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(want):
            k = rows[i].params.logprobs or 0
            top = list(zip(top_ids_l[j][:k], top_vals_l[j][:k], strict=True)) if k else []
            out[i] = Logprob(token_id=token_list[i], logprob=chosen_list[j], rank=ranks[j], top=top)
        return out
