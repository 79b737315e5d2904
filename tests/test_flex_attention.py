"""SdpaAttention's FlexAttention packed backend against its dense document mask.

The dense path is itself checked against Megatron's DotProductAttention and plain autograd in
tests/test_packing.py; here flex must reproduce it: outputs and q/k/v gradients on packed streams of
unequal sequences with grouped-query attention, context-parallel query/key orders without process
groups, the block-mask cache, the module wiring and the backend's validation.

torch (2.14) refuses FlexAttention's backward on CPU with an up-front device check, though its eager
implementation differentiates fine; the gradient tests lift that one check (`flex_cpu_backward`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import random_qwen2
from megatron_nft.data.context_parallel import gathered_order, zigzag_indices
from megatron_nft.errors import ConfigError
from megatron_nft.model.attention import (
    PACKED_BACKENDS,
    _cached_block_mask,
    check_packed_backend,
    document_block_mask,
    document_causal_mask,
    flex_document_attention,
)

HEADS, GROUPS, DIM = 4, 2, 16
SCALE = DIM**-0.5
TOL = 1e-5


def _bounds(lengths, align=1):
    """cu_seqlens of `lengths`, each padded up to a multiple of `align` (the packer's padded bounds)."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + -(-n // align) * align)
    return bounds


# One 128-row block (t = 64), and several blocks with fully visible ones inside the long sequence
# (the kernels skip mask_mod there, so the block bookkeeping must be right too).
STREAMS = {"one_block": _bounds([5, 17, 9, 33]), "multi_block": _bounds([5, 17, 9, 33, 300])}


def _qkv(t, seed, t_kv=None):
    g = torch.Generator().manual_seed(seed)
    shapes = ((t, HEADS, DIM), (t_kv or t, GROUPS, DIM), (t_kv or t, GROUPS, DIM))
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _dense(q, k, v, bounds, cp=1, cp_rank=0):
    """The dense backend's computation: SDPA under document_causal_mask, [t_local, np*hn]."""
    mask = document_causal_mask(torch.tensor(bounds), cp, cp_rank)
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=SCALE, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _flex(q, k, v, bounds, cp=1, cp_rank=0):
    return flex_document_attention(q, k, v, document_block_mask(bounds, cp, cp_rank), SCALE)


def _max_diff(got, want):
    return max((a - b).abs().max().item() for a, b in zip(got, want))


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    """Lift torch's CPU guard on FlexAttention's backward (raising=False: a torch without it is fine)."""
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None, raising=False)


@pytest.mark.parametrize("stream", STREAMS)
def test_flex_equals_dense_outputs_and_gradients(stream, flex_cpu_backward):
    bounds = STREAMS[stream]
    t = bounds[-1]
    weight = torch.randn(t, HEADS * DIM, generator=torch.Generator().manual_seed(1))
    results = []
    for attend in (_dense, _flex):
        q, k, v = _qkv(t, seed=0)
        out = attend(q, k, v, bounds)
        (out * weight).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    (dense, *_), (flex, *_) = results
    assert dense.shape == flex.shape == (t, HEADS * DIM)
    assert _max_diff(results[1], results[0]) < TOL


@pytest.mark.parametrize("cp", [2, 4])
def test_flex_context_parallel_rows_equal_dense_stream(cp, flex_cpu_backward):
    """Each CP rank's zigzag queries against the whole stream's keys in all-gather order give that
    rank's rows of the cp = 1 result; summed over ranks, the gradients are the whole stream's."""
    bounds = _bounds([5, 17, 9, 33, 150], align=2 * cp)  # CP splits padded sequences into 2*cp chunks
    t = bounds[-1]
    weight = torch.randn(t, HEADS * DIM, generator=torch.Generator().manual_seed(2))
    q, k, v = _qkv(t, seed=3)
    want = _dense(q, k, v, bounds)
    (want * weight).sum().backward()
    want_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    order = gathered_order(bounds, cp)
    for rank in range(cp):
        mine = zigzag_indices(bounds, cp, rank)
        out = _flex(q[mine], k[order], v[order], bounds, cp, rank)
        assert (out - want.detach()[mine]).abs().max() < TOL
        # the dense backend's CP mask on the same rows agrees too
        assert (out - _dense(q[mine], k[order], v[order], bounds, cp, rank)).abs().max() < TOL
        (out * weight[mine]).sum().backward()
    assert _max_diff([x.grad for x in (q, k, v)], want_grads) < TOL


def test_block_mask_matches_dense_mask_and_is_cached():
    from torch.nn.attention.flex_attention import create_mask

    _cached_block_mask.cache_clear()
    bounds = STREAMS["multi_block"]
    first = document_block_mask(torch.tensor(bounds, dtype=torch.int32))
    assert document_block_mask(bounds) is first  # a list or a tensor of the same bounds: one build
    q_len, kv_len = first.shape[-2:]
    dense = create_mask(first.mask_mod, 1, 1, q_len, kv_len, device="cpu")[0, 0]
    assert torch.equal(dense, document_causal_mask(torch.tensor(bounds)))

    other = document_block_mask(bounds[:-1])
    assert other is not first and other.shape[-1] == bounds[-2]
    cp_bounds = _bounds([5, 17, 9, 33, 300], align=4)
    assert document_block_mask(cp_bounds, cp=2, cp_rank=1) is not document_block_mask(cp_bounds, cp=2, cp_rank=0)
    assert _cached_block_mask.cache_info().currsize == 2  # bounded: old micro-batches fall out
    assert document_block_mask(bounds) is not first


def test_check_packed_backend():
    assert PACKED_BACKENDS == ("dense", "flex")
    assert [check_packed_backend(b) for b in PACKED_BACKENDS] == list(PACKED_BACKENDS)
    with pytest.raises(ConfigError, match=r"packed_backend='flash'.*'dense', 'flex'"):
        check_packed_backend("flash")


# ------------------------------------------------------------------------------------------------
# the module: built as megatron-core builds it, one in-process rank
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_rank():
    """Megatron parallel state for one in-process rank, and the config of a tiny Qwen2 (4 heads,
    2 key/value groups, head dim 16)."""
    from megatron_nft import runtime
    from megatron_nft.model.qwen2 import shape_from_hf, transformer_config

    runtime.init_model_parallel(runtime.ParallelLayout(), seed=0)
    config, _ = random_qwen2(hidden=HEADS * DIM, heads=HEADS, kv_heads=GROUPS)
    with runtime.megatron_device_compat():
        return transformer_config(shape_from_hf(config), dtype=torch.float32, tp=1, pp=1)


def _build(config, **params):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_nft.model.attention import SdpaAttention

    return build_module(
        ModuleSpec(module=SdpaAttention, params=params),
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
        cp_comm_type=None, softmax_scale=None, pg_collection=None,
    )


def test_module_flex_equals_dense(single_rank, flex_cpu_backward):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_nft.runtime import megatron_device_compat

    real, padded = _bounds([5, 17, 9, 33]), _bounds([5, 17, 9, 33], align=4)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=torch.tensor(real, dtype=torch.int32),
        cu_seqlens_kv=torch.tensor(real, dtype=torch.int32),
        cu_seqlens_q_padded=torch.tensor(padded, dtype=torch.int32),
        cu_seqlens_kv_padded=torch.tensor(padded, dtype=torch.int32), max_seqlen_q=36, max_seqlen_kv=36,
    )
    t = padded[-1]
    weight = torch.randn(t, HEADS * DIM, generator=torch.Generator().manual_seed(4))
    results = []
    for backend in ("dense", "flex"):
        with megatron_device_compat():
            module = _build(single_rank, packed_backend=backend)
            assert module.packed_backend == backend
            q, k, v = _qkv(t, seed=5)
            out = module(q, k, v, None, packed_seq_params=params)
            (out * weight).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    assert results[1][0].shape == (t, HEADS * DIM)
    assert _max_diff(results[1], results[0]) < TOL


def test_module_rejects_unknown_backend_and_flex_dropout(single_rank):
    import copy

    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_nft.runtime import megatron_device_compat

    with pytest.raises(ConfigError, match="'flash'"):
        _build(single_rank, packed_backend="flash")
    config = copy.deepcopy(single_rank)
    config.attention_dropout = 0.1
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    with megatron_device_compat():
        module = _build(config, packed_backend="flex")
        q, k, v = (x.detach() for x in _qkv(8, seed=6))
        with pytest.raises(ValueError, match="dropout"):
            module.train()(q, k, v, None, packed_seq_params=params)
        # evaluation has no dropout to miss
        assert module.eval()(q, k, v, None, packed_seq_params=params).shape == (8, HEADS * DIM)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_on_cuda_equals_dense(dtype):
    """The GPU path: compiled FlexAttention with a compiled block-mask build, at a length with many
    128-token blocks, against the dense SDPA reference in fp32."""
    bounds = _bounds([700, 1500, 33, 1800])
    t = bounds[-1]
    q, k, v = (x.detach().to("cuda", dtype).requires_grad_() for x in _qkv(t, seed=5))
    got = flex_document_attention(q, k, v, document_block_mask(bounds, device="cuda"), SCALE)
    got.float().square().sum().backward()
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    mask = document_causal_mask(torch.tensor(bounds, device="cuda"))
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in ref_inputs)
    want = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=SCALE, enable_gqa=True)
    want = want[0].transpose(0, 1).reshape(t, -1)
    want.square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got.float() - want).abs().max().item() < tol
    for a, b in zip((q, k, v), ref_inputs):
        assert (a.grad.float() - b.grad).abs().max().item() < tol * max(1.0, b.grad.abs().max().item())
