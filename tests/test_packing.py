"""Packed (THD) sequences and context parallel: the packer, the SDPA core attention, the actor.

References are independent of the code under test: Megatron's own DotProductAttention (padded rows,
and each packed sequence run alone), plain-autograd attention written out here, megatron-core's THD
RoPE chunking, transformers' forward, and the actor's right-padded path (which
tests/test_actor_parallel.py checks against transformers). One spawn of two gloo ranks runs every
multi-rank check: packed DP=2, TP=2, PP=2 and CP=2 actors, and context-parallel attention.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from helpers import hf_token_logprobs, random_qwen2
from megatron_nft.config import AlgoConfig
from megatron_nft.data.batching import (
    PackedMicroBatch,
    needed_lengths,
    pack_rows,
    plan_packing,
    sequence_alignment,
)
from megatron_nft.data.context_parallel import gathered_order, restore_order, zigzag_indices
from megatron_nft.errors import ConfigError
from megatron_nft.testing import run_distributed

# ------------------------------------------------------------------------------------------------
# the packer
# ------------------------------------------------------------------------------------------------


def _random_lengths(n, seed, low=1, high=40):
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


PLANS = [  # (rows, dp, align, max_tokens, group_size, seed)
    (13, 1, 1, 64, 1, 0),
    (20, 2, 2, 50, 1, 1),
    (31, 4, 8, 80, 1, 2),
    (24, 3, 4, 170, 4, 3),
    (7, 2, 16, 48, 1, 4),
]


@pytest.mark.parametrize("rows,dp,align,max_tokens,group_size,seed", PLANS)
def test_plan_every_token_once_within_budget(rows, dp, align, max_tokens, group_size, seed):
    lengths = _random_lengths(rows, seed)
    seq = max(lengths)
    # unique token ids: token (r, t) = r * 1000 + t + 1; 0 marks padding
    tokens = torch.stack([torch.arange(seq) + r * 1000 + 1 for r in range(rows)])
    plan = plan_packing(lengths, max_tokens=max_tokens, dp=dp, align=align, group_size=group_size)
    assert len(plan) == dp and all(plan)  # every rank has work
    seen = []
    for mb in itertools.chain.from_iterable(plan):
        assert sum(mb.padded_lengths) == mb.total_tokens <= max_tokens
        assert all(p % align == 0 and p >= n for p, n in zip(mb.padded_lengths, mb.lengths))
        assert [lengths[r] for r in mb.rows] == list(mb.lengths)
        stream = mb.pack(tokens[list(mb.rows)])
        assert stream.shape == (mb.total_tokens,)
        seen += [int(t) for t in stream if t != 0]
        # groups stay whole
        assert all(r // group_size == mb.rows[i - i % group_size] // group_size for i, r in enumerate(mb.rows))
    expected = [r * 1000 + t + 1 for r in range(rows) for t in range(lengths[r])]
    assert sorted(seen) == expected  # each real token exactly once, no padding leaked in


@pytest.mark.parametrize("rows,dp,align,max_tokens,group_size,seed", PLANS)
def test_plan_balance_and_fill(rows, dp, align, max_tokens, group_size, seed):
    lengths = _random_lengths(rows, seed)
    plan = plan_packing(lengths, max_tokens=max_tokens, dp=dp, align=align, group_size=group_size)
    padded = [-(-n // align) * align for n in lengths]
    units = [sum(padded[u : u + group_size]) for u in range(0, rows, group_size)]
    load = [sum(mb.total_tokens for mb in rank) for rank in plan]
    assert sum(load) == sum(units)
    # greedy to the least-loaded rank: the spread is at most one unit
    assert max(load) - min(load) <= max(units)
    # first-fit: no two micro-batches of a rank are both at most half full (they would have merged)
    for rank in plan:
        assert sum(mb.total_tokens <= max_tokens / 2 for mb in rank) <= 1


def test_plan_balance_close_to_optimal():
    # brute force over every assignment of 9 rows to 2 or 3 ranks: LPT is within 4/3 of optimal
    for seed, dp in itertools.product(range(6), (2, 3)):
        lengths = _random_lengths(9, seed + 10)
        plan = plan_packing(lengths, max_tokens=10_000, dp=dp)
        best = min(
            max(sum(n for n, a in zip(lengths, assign) if a == r) for r in range(dp))
            for assign in itertools.product(range(dp), repeat=len(lengths))
        )
        got = max(sum(mb.total_tokens for mb in rank) for rank in plan)
        assert got <= best * (4 / 3 - 1 / (3 * dp)) + 1e-9, (lengths, got, best)


def test_plan_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"parallel\.max_tokens_per_micro_batch=16: row 1 needs 24 tokens"):
        plan_packing([5, 21, 3], max_tokens=16, align=8)
    with pytest.raises(ConfigError, match=r"the group of rows 2\.\.3 needs 20 tokens"):
        plan_packing([4, 4, 10, 10], max_tokens=16, group_size=2)
    with pytest.raises(ValueError, match="dp=4"):
        plan_packing([3, 3, 3], max_tokens=16, dp=4)
    with pytest.raises(ValueError, match="group_size=2"):
        plan_packing([3, 3, 3], max_tokens=16, group_size=2)


def test_sequence_alignment_rule():
    assert sequence_alignment() == 1
    assert sequence_alignment(tp=2) == 2  # sequence parallel splits the stream over TP
    assert sequence_alignment(tp=2, cp=2) == 8  # 2*cp zigzag chunks, each split over TP
    assert sequence_alignment(fp8=True) == 16
    assert sequence_alignment(tp=2, cp=3, fp8=True) == 48  # lcm(12, 3 x 16): each CP rank's share whole blocks
    assert sequence_alignment(tp=2, cp=3, fp8=True, sequence_parallel=True) == 96  # and each TP rank's
    assert sequence_alignment(tp=2, cp=3, fp8=True, blockwise=True) == 384  # 128-token blocks
    assert sequence_alignment(tp=2, cp=4, fp8=True) == 64  # was lcm(16, 16) = 16: 4 tokens per CP rank
    assert sequence_alignment(tp=4, blockwise=True) == 4  # the recipe matters only under FP8


FP8_LAYOUTS = [(tp, cp) for tp in (1, 2, 4, 8) for cp in (1, 2, 3, 4, 8)]


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("blockwise", [False, True])
def test_fp8_alignment_gives_every_rank_whole_gemm_blocks(blockwise, sequence_parallel):
    # Transformer Engine's FP8 GEMMs assert token counts in whole blocks (16; 128 for the blockwise
    # recipe) on every rank: a CP rank holds its zigzag chunks of every packed sequence, and sequence
    # parallel splits that share again over TP. Counted here from the packer's plan and the zigzag
    # split itself, for every layout (lcm(2*cp*tp, 16), the rule before, leaves 4 tokens per rank at cp=4).
    block = 128 if blockwise else 16
    lengths = _random_lengths(40, seed=7, low=1, high=700)
    for tp, cp in FP8_LAYOUTS:
        split = tp if sequence_parallel else 1  # TP ranks that share one CP rank's tokens
        align = sequence_alignment(tp=tp, cp=cp, fp8=True, blockwise=blockwise, sequence_parallel=sequence_parallel)
        assert align % sequence_alignment(tp=tp, cp=cp) == 0  # zigzag chunks still whole
        plan = plan_packing(lengths, max_tokens=64 * align, dp=2, align=align)
        for micro in itertools.chain.from_iterable(plan):
            cu = micro.cu_seqlens().tolist()
            for rank in range(cp):
                share = len(zigzag_indices(cu, cp, rank)) if cp > 1 else micro.total_tokens
                assert share % split == 0 and (share // split) % block == 0, (tp, cp, rank, share)
        # the padded (right-padded rows) path: a rank's [rows, width] micro-batch, its width so aligned
        width = -(-max(lengths) // align) * align
        assert (width // split) % block == 0


def test_actor_alignment_follows_its_layout_and_fp8_recipe():
    from megatron_nft import microbatches
    from megatron_nft.model.qwen2 import ModelOptions

    def alignment(tp, cp, sequence_parallel=False, **options):
        options = ModelOptions(**options)  # what the actor passes to its micro-batch plan
        return microbatches.alignment(tp=tp, cp=cp, fp8=options.fp8, fp8_recipe=options.fp8_recipe,
                                      sequence_parallel=sequence_parallel)

    assert alignment(2, 4) == 16
    assert alignment(2, 4, fp8="hybrid", fp8_recipe="tensorwise") == 64
    assert alignment(2, 4, True, fp8="hybrid", fp8_recipe="tensorwise") == 2 * 4 * 16
    assert alignment(1, 4, fp8="hybrid", fp8_recipe="blockwise") == 4 * 128
    assert alignment(8, 1, fp8="e4m3") == 16


def test_unpack_inverts_pack_and_is_its_adjoint():
    mb = PackedMicroBatch(rows=(4, 0, 2), lengths=(3, 5, 1), padded_lengths=(4, 8, 4), total_tokens=16)
    seq = 6
    x = torch.randn(3, seq, dtype=torch.float64)
    valid = torch.arange(seq)[None] < torch.tensor(mb.lengths)[:, None]
    assert torch.equal(mb.unpack(mb.pack(x), seq), torch.where(valid, x, 0.0))
    # <unpack(s), x> == <s, pack(x)>: unpack's backward (autograd) is pack, as the loss needs
    s = torch.randn(16, dtype=torch.float64, requires_grad=True)
    (mb.unpack(s, seq) * x).sum().backward()
    assert torch.allclose(s.grad, mb.pack(x))
    assert mb.positions().tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    wide = mb.padded_to(20)
    assert wide.cu_seqlens().tolist() == [0, 4, 12, 16, 20]  # a trailing padding segment
    assert wide.max_seqlen() == 8 and wide.positions()[-4:].tolist() == [0, 1, 2, 3]


def test_needed_lengths_from_pack_rows():
    prompts = [[5, 6, 7], [8], [9, 9]]
    responses = [[1, 2], [3, 4, 5, 6], []]
    batch = pack_rows(prompts, responses)
    # a row ends at its last response token; a row without response keeps one token
    assert needed_lengths(batch["loss_mask"]) == [5, 5, 1]


# ------------------------------------------------------------------------------------------------
# context-parallel splitting
# ------------------------------------------------------------------------------------------------


def test_zigzag_split_matches_megatron_thd_rope():
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    cu = [0, 8, 12, 36]
    cp = 2
    assert zigzag_indices(cu, cp, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 30, 31, 32, 33, 34, 35]
    order = gathered_order(cu, cp)
    assert sorted(order.tolist()) == list(range(36))  # the ranks partition the stream
    stream = torch.arange(36) * 10
    assert torch.equal(stream[order][restore_order(cu, cp)], stream)
    # megatron-core's THD RoPE gives each rank these positions of each sequence
    positions = torch.cat([torch.arange(e - s) for s, e in zip(cu[:-1], cu[1:])]).float()[:, None]
    for rank in range(cp):
        expected = []
        for s, e in zip(cu[:-1], cu[1:]):
            local = torch.empty((e - s) // cp, 1)
            expected.append(_get_thd_freqs_on_this_cp_rank(rank, cp, local, torch.arange(e - s).float()[:, None]))
        assert torch.equal(positions[zigzag_indices(cu, cp, rank)], torch.cat(expected))
    with pytest.raises(ValueError, match="multiple of 2\\*cp=4"):
        zigzag_indices([0, 6], 2, 0)


# ------------------------------------------------------------------------------------------------
# SDPA core attention vs Megatron's DotProductAttention and plain autograd
# ------------------------------------------------------------------------------------------------


def reference_packed_attention(q, k, v, cu_seqlens, scale):
    """Plain autograd: each sequence alone, causal softmax, K/V heads repeated for GQA. [t, n, d]."""
    rep = q.shape[1] // k.shape[1]
    out = []
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = q[s:e], k[s:e].repeat_interleave(rep, 1), v[s:e].repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
    return torch.cat(out).reshape(q.shape[0], -1)


@pytest.fixture(scope="module")
def single_rank():
    """Megatron parallel state for one in-process rank, and the model config of a tiny Qwen2."""
    from megatron_nft import runtime
    from megatron_nft.model.qwen2 import shape_from_hf, transformer_config

    runtime.init_model_parallel(runtime.ParallelLayout(), seed=0)
    config, _ = random_qwen2()
    with runtime.megatron_device_compat():
        return transformer_config(shape_from_hf(config), dtype=torch.float32, tp=1, pp=1)


def _qkv(shape_q, shape_kv, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).requires_grad_() for s in (shape_q, shape_kv, shape_kv)]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_equals_megatron_dot_product_attention_on_padded_rows(single_rank, kv_heads):
    import copy

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_nft.model.attention import SdpaAttention

    from megatron_nft.runtime import megatron_device_compat

    config = copy.deepcopy(single_rank)
    config.num_query_groups = kv_heads
    s, b, heads, d = 9, 3, config.num_attention_heads, config.kv_channels
    ref = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    ours = SdpaAttention(config, 1, AttnMaskType.causal, "self")
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    # a left-padding style mask too: row-specific, not just causal
    ragged = causal | (torch.arange(s)[None, None, None, :] < torch.tensor([0, 2, 4])[:, None, None, None])
    ragged[:, :, :4, :4] = causal[:, :, :4, :4]  # no query row left without a key
    for mask in (causal, ragged):
        grads = []
        for module in (ref, ours):
            q, k, v = _qkv((s, b, heads, d), (s, b, kv_heads, d), seed=1)
            with megatron_device_compat():  # Megatron's attention allocates on "the current device"
                out = module(q, k, v, mask)
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((out.detach(), q.grad, k.grad, v.grad))
        for got, want in zip(grads[1], grads[0]):
            assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    # no mask: the module's own causal mask type
    q, k, v = _qkv((s, b, heads, d), (s, b, kv_heads, d), seed=2)
    with megatron_device_compat():
        assert torch.allclose(ours(q, k, v, None), ref(q, k, v, causal), atol=1e-6)


def test_sdpa_packed_equals_each_sequence_alone(single_rank):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_nft.model.attention import SdpaAttention, document_causal_mask

    config = single_rank
    heads, groups, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
    cu = [0, 5, 6, 13, 16]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=7, max_seqlen_kv=7)
    ours = SdpaAttention(config, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv((16, heads, d), (16, groups, d), seed=3)
    out = ours(q, k, v, None, packed_seq_params=params)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * weight).sum().backward()
    got = (out.detach(), q.grad, k.grad, v.grad)
    # Megatron's DotProductAttention on each sequence alone, as a batch of one padded row
    from megatron_nft.runtime import megatron_device_compat

    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    pieces = []
    for s, e in zip(cu[:-1], cu[1:]):
        causal = torch.ones(e - s, e - s, dtype=torch.bool).triu(1)[None, None]
        with megatron_device_compat():
            pieces.append(ref(q2[s:e, None], k2[s:e, None], v2[s:e, None], causal)[:, 0])
    expected = torch.cat(pieces)
    (expected * weight).sum().backward()
    for a, b in zip(got, (expected.detach(), q2.grad, k2.grad, v2.grad)):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    # the document mask in closed form for a tiny case: [0, 2, 3] -> blocks of 2 and 1
    assert document_causal_mask(torch.tensor([0, 2, 3])).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


# ------------------------------------------------------------------------------------------------
# the actor: packed vs right-padded, one rank in process and two gloo ranks in one spawn
# ------------------------------------------------------------------------------------------------

BUDGET = 32  # tokens per packed micro-batch: several rows per micro-batch, several micro-batches


def make_batch(vocab: int, seed: int = 0):
    """Eight rows of very different lengths (3 to 16 tokens) in a [8, 16] right-padded batch."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = [3, 5, 2, 4, 6, 3, 2, 5]
    length = [16, 7, 3, 12, 9, 14, 5, 10]
    prompts = [torch.randint(1, vocab, (p,), generator=g).tolist() for p in prompt_len]
    responses = [torch.randint(1, vocab, (n - p,), generator=g).tolist() for n, p in zip(length, prompt_len)]
    batch = pack_rows(prompts, responses)
    batch["rewards"] = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    batch["correct_rate"] = torch.tensor([0.5] * 4 + [0.5] * 4)
    return batch


_OPEN_ACTORS: list = []  # closed after each test (an actor lives until closed)


@pytest.fixture(autouse=True)
def _close_actors():
    yield
    while _OPEN_ACTORS:
        _OPEN_ACTORS.pop().close()


def _actor(shape, state, **kw):
    from megatron_nft.actor import Actor
    from megatron_nft.config import OptimConfig

    kw = {"micro_batch_size": 2, "algo": AlgoConfig(name="nft", agg="token_sum_norm", agg_norm=50.0), **kw}
    actor = Actor(shape, optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0), **kw)
    _OPEN_ACTORS.append(actor)
    actor.load_hf(lambda n: state[n])
    return actor


def _run_actor(actor, batch) -> dict:
    micro, _ = actor.microbatches.split({k: batch[k] for k in ("tokens", "loss_mask")})
    packed = [m["packed"].micro.rows for m in micro] if "packed" in micro[0] else None
    full_width, _ = actor.compute_logprobs({"tokens": batch["tokens"]})
    logprobs, entropy = actor.compute_logprobs(batch)
    metrics = actor.train_step(batch)
    after, _ = actor.compute_logprobs(batch)
    return {"packed": packed, "full_width": full_width, "logprobs": logprobs, "entropy": entropy,
            "metrics": metrics, "after": after}


def _attention_cp_check(rank: int) -> dict:
    """CP=2 SdpaAttention on this rank's zigzag share vs plain autograd attention on the whole stream."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_nft import runtime
    from megatron_nft.model.attention import SdpaAttention
    from megatron_nft.model.qwen2 import shape_from_hf, transformer_config

    runtime.init_model_parallel(runtime.ParallelLayout(cp=2), seed=0)
    config, _ = random_qwen2()
    cu = [0, 8, 12, 24]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    mine = zigzag_indices(cu, 2, rank)
    with runtime.megatron_device_compat():
        tc = transformer_config(shape_from_hf(config), dtype=torch.float32, tp=1, pp=1, cp=2)
        module = SdpaAttention(tc, 1, AttnMaskType.causal, "self")
        q, k, v = _qkv((24, tc.num_attention_heads, tc.kv_channels), (24, tc.num_query_groups, tc.kv_channels), seed=5)
        weight = torch.randn(24, tc.num_attention_heads * tc.kv_channels, generator=torch.Generator().manual_seed(6))
        ref = reference_packed_attention(q, k, v, cu, 1 / math.sqrt(tc.kv_channels))
        (ref * weight).sum().backward()
        local = [x.detach()[mine].clone().requires_grad_() for x in (q, k, v)]
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=12, max_seqlen_kv=12)
        out = module(*local, None, packed_seq_params=params)
        # the loss summed over ranks is the whole stream's: each rank's K/V grads gather every rank's part
        (out * weight[mine]).sum().backward()
    return {
        "out": (out.detach() - ref.detach()[mine]).abs().max().item(),
        "grads": max((x.grad - full.grad[mine]).abs().max().item() for x, full in zip(local, (q, k, v))),
    }


SPAWN_LAYOUTS = {"dp2": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "cp2": {"cp": 2}}


def _spawn_worker(rank, world_size, config, state, batch):
    from megatron_nft.model.qwen2 import shape_from_hf

    out = {"attention_cp": _attention_cp_check(rank)}
    shape = shape_from_hf(config)
    for name, layout in SPAWN_LAYOUTS.items():
        actor = _actor(shape, state, max_tokens_per_micro_batch=BUDGET, **layout)
        out[name] = _run_actor(actor, batch)
        _OPEN_ACTORS.pop().close()  # this actor: freed before the next layout's
    return out


@pytest.fixture(scope="module")
def model_and_batch():
    config, model = random_qwen2()
    batch = make_batch(config.vocab_size)
    ref = hf_token_logprobs(model, batch["tokens"])
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)) * 0.2
    batch["old_logprobs"] = (ref + noise) * batch["loss_mask"]
    return config, {k: v.clone() for k, v in model.state_dict().items()}, batch, ref


@pytest.fixture(scope="module")
def in_process(model_and_batch):
    from megatron_nft.model.qwen2 import shape_from_hf

    config, state, batch, _ = model_and_batch
    shape = shape_from_hf(config)
    return {
        "padded": _run_actor(_actor(shape, state), batch),
        "packed": _run_actor(_actor(shape, state, max_tokens_per_micro_batch=BUDGET), batch),
    }


def test_packed_infonca_keeps_groups_whole(model_and_batch):
    # InfoNCA's loss contrasts the K answers of a prompt: packing must keep each group in one
    # micro-batch (a row-level plan at this budget would mix the two groups) and match the padded path.
    from megatron_nft.model.qwen2 import shape_from_hf

    config, state, batch, _ = model_and_batch
    shape = shape_from_hf(config)
    algo = dict(algo=AlgoConfig(name="infonca"), micro_batch_size=4)
    padded = _actor(shape, state, **algo).train_step(batch, group_size=4)
    actor = _actor(shape, state, max_tokens_per_micro_batch=48, **algo)
    micro, _ = actor.microbatches.split({k: batch[k] for k in ("tokens", "loss_mask")}, group_size=4)
    assert sorted(sorted(m["packed"].micro.rows) for m in micro) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rows_level = plan_packing(needed_lengths(batch["loss_mask"]), max_tokens=48)[0]
    assert any(len({r // 4 for r in mb.rows}) > 1 for mb in rows_level)
    packed = actor.train_step(batch, group_size=4)
    assert abs(padded["loss"]) > 1e-3
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_infonca_groups_larger_than_a_micro_batch_give_the_same_step(path, model_and_batch):
    # 2-row micro-batches or a 20-token budget cannot hold a group of 4 rows (up to 45 tokens): the
    # step then takes per-token coefficients from a forward pre-pass; loss, gradient and update equal
    # the whole-group step's.
    from megatron_nft.model.qwen2 import shape_from_hf

    config, state, batch, _ = model_and_batch
    shape = shape_from_hf(config)
    algo = dict(algo=AlgoConfig(name="infonca", sft_coef=0.5))
    whole_actor = _actor(shape, state, micro_batch_size=4, **algo)
    whole = whole_actor.train_step(batch, group_size=4)
    split_kw = {"micro_batch_size": 2} if path == "padded" else {"max_tokens_per_micro_batch": 20}
    split_actor = _actor(shape, state, **split_kw, **algo)
    assert not split_actor.microbatches.groups_fit(batch, 4)
    split = split_actor.train_step(batch, group_size=4)
    assert abs(whole["loss"]) > 1e-3
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    assert split["tokens"] == whole["tokens"] and split["ratio_mean"] == pytest.approx(whole["ratio_mean"], rel=1e-6)
    after_whole, _ = whole_actor.compute_logprobs(batch)
    after_split, _ = split_actor.compute_logprobs(batch)
    mask = batch["loss_mask"].bool()  # the packed path leaves positions past a row's last label at 0
    assert torch.allclose(after_split[mask], after_whole[mask], atol=1e-6)


@pytest.fixture(scope="module")
def spawned(model_and_batch):
    config, state, batch, _ = model_and_batch
    ranks = run_distributed(_spawn_worker, 2, config, state, batch)
    return ranks


def _assert_same_as_padded(got, padded, batch, ref):
    mask = batch["loss_mask"].bool()
    assert torch.allclose(got["logprobs"][mask], ref[mask], atol=1e-5)  # transformers' forward
    assert torch.allclose(got["logprobs"][mask], padded["logprobs"][mask], atol=1e-5)
    assert torch.allclose(got["entropy"][mask], padded["entropy"][mask], atol=1e-5)
    # without a loss mask every row is packed at full width: every position matches
    assert torch.allclose(got["full_width"], padded["full_width"], atol=1e-5)
    m, p = got["metrics"], padded["metrics"]
    assert abs(p["loss"]) > 1e-3  # not a comparison between zeros
    assert m["loss"] == pytest.approx(p["loss"], rel=1e-5, abs=1e-7)
    assert m["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-5)
    assert m["tokens"] == p["tokens"] == batch["loss_mask"].sum().item()
    assert m["entropy"] == pytest.approx(p["entropy"], rel=1e-5)
    assert torch.allclose(got["after"][mask], padded["after"][mask], atol=1e-5)
    assert (got["after"][mask] - got["logprobs"][mask]).abs().max() > 1e-3  # the step moved the policy


def test_packed_actor_matches_padded_on_one_rank(in_process, model_and_batch):
    _, _, batch, ref = model_and_batch
    packed = in_process["packed"]
    assert max(len(rows) for rows in packed["packed"]) > 1 and len(packed["packed"]) > 1  # really packed
    assert sorted(r for rows in packed["packed"] for r in rows) == list(range(8))
    _assert_same_as_padded(packed, in_process["padded"], batch, ref)


@pytest.mark.parametrize("layout", list(SPAWN_LAYOUTS))
def test_packed_actor_matches_padded_on_two_ranks(spawned, in_process, model_and_batch, layout):
    _, _, batch, ref = model_and_batch
    for rank_out in spawned:
        _assert_same_as_padded(rank_out[layout], in_process["padded"], batch, ref)
    if layout == "dp2":
        # balanced: the ranks' rows split the batch, and their token loads differ by at most one row
        rows = [sorted(r for mb in out["dp2"]["packed"] for r in mb) for out in spawned]
        assert sorted(rows[0] + rows[1]) == list(range(8)) and not set(rows[0]) & set(rows[1])
        lengths = needed_lengths(batch["loss_mask"])
        load = [sum(lengths[r] for r in rs) for rs in rows]
        assert abs(load[0] - load[1]) <= max(lengths)


def test_context_parallel_attention_is_autograd_exact(spawned):
    for rank_out in spawned:
        assert rank_out["attention_cp"]["out"] < 1e-6
        assert rank_out["attention_cp"]["grads"] < 1e-6


# ------------------------------------------------------------------------------------------------
# activation recompute (parallel.recompute): the same step, with the recomputed modules run twice
# ------------------------------------------------------------------------------------------------


def _forward_calls(actor) -> dict:
    """Counts forward calls of core attention and MLP modules (forward hooks on the live model)."""
    from megatron.core.transformer.mlp import MLP

    from megatron_nft.model.attention import SdpaAttention

    counts = {"core_attn": 0, "mlp": 0}
    for module in actor.model.module.modules():
        kind = "core_attn" if isinstance(module, SdpaAttention) else "mlp" if isinstance(module, MLP) else None
        if kind:
            module.register_forward_hook(lambda *_, kind=kind: counts.__setitem__(kind, counts[kind] + 1))
    return counts


@pytest.mark.parametrize("recompute", ["core_attn", "mlp", "full"])
@pytest.mark.parametrize("path", ["padded", "packed"])
def test_recompute_gives_the_same_step(recompute, path, in_process, model_and_batch):
    from megatron_nft.model.qwen2 import ModelOptions, shape_from_hf

    config, state, batch, _ = model_and_batch
    kw = {"max_tokens_per_micro_batch": BUDGET} if path == "packed" else {}
    actor = _actor(shape_from_hf(config), state, options=ModelOptions(recompute=recompute), **kw)
    assert actor.config.recompute_granularity == ("full" if recompute == "full" else "selective")
    micro, _ = actor.microbatches.split({k: batch[k] for k in ("tokens", "loss_mask")})
    counts = _forward_calls(actor)
    metrics = actor.train_step(batch)
    # each layer's forward runs once per micro-batch, and once more for what is recomputed
    once = config.num_hidden_layers * len(micro)
    twice = {"core_attn": {"core_attn"}, "mlp": {"mlp"}, "full": {"core_attn", "mlp"}}[recompute]
    assert counts == {kind: once * (2 if kind in twice else 1) for kind in counts}
    reference = in_process[path]
    assert metrics["loss"] == pytest.approx(reference["metrics"]["loss"], rel=1e-6, abs=1e-9)
    assert metrics["grad_norm"] == pytest.approx(reference["metrics"]["grad_norm"], rel=1e-6)
    after, _ = actor.compute_logprobs(batch)
    assert torch.allclose(after, reference["after"], atol=1e-6)  # the same update


@pytest.mark.parametrize("path", ["padded", "packed"])
def test_fp8_padding_changes_no_logprob_nor_step(path, in_process, model_and_batch):
    import dataclasses

    from megatron_nft.model.qwen2 import shape_from_hf

    config, state, batch, _ = model_and_batch
    # rows padded as FP8 pads them, on CPU without Transformer Engine: this actor's micro-batch plan
    # aligns to 24 tokens, neither a divisor nor a multiple of the batch's 16 columns or of any row
    kw = {"max_tokens_per_micro_batch": 3 * 24} if path == "packed" else {}
    actor = _actor(shape_from_hf(config), state, **kw)
    actor.microbatches = dataclasses.replace(actor.microbatches, align=24)
    micro, _ = actor.microbatches.split({k: batch[k] for k in ("tokens", "loss_mask")})
    if path == "padded":
        assert {m["tokens"].shape[1] for m in micro} == {24}  # 16 columns padded to 24
    else:
        assert all(n % 24 == 0 for m in micro for n in m["packed"].micro.padded_lengths)
    got = _run_actor(actor, batch)
    ref = in_process[path]  # the same path at this layout's own alignment (1)
    assert got["logprobs"].shape == ref["logprobs"].shape == batch["tokens"].shape
    assert torch.allclose(got["logprobs"], ref["logprobs"], atol=1e-6)
    assert torch.allclose(got["entropy"], ref["entropy"], atol=1e-6)
    assert torch.allclose(got["full_width"], ref["full_width"], atol=1e-6)
    assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-6, abs=1e-9)
    assert got["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-6)
    assert torch.allclose(got["after"], ref["after"], atol=1e-6)  # the same update


@pytest.mark.gpu
def test_fp8_actor_runs_rows_of_odd_width(model_and_batch):
    """Transformer Engine FP8 on rows whose width (15) and lengths are not multiples of 16: the padded
    and packed paths run (TE asserts whole blocks) and stay near the bf16 actor's log-probs."""
    from megatron_nft.model.qwen2 import ModelOptions, shape_from_hf, te_available

    if not te_available():
        pytest.skip("needs CUDA and transformer_engine")
    config, state, batch, _ = model_and_batch
    batch = {k: v[:, :15] if v.dim() == 2 else v for k, v in batch.items()}
    shape = shape_from_hf(config)
    bf16 = _actor(shape, state, dtype="bf16", options=ModelOptions(impl="te")).compute_logprobs(batch)[0]
    mask = batch["loss_mask"].bool()
    for kw in ({}, {"max_tokens_per_micro_batch": 64}):
        actor = _actor(shape, state, dtype="bf16", options=ModelOptions(impl="te", fp8="hybrid", fp8_recipe="tensorwise"), **kw)
        assert actor.microbatches.align == 16
        logprobs, _ = actor.compute_logprobs(batch)
        assert torch.isfinite(logprobs).all() and (logprobs[mask] - bf16[mask]).abs().max() < 0.5
        assert math.isfinite(actor.train_step(batch)["loss"])


@pytest.mark.gpu
def test_packed_actor_on_cuda_matches_padded(model_and_batch):
    """On CUDA "auto" picks FlexAttention (compiled) for packed micro-batches without TE: the same
    log-probs and step as the padded path (fp32 weights, so the tolerance is the kernels')."""
    from megatron_nft.model.qwen2 import ModelOptions, shape_from_hf

    config, state, batch, ref = model_and_batch
    shape = shape_from_hf(config)
    options = ModelOptions(impl="local")
    padded = _run_actor(_actor(shape, state, options=options), batch)
    packed_actor = _actor(shape, state, options=options, max_tokens_per_micro_batch=BUDGET)
    assert packed_actor.options.packed_attention == "flex"
    packed = _run_actor(packed_actor, batch)
    mask = batch["loss_mask"].bool()
    assert torch.allclose(packed["logprobs"][mask], ref[mask], atol=1e-4)
    assert torch.allclose(packed["logprobs"][mask], padded["logprobs"][mask], atol=1e-4)
    assert packed["metrics"]["loss"] == pytest.approx(padded["metrics"]["loss"], rel=1e-4, abs=1e-6)
    assert packed["metrics"]["grad_norm"] == pytest.approx(padded["metrics"]["grad_norm"], rel=1e-4)
