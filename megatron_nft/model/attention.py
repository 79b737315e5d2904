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

Packed sequences have two backends (`packed_backend`):

  "dense"  a [t_local, t] boolean document mask per layer call, handed to SDPA. O(t^2) memory, and
           SDPA falls back from its flash kernels to the math/efficient ones under an arbitrary
           mask: right for CPU tests and small runs. The default.
  "flex"   torch FlexAttention with a BlockMask built from the same document/zigzag slots, once per
           micro-batch and shared by every layer. On CUDA the kernel is torch.compile'd, skips the
           blocks no query can see and never forms the scores matrix: the choice for long packed
           sequences on GPUs without Transformer Engine (with it, use TE's THD kernels). On CPU
           torch runs flex eagerly (a dense reference implementation) and, as of torch 2.14,
           refuses its backward pass: forward-only there (logprobs, tests). No attention dropout.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_nft.data.context_parallel import gathered_order, zigzag_indices
from megatron_nft.errors import ConfigError


PACKED_BACKENDS = ("dense", "flex")


def check_packed_backend(name: str) -> str:
    """`name` if it is one of PACKED_BACKENDS, else a ConfigError naming it and the allowed ones."""
    if name not in PACKED_BACKENDS:
        allowed = ", ".join(repr(b) for b in PACKED_BACKENDS)
        raise ConfigError(f"packed_backend={name!r}: SdpaAttention's packed backends are {allowed}")
    return name


def document_slots(cu_seqlens: Sequence[int] | torch.Tensor, cp: int = 1, cp_rank: int = 0):
    """(q_slot, k_slot, segment) on the CPU: the stream slot of each local query row, of each key
    row, and the segment (sequence) of each stream slot.

    Queries are this CP rank's zigzag slots of the stream, keys every rank's slots in rank-major
    order (what an all-gather returns); with cp = 1 both are the stream itself."""
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])])
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    if cp == 1:
        q_slot = k_slot = torch.arange(bounds[-1])
    else:
        q_slot, k_slot = zigzag_indices(bounds, cp, cp_rank), gathered_order(bounds, cp)
    return q_slot, k_slot, segment


def document_causal_mask(cu_seqlens: torch.Tensor, cp: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """[t_local, t] booleans, True where a query may attend to a key (SDPA's convention): the keys
    of its own segment at or before its own slot (see document_slots for the row orders)."""
    q_slot, k_slot, segment = document_slots(cu_seqlens, cp, cp_rank)
    same = segment[q_slot][:, None] == segment[k_slot][None, :]
    return (same & (k_slot[None, :] <= q_slot[:, None])).to(cu_seqlens.device)


def _document_mask_mod(q_slot: torch.Tensor, k_slot: torch.Tensor, segment: torch.Tensor):
    """document_causal_mask as a FlexAttention mask_mod, evaluated per (query row, key row)."""
    q_segment, k_segment = segment[q_slot], segment[k_slot]

    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_segment[q_idx] == k_segment[kv_idx]) & (k_slot[kv_idx] <= q_slot[q_idx])

    return mask_mod


# Every layer of a micro-batch asks for the same mask, so one build serves them all. Two entries,
# not one: activation recomputation and pipeline schedules interleave two micro-batches' forwards.
@functools.lru_cache(maxsize=2)
def _cached_block_mask(bounds: tuple[int, ...], cp: int, cp_rank: int, device: torch.device) -> BlockMask:
    q_slot, k_slot, segment = (x.to(device) for x in document_slots(bounds, cp, cp_rank))
    # Eager create_block_mask evaluates mask_mod densely ([t_local, t] booleans, freed on return);
    # on CUDA the compiled builder (torch's `_compile` flag) evaluates it block by block instead.
    # Either way it is paid once per micro-batch, where the dense backend pays it in every layer and
    # keeps it for the backward pass. What stays cached is per 128x128 block, and the O(t) slot tensors.
    return create_block_mask(
        _document_mask_mod(q_slot, k_slot, segment), None, None, len(q_slot), len(k_slot), device=device,
        _compile=device.type == "cuda",
    )


def document_block_mask(
    cu_seqlens: Sequence[int] | torch.Tensor, cp: int = 1, cp_rank: int = 0, device: torch.device | str = "cpu"
) -> BlockMask:
    """The FlexAttention BlockMask of document_causal_mask, cached for the latest micro-batches."""
    bounds = tuple(cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)
    return _cached_block_mask(bounds, cp, cp_rank, torch.device(device))


@functools.cache
def _compiled_flex_attention():
    # Compiled once per process, on first use: only compiled flex fuses mask_mod into a kernel that
    # skips masked blocks; its automatic dynamic shapes absorb each micro-batch's new length.
    return torch.compile(flex_attention)


def _eager_flex_attention(*args, **kwargs):
    # Eager flex is the CPU test path, where its "called without torch.compile" advice is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def flex_document_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, scale: float
) -> torch.Tensor:
    """query [t_local, np, hn], key/value [t, ng, hn] (rows in the block mask's orders) ->
    [t_local, np*hn]. GQA maps query head h to key/value group h // (np / ng), as SDPA does."""
    attend = _compiled_flex_attention() if query.device.type == "cuda" else _eager_flex_attention
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [t, n, hn] -> [1, n, t, hn]
    out = attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).reshape(query.shape[0], -1)


class SdpaAttention(MegatronModule):
    """Megatron's core-attention interface on torch SDPA: padded causal rows, packed THD sequences
    (document mask, dense or FlexAttention), grouped-query attention and context parallel (K/V
    all-gathered over CP)."""

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
        packed_backend: str = "dense",
    ):
        super().__init__(config=config)
        self.packed_backend = check_packed_backend(packed_backend)
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
        cp_rank = self.cp_group.rank() if cp > 1 else 0
        if cp > 1:
            key = tensor_parallel.gather_from_sequence_parallel_region(key, True, group=self.cp_group)
            value = tensor_parallel.gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        if self.packed_backend == "flex":
            return self._flex(query, key, value, cu_q, cp, cp_rank)
        mask = document_causal_mask(cu_q, cp, cp_rank)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [t, n, hn] -> [1, n, t, hn]
        out = self._sdpa(q, k, v, mask=mask)
        return out[0].transpose(0, 1).reshape(query.shape[0], -1)

    def _flex(self, query, key, value, cu_seqlens, cp: int, cp_rank: int) -> torch.Tensor:
        if self.training and self.dropout_p > 0:
            raise ValueError(
                f"SdpaAttention: attention dropout {self.dropout_p} with packed_backend='flex', which has no "
                "dropout; set attention_dropout to 0 or use packed_backend='dense'"
            )
        block_mask = document_block_mask(cu_seqlens, cp, cp_rank, query.device)
        return flex_document_attention(query, key, value, block_mask, self.softmax_scale)
