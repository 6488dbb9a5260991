"""The attention backend interface and the per-step data every backend receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SeqSpan:
    """One sequence's part of a flat batch: its new tokens and the context they attend to."""

    query_start: int  # offset of its first new token in the flat batch
    query_len: int  # new tokens this step
    context_len: int  # cached tokens + new tokens
    block_table: list[int]

    def new_slots(self, block_size: int) -> list[int]:
        """Cache slot of each new token (positions context_len - query_len ..)."""
        table = self.block_table
        start = self.context_len - self.query_len
        return [
            table[p // block_size] * block_size + p % block_size
            for p in range(start, self.context_len)
        ]


@dataclass
class AttentionMetadata:
    """Built once per step by the backend; read by every attention layer."""

    slot_mapping: torch.Tensor  # [tokens]: cache slot each new token's K/V is written to
    spans: list[SeqSpan]
    num_decode_seqs: int  # the first spans are single-token decodes
    kv_caches: list[torch.Tensor]  # per layer, laid out as the backend allocated it
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific tensors


class AttentionBackend:
    name = "base"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = head_dim**-0.5

    def allocate_cache(
        self, num_layers: int, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """One cache tensor per layer, in whatever layout this backend reads fastest."""
        raise NotImplementedError

    def build_metadata(
        self,
        spans: list[SeqSpan],
        num_decode_seqs: int,
        kv_caches: list[torch.Tensor],
        device: torch.device,
    ) -> AttentionMetadata:
        raise NotImplementedError

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [tokens, heads, head_dim]
        k: torch.Tensor,  # [tokens, kv_heads, head_dim]
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [tokens, heads, head_dim]
        raise NotImplementedError
