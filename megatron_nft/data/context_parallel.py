"""Context-parallel splitting of a packed (THD) token stream: which slots each CP rank holds.

Each sequence (padded to a multiple of 2*cp, see batching.sequence_alignment) is cut into 2*cp
equal chunks and rank r holds chunks r and 2*cp-1-r. Under causal attention the early chunks are
cheap and the late ones expensive, so pairing them gives every rank the same work. This is the
layout megatron-core's THD RoPE assumes (rope_utils._get_thd_freqs_on_this_cp_rank) and that
Transformer Engine's THD context-parallel attention expects.

Labels must be shifted in the full stream before splitting: a chunk's last label is the first token
of the next chunk, which may live on another rank.
"""

from __future__ import annotations

from typing import Sequence

import torch


def zigzag_indices(cu_seqlens: Sequence[int] | torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Stream slots held by context-parallel `rank`, in its local order: for each segment between
    consecutive `cu_seqlens` boundaries, chunk `rank` then chunk 2*cp-1-rank."""
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} is outside [0, {cp})")
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length % (2 * cp):
            raise ValueError(f"a packed segment of {length} tokens is not a multiple of 2*cp={2 * cp}")
        chunk = length // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def gathered_order(cu_seqlens: Sequence[int] | torch.Tensor, cp: int) -> torch.Tensor:
    """Stream slot of each row of a rank-major all-gather of every rank's local tokens."""
    return torch.cat([zigzag_indices(cu_seqlens, cp, r) for r in range(cp)])


def restore_order(cu_seqlens: Sequence[int] | torch.Tensor, cp: int) -> torch.Tensor:
    """Index that puts a rank-major all-gather back in stream order: stream = gathered[index]."""
    return torch.argsort(gathered_order(cu_seqlens, cp))
