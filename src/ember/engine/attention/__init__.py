"""Attention backends behind one interface.

A backend builds an `AttentionMetadata` for a step once (from plain per-sequence data), and
every attention layer calls `backend.forward(layer, q, k, v, meta)`, which writes the new keys
and values into the paged cache and attends over each sequence's whole context.
"""

from __future__ import annotations

from ember.engine.attention.base import AttentionBackend, AttentionMetadata, SeqSpan


def get_backend(name: str) -> type[AttentionBackend]:
    if name == "torch":
        from ember.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend
    if name == "cpu":
        from ember.engine.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend
    if name == "triton":
        from ember.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend
    raise ValueError(f"unknown attention backend {name!r} (available: torch, cpu, triton)")


__all__ = ["AttentionBackend", "AttentionMetadata", "SeqSpan", "get_backend"]
