"""The one HF Qwen2 <-> Megatron GPTModel weight mapping (used by the actor's loader, weight sync to
rollout engines, and the checkpoint converters).

Layouts (megatron-core 0.19):
  - linear_qkv rows (and bias) are grouped per key/value head: for each group, its query heads, then
    its key head, then its value head. Tensor parallelism splits whole groups, so each rank's shard is
    a contiguous run of groups.
  - linear_fc1 is the SwiGLU pair; each tensor-parallel rank holds cat(gate shard, up shard).
  - The vocabulary is padded to a multiple of TP (zero rows on import, stripped on export).
  - With Transformer Engine layers the two pre-norms live inside the fused linear layers.
Each Megatron parameter has one rule; import runs a rule forwards on the HF tensors, export runs it
backwards on the tensor-parallel shards gathered from the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_nft.model.qwen2 import Qwen2Shape

# How a Megatron tensor is split across tensor-parallel ranks and built from HF tensors.
REPLICATED, COLUMN, ROW, VOCAB, QKV, QKV_BIAS, GLU = "replicated", "column", "row", "vocab", "qkv", "qkv_bias", "glu"


@dataclass(frozen=True)
class Rule:
    megatron: str  # name inside GPTModel, with {i} for the stage-local layer index
    hf: tuple[str, ...]  # HF names, with {i} for the global layer index
    split: str


def _layer_rules(use_te: bool) -> list[Rule]:
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if use_te else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if use_te else "pre_mlp_layernorm.weight"
    hf = "model.layers.{i}."
    mg = "decoder.layers.{i}."
    return [
        Rule(mg + attn_norm, (hf + "input_layernorm.weight",), REPLICATED),
        Rule(
            mg + "self_attention.linear_qkv.weight",
            (hf + "self_attn.q_proj.weight", hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"),
            QKV,
        ),
        Rule(
            mg + "self_attention.linear_qkv.bias",
            (hf + "self_attn.q_proj.bias", hf + "self_attn.k_proj.bias", hf + "self_attn.v_proj.bias"),
            QKV_BIAS,
        ),
        Rule(mg + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), ROW),
        Rule(mg + mlp_norm, (hf + "post_attention_layernorm.weight",), REPLICATED),
        Rule(mg + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), GLU),
        Rule(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), ROW),
    ]


def stage_rules(shape: Qwen2Shape, *, use_te: bool, first_stage: bool, last_stage: bool) -> list[Rule]:
    """Rules for the non-layer parameters a pipeline stage owns, plus the per-layer template."""
    rules = []
    if first_stage:
        rules.append(Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB))
    if last_stage:
        rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
        # With tied embeddings the last stage still holds its own copy of the output weight when it
        # is not also the first stage (megatron-core keeps the two in sync through the embedding group).
        if not shape.tie_word_embeddings:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), VOCAB))
        elif not first_stage:
            rules.append(Rule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB))
    return rules


def hf_names(shape: Qwen2Shape) -> list[str]:
    """Every tensor name of the HF checkpoint, in the order transformers lists them."""
    names = ["model.embed_tokens.weight"]
    for i in range(shape.num_layers):
        for rule in _layer_rules(use_te=False):
            names.extend(n.format(i=i) for n in rule.hf)
    names.append("model.norm.weight")
    if not shape.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_tensor_shapes(shape: Qwen2Shape) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor an HF Qwen2 checkpoint with this config holds (see hf_names)."""
    h, d, ffn = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    shapes = {}
    for name in hf_names(shape):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
        elif name == "model.norm.weight":
            shapes[name] = (h,)
        else:  # model.embed_tokens.weight, lm_head.weight
            shapes[name] = (shape.vocab_size, h)
    return shapes


# ----------------------------------------------------------------------------------------------------
# forwards: HF tensors -> one rank's Megatron shard
# ----------------------------------------------------------------------------------------------------


def _merge_qkv(shape: Qwen2Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups, per, d = shape.num_kv_heads, shape.heads_per_group, shape.head_dim
    tail = q.shape[1:]
    q = q.reshape(groups, per * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * d, *tail)


def _split_qkv(shape: Qwen2Shape, fused: torch.Tensor):
    groups, per, d = shape.num_kv_heads, shape.heads_per_group, shape.head_dim
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, (per + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (
        q.reshape(groups * per * d, *tail),
        k.reshape(groups * d, *tail),
        v.reshape(groups * d, *tail),
    )


def shard_from_hf(shape: Qwen2Shape, rule: Rule, tensors: list[torch.Tensor], tp_rank: int, tp: int) -> torch.Tensor:
    if rule.split == REPLICATED:
        return tensors[0]
    if rule.split == COLUMN:
        return tensors[0].chunk(tp, dim=0)[tp_rank]
    if rule.split == ROW:
        return tensors[0].chunk(tp, dim=1)[tp_rank]
    if rule.split == VOCAB:
        full = tensors[0]
        pad = shape.padded_vocab_size(tp) - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
        return full.chunk(tp, dim=0)[tp_rank]
    if rule.split in (QKV, QKV_BIAS):
        return _merge_qkv(shape, *tensors).chunk(tp, dim=0)[tp_rank]
    if rule.split == GLU:
        gate, up = tensors
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
    raise AssertionError(rule.split)


def megatron_shard_state(
    shape: Qwen2Shape,
    fetch: Callable[[str], torch.Tensor],
    *,
    tp_rank: int,
    tp: int,
    layer_offset: int,
    num_local_layers: int,
    first_stage: bool,
    last_stage: bool,
    use_te: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (megatron name, shard) for one rank, fetching HF tensors by name one rule at a time so
    that a caller streaming from safetensors holds at most one layer's tensors."""
    for rule in stage_rules(shape, use_te=use_te, first_stage=first_stage, last_stage=last_stage):
        yield rule.megatron, shard_from_hf(shape, rule, [fetch(n) for n in rule.hf], tp_rank, tp)
    for local in range(num_local_layers):
        for rule in _layer_rules(use_te):
            names = [n.format(i=layer_offset + local) for n in rule.hf]
            yield rule.megatron.format(i=local), shard_from_hf(shape, rule, [fetch(n) for n in names], tp_rank, tp)


# ----------------------------------------------------------------------------------------------------
# backwards: the TP shards of one Megatron tensor -> HF tensors
# ----------------------------------------------------------------------------------------------------


def hf_from_shards(shape: Qwen2Shape, rule: Rule, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    if rule.split == REPLICATED:
        return [shards[0]]
    if rule.split == COLUMN:
        return [torch.cat(shards, dim=0)]
    if rule.split == ROW:
        return [torch.cat(shards, dim=1)]
    if rule.split == VOCAB:
        return [torch.cat(shards, dim=0)[: shape.vocab_size]]
    if rule.split in (QKV, QKV_BIAS):
        return list(_split_qkv(shape, torch.cat(shards, dim=0)))
    if rule.split == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    raise AssertionError(rule.split)


def rules_by_megatron_name(
    shape: Qwen2Shape, *, use_te: bool, layer_offset: int, num_local_layers: int, first_stage: bool, last_stage: bool
) -> dict[str, tuple[Rule, tuple[str, ...]]]:
    """megatron local name -> (rule, HF names with the global layer index filled in)."""
    table = {}
    for rule in stage_rules(shape, use_te=use_te, first_stage=first_stage, last_stage=last_stage):
        table[rule.megatron] = (rule, rule.hf)
    for local in range(num_local_layers):
        for rule in _layer_rules(use_te):
            table[rule.megatron.format(i=local)] = (rule, tuple(n.format(i=layer_offset + local) for n in rule.hf))
    return table
