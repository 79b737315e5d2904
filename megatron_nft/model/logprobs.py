"""Per-token log-probs (and exact entropy) from vocab-parallel logits, without gathering the vocabulary.

The output layer is column-parallel over the vocabulary: each tensor-parallel rank holds logits for a
slice of it. megatron-core's vocab_parallel_cross_entropy computes -log softmax at the label with one
max and one sum all-reduce and a matching backward; entropy needs two more sums and is computed
without gradient (it is a metric). Rows beyond the real vocabulary (padding to a multiple of TP) are
masked out before either.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Logits [..., V/TP] of this rank's slice; columns past `vocab_size` get the dtype's minimum."""
    per_rank = logits.shape[-1]
    start = tp_rank * per_rank
    valid = vocab_size - start
    if valid >= per_rank:
        return logits
    keep = torch.arange(per_rank, device=logits.device) < valid
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Exact entropy of softmax over the full vocabulary from this rank's slice of logits [..., V/TP]."""
    z = logits.float()
    z_max = z.max(dim=-1).values
    if tp_group is not None:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = z - z_max.unsqueeze(-1)
    e = shifted.exp()
    sums = torch.stack([e.sum(-1), (e * shifted).sum(-1)])
    if tp_group is not None:
        dist.all_reduce(sums, group=tp_group)
    # H = log S - E[z - max] with S = sum exp(z - max)
    return sums[0].log() - sums[1] / sums[0]


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[label] for vocab-parallel logits [s, b, V/TP] and labels [s, b]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    return -vocab_parallel_cross_entropy(scaled, labels)
