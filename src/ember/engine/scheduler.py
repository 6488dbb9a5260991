"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences go first (a decode costs one token, a prompt
that is still being prefilled takes a chunk of what is left), then waiting sequences are
admitted in arrival order while the budget, `max_num_seqs` and free KV blocks allow. When a
running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the head of the queue, to be recomputed
later (its full blocks usually come straight back from the prefix cache).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

from ember.engine.kv_cache import BlockAllocator
from ember.engine.request import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed to the model for this sequence in this step

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    num_preempted: int = 0


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark a sequence finished and give back its blocks (also used for aborts)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _free(self, seq: Sequence) -> None:
        self.allocator.free_blocks(seq.block_table)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure seq has blocks for `num_tokens` tokens in total."""
        need = self.allocator.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = 0

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._grow(seq, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                self._publish(seq, num_new)
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted; everything after it is gone too

        # 2. Admit waiting sequences in arrival order (not while we are short of blocks).
        while self.waiting and not preempted and budget > 0:
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0 and not seq.block_table:
                # Prompt logprobs need every prompt position computed, so no cache hits.
                wants_all = seq.params.prompt_logprobs is not None
                hits = [] if wants_all else self.allocator.match_prefix(seq.token_ids)
                seq.block_table = hits
                seq.num_computed_tokens = len(hits) * self.allocator.block_size
                seq.num_hashed_blocks = len(hits)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
            remaining = seq.num_tokens - seq.num_computed_tokens
            if not self.enable_chunked_prefill and remaining > budget and scheduled:
                self._release_hits(seq)
                break
                # A prompt longer than the whole budget must still run, alone.
            num_new = min(remaining, budget) if self.enable_chunked_prefill else remaining
            if not self._grow(seq, seq.num_computed_tokens + num_new):
                self._release_hits(seq)
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                self.allocator.prefix_queries += seq.num_tokens
                self.allocator.prefix_hits += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._publish(seq, num_new)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def _publish(self, seq: Sequence, num_new: int) -> None:
        """Put the blocks this step fills into the prefix cache right away.

        Every layer writes the step's keys and values before any attention reads them, so a
        sequence admitted later in the same step (a sibling of an n > 1 request, or another
        request with the same system prompt) can already share these blocks.
        """
        seq.num_hashed_blocks = self.allocator.register_full_blocks(
            seq.token_ids, seq.block_table, seq.num_computed_tokens + num_new, seq.num_hashed_blocks
        )

    def _release_hits(self, seq: Sequence) -> None:
        """A sequence that could not be admitted gives back the prefix blocks it borrowed."""
        self._free(seq)
        seq.num_computed_tokens = 0
