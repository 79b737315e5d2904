"""A packed micro-batch as megatron-core's GPTModel consumes it on this context-parallel rank, and the
way from the model's per-token outputs back to per-row [rows, S] tensors.

The stream is built from whole rows (data.batching.PackedMicroBatch): tokens, labels shifted within
each row *before* any context-parallel split (a chunk's last label may live on another rank),
positions that restart per sequence, and PackedSeqParams(qkv_format="thd") whose padded boundaries
drive megatron-core's THD RoPE and the attention's document mask. With CP > 1 each rank keeps its
zigzag share of the stream (data.context_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_nft.data.batching import PackedMicroBatch
from megatron_nft.data.context_parallel import restore_order, zigzag_indices


@dataclass
class PackedStream:
    micro: PackedMicroBatch
    tokens: torch.Tensor  # [1, T / cp]
    labels: torch.Tensor  # [1, T / cp]  labels[t] = the next token of the same row
    positions: torch.Tensor  # [1, T / cp]  position within its own sequence
    params: PackedSeqParams
    cp_group: object | None  # None when cp == 1
    restore: torch.Tensor | None  # stream order of a rank-major CP all-gather

    @property
    def total_tokens(self) -> int:
        return self.micro.total_tokens

    def rows(self, output: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Per-token model outputs [C, 1, T / cp] -> [C, n, S] for the micro-batch's rows (zero
        outside each row's real tokens). Differentiable.

        With CP the outputs are all-gathered and every CP rank then computes the same loss over
        whole rows. The gather's backward keeps this rank's slice of the gradient (it does not sum
        the CP ranks' identical copies), so each rank back-propagates exactly what the loss of its
        own tokens would: the convention megatron-core's schedule (loss x cp) and DDP (average over
        data x context parallel ranks) are built for."""
        per_token = output[:, 0]
        if self.cp_group is not None:
            gathered = tensor_parallel.gather_from_sequence_parallel_region(
                per_token.transpose(0, 1).contiguous(), False, group=self.cp_group
            )
            per_token = gathered[self.restore.to(gathered.device)].transpose(0, 1)
        return self.micro.unpack(per_token, seq_len)


def build_stream(micro: PackedMicroBatch, tokens: torch.Tensor, *, cp_group=None, device=None) -> PackedStream:
    """`tokens` [n, S]: the micro-batch's rows in packing order (row i = micro.rows[i])."""
    labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    stream = {"tokens": micro.pack(tokens), "labels": micro.pack(labels), "positions": micro.positions()}
    cu_seqlens = micro.cu_seqlens()
    cp = cp_group.size() if cp_group is not None else 1
    restore = None
    if cp > 1:
        mine = zigzag_indices(cu_seqlens, cp, cp_group.rank())
        stream = {k: v[mine] for k, v in stream.items()}
        restore = restore_order(cu_seqlens, cp)
    cu_seqlens = cu_seqlens.to(device)
    # Padding sits at each sequence's end, so the padded boundaries serve as the real ones too: the
    # padding tokens attend only to their own sequence and nothing real attends to them.
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=micro.max_seqlen(),
        max_seqlen_kv=micro.max_seqlen(),
    )
    return PackedStream(
        micro=micro,
        tokens=stream["tokens"][None].to(device),
        labels=stream["labels"][None].to(device),
        positions=stream["positions"][None].to(device),
        params=params,
        cp_group=cp_group if cp > 1 else None,
        restore=restore,
    )
