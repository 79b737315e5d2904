"""Core attention for the local (non-Transformer-Engine) layer spec, on torch's scaled_dot_product_attention.

megatron-core's local DotProductAttention refuses packed sequences and context parallelism; both
need Transformer Engine, which a CPU machine (and a GPU box without the NGC image) does not have.
`SdpaAttention` plugs into the same `core_attention` slot of SelfAttention and takes what it hands
over after the QKV projection and RoPE:

  padded rows (bshd)   query [s, b, np, hn], key/value [s, b, ng, hn], attention_mask [b|1, 1, s, s]
                       (True = masked out, Megatron's convention) or None for plain causal;
  packed (thd)         query [t, np, hn], key/value [t, ng, hn] and PackedSeqParams(qkv_format="thd",
                       cu_seqlens...): a block-diagonal causal (document) mask keeps each sequence to
                       itself; with context parallel, this rank's zigzag share of the queries attends
                       to keys/values all-gathered over the CP group (the gather's backward is a
                       reduce-scatter, so gradients reach the rank that owns each key/value).

Grouped-query attention is SDPA's enable_gqa, whose head mapping (query head h reads key/value group
h // (np / ng)) is Megatron's repeat_interleave. The result is [s, b, np*hn] or [t, np*hn].

The document mask is dense ([t_local, t] booleans per layer call): right for this fallback's job
(CPU tests, small runs); long-context GPU runs use Transformer Engine's THD kernels instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_nft.data.context_parallel import gathered_order, zigzag_indices
from megatron_nft.errors import ConfigError


def document_causal_mask(cu_seqlens: torch.Tensor, cp: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """[t_local, t] booleans, True where a query may attend to a key (SDPA's convention).

    Queries are this CP rank's zigzag slots of the stream, keys every rank's slots in rank-major
    order (what an all-gather returns); with cp = 1 both are the stream itself. A query attends to
    the keys of its own segment at or before its own slot."""
    bounds = cu_seqlens.tolist()
    total = bounds[-1]
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])])
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    if cp == 1:
        q_slot = k_slot = torch.arange(total)
    else:
        q_slot, k_slot = zigzag_indices(bounds, cp, cp_rank), gathered_order(bounds, cp)
    same = segment[q_slot][:, None] == segment[k_slot][None, :]
    return (same & (k_slot[None, :] <= q_slot[:, None])).to(cu_seqlens.device)


class SdpaAttention(MegatronModule):
    """Megatron's core-attention interface on torch SDPA: padded causal rows, packed THD sequences
    (document mask), grouped-query attention and context parallel (K/V all-gathered over CP)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ConfigError(f"softmax_type={config.softmax_type!r}: SdpaAttention supports only 'vanilla'")
        if getattr(config, "window_size", None) is not None:
            raise ConfigError(f"window_size={config.window_size}: SdpaAttention has no sliding-window attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        tp = self.tp_group.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.kv_groups = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scores by the layer number and the softmax
        # multiplies it back (an fp16 range trick): the effective scale is this one either way.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attn_mask_type = attn_mask_type

    def _sdpa(self, q, k, v, *, mask=None, causal=False):
        """q [b, np, sq, hn], k/v [b, ng, sk, hn] -> [b, np, sq, hn]."""
        p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, is_causal=causal, scale=self.softmax_scale, enable_gqa=self.heads != self.kv_groups)
        if p == 0.0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, **kwargs)
        # dropout draws from the model-parallel RNG stream, as Megatron's DotProductAttention does
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, **kwargs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SdpaAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        if self.cp_group.size() > 1:
            raise ValueError("SdpaAttention: context parallel needs packed sequences (PackedSeqParams, qkv_format='thd')")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, n, hn] -> [b, n, s, hn]
        if attention_mask is not None:
            out = self._sdpa(q, k, v, mask=~attention_mask.bool())
        else:
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            out = self._sdpa(q, k, v, causal=mask_type == AttnMaskType.causal and q.shape[2] > 1)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _packed(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        if params.qkv_format != "thd":
            raise ValueError(f"SdpaAttention: packed qkv_format={params.qkv_format!r}, expected 'thd'")
        # Megatron's RoPE uses the padded boundaries when given: so does the mask.
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        if not torch.equal(cu_q.cpu(), cu_kv.cpu()):
            raise ValueError("SdpaAttention: packed self-attention needs the same cu_seqlens for queries and keys")
        cp = self.cp_group.size()
        mask = document_causal_mask(cu_q, cp, self.cp_group.rank() if cp > 1 else 0)
        if cp > 1:
            key = tensor_parallel.gather_from_sequence_parallel_region(key, True, group=self.cp_group)
            value = tensor_parallel.gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [t, n, hn] -> [1, n, t, hn]
        out = self._sdpa(q, k, v, mask=mask)
        return out[0].transpose(0, 1).reshape(query.shape[0], -1)
