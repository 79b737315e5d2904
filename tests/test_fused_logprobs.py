"""Fused chunked log-probs (megatron_nft.model.logprobs.token_logprobs) against independent references.

The reference is the naive path in pure autograd: full logits -> / temperature -> log_softmax ->
gather (entropy = -sum p log p), over the real vocabulary only. Values and gradients (hidden and
weight, through log-probs and through entropy) must match it within 1e-5 in fp32 at TP=1 and at
TP=2 (two gloo ranks, one spawn for every TP=2 case), with temperature != 1, chunk sizes that do and
do not divide T, and vocabulary padding rows that would change every value if they leaked in.
fp64 finite differences (gradcheck) check the hand-written backward independently of the naive
path; a dispatch-mode trace checks that no [T, V] buffer is ever allocated.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_nft.model.logprobs import token_logprobs
from megatron_nft.testing import run_distributed

TOL = dict(atol=1e-5, rtol=1e-5)


def make_inputs(tokens=37, hidden=16, padded_vocab=24, seed=0, dtype=torch.float32, label_vocab=None):
    """Random hidden states, a full (padded) output weight, labels below `label_vocab` (default: all
    but the last 3 rows, which are scaled up to stand for padding), and
    per-token upstream gradients for log-probs and entropy (random, so no term can cancel)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g) * 0.8
    w = torch.randn(padded_vocab, hidden, generator=g) * 0.5
    # Padding rows large: if they leaked into the softmax every value would move visibly.
    w[-3:] *= 6.0
    labels = torch.randint(0, label_vocab or padded_vocab - 3, (tokens,), generator=g)
    grad_lp = torch.randn(tokens, generator=g)
    grad_ent = torch.randn(tokens, generator=g)
    return h.to(dtype), w.to(dtype), labels, grad_lp, grad_ent


def naive(h, w, labels, *, temperature=1.0, vocab_size=None, grad_lp=None, grad_ent=None):
    """(logprobs, entropy, grad_hidden, grad_weight) from full fp32 logits and autograd."""
    h = h.detach().float().requires_grad_()
    w = w.detach().float().requires_grad_()
    real = w[: vocab_size or w.shape[0]]
    logp = torch.log_softmax((h @ real.t()) / temperature, dim=-1)
    lp = logp.gather(1, labels[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    loss = (lp * grad_lp).sum() + (0.0 if grad_ent is None else (ent * grad_ent).sum())
    loss.backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def fused(h, w, labels, *, grad_lp=None, grad_ent=None, **kw):
    """(logprobs, entropy, grad_hidden, grad_weight) from token_logprobs with the same upstream grads."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lp, ent = token_logprobs(h, w, labels, **kw)
    loss = (lp * grad_lp).sum() + (0.0 if grad_ent is None else (ent * grad_ent).sum())
    loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), h.grad, w.grad


# (chunk_size, temperature, with_entropy, gradient through entropy, vocab_size of a 24-row weight)
CASES = [
    (37, 1.0, False, False, None),  # one chunk, no temperature, no padding
    (8, 0.6, True, False, None),  # 8 does not divide 37
    (16, 1.7, True, True, 21),  # padded vocabulary, gradient through entropy too
    (1, 1.0, True, True, 21),  # a chunk per token
    (4096, 0.6, False, False, 21),  # chunk larger than T
]


@pytest.mark.parametrize("chunk,temperature,with_entropy,entropy_grad,vocab_size", CASES)
def test_tp1_matches_naive_autograd(chunk, temperature, with_entropy, entropy_grad, vocab_size):
    h, w, labels, grad_lp, grad_ent = make_inputs()
    grad_ent = grad_ent if entropy_grad else None
    ref = naive(h, w, labels, temperature=temperature, vocab_size=vocab_size, grad_lp=grad_lp, grad_ent=grad_ent)
    out = fused(
        h, w, labels, grad_lp=grad_lp, grad_ent=grad_ent,
        chunk_size=chunk, temperature=temperature, with_entropy=with_entropy, vocab_size=vocab_size,
    )
    assert out[0].dtype == torch.float32 and out[0].shape == (37,)
    torch.testing.assert_close(out[0], ref[0], **TOL)
    if with_entropy:
        torch.testing.assert_close(out[1], ref[1], **TOL)
    else:
        assert out[1] is None
    torch.testing.assert_close(out[2], ref[2], **TOL)
    torch.testing.assert_close(out[3], ref[3], **TOL)
    if vocab_size is not None:
        assert torch.all(out[3][vocab_size:] == 0), "padding rows must get no gradient"


def test_padding_rows_would_change_the_result():
    """Guards the padding test itself: counting the padding rows gives visibly different values."""
    h, w, labels, grad_lp, _ = make_inputs()
    masked = token_logprobs(h, w, labels, vocab_size=21)[0]
    unmasked = token_logprobs(h, w, labels)[0]
    assert (masked - unmasked).abs().max() > 1e-2


def test_gradcheck_fp64_against_finite_differences():
    """The hand-written backward (log-probs and entropy, temperature, padding, ragged chunks) equals
    numerical derivatives: a reference independent of the naive autograd path."""
    h, w, labels, _, _ = make_inputs(tokens=9, hidden=5, padded_vocab=10, dtype=torch.float64)
    labels = labels.clamp(max=6)
    h.requires_grad_(), w.requires_grad_()

    def f(h, w):
        return token_logprobs(h, w, labels, chunk_size=4, temperature=0.7, with_entropy=True, vocab_size=7)

    assert torch.autograd.gradcheck(f, (h, w))


def test_entropy_only_gradient():
    """A loss on entropy alone (log-probs unused) still gets the exact entropy gradient."""
    h, w, labels, _, grad_ent = make_inputs()
    zero = torch.zeros(h.shape[0])
    ref = naive(h, w, labels, temperature=0.9, grad_lp=zero, grad_ent=grad_ent)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    _, ent = token_logprobs(hh, ww, labels, chunk_size=10, temperature=0.9, with_entropy=True)
    (ent * grad_ent).sum().backward()
    torch.testing.assert_close(hh.grad, ref[2], **TOL)
    torch.testing.assert_close(ww.grad, ref[3], **TOL)


def test_bf16_inputs_are_sensible():
    """bf16 hidden/weight: fp32 outputs close to the fp32 reference on the same (rounded) inputs,
    bf16 gradients close to the reference gradients in norm."""
    h, w, labels, grad_lp, grad_ent = make_inputs(tokens=64, hidden=32, padded_vocab=40)
    hb, wb = h.bfloat16(), w.bfloat16()
    ref = naive(hb, wb, labels, temperature=0.8, vocab_size=37, grad_lp=grad_lp, grad_ent=grad_ent)
    out = fused(
        hb, wb, labels, grad_lp=grad_lp, grad_ent=grad_ent,
        chunk_size=24, temperature=0.8, with_entropy=True, vocab_size=37,
    )
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[2].dtype == torch.bfloat16 and out[3].dtype == torch.bfloat16
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    # bf16 logits carry ~3 significant digits: a few hundredths of a nat at these magnitudes.
    torch.testing.assert_close(out[0], ref[0], atol=0.05, rtol=0.02)
    torch.testing.assert_close(out[1], ref[1], atol=0.05, rtol=0.02)
    for got, want in ((out[2], ref[2]), (out[3], ref[3])):
        assert (got.float() - want).norm() / want.norm() < 0.02


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward run through it)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logits_buffer_is_ever_allocated():
    tokens, hidden, vocab, chunk = 256, 4, 64, 16
    h, w, labels, grad_lp, grad_ent = make_inputs(tokens=tokens, hidden=hidden, padded_vocab=vocab)
    h.requires_grad_(), w.requires_grad_()
    trace = _LargestAllocation()
    with trace:
        lp, ent = token_logprobs(h, w, labels, chunk_size=chunk, with_entropy=True)
        ((lp * grad_lp).sum() + (ent * grad_ent).sum()).backward()
    # chunk x V buffers, the [V, H] weight gradient and the [T, H] hidden gradient are expected;
    # the naive path's [T, V] = 16384-element buffers are not.
    assert trace.largest <= max(chunk * vocab, vocab * hidden, tokens * hidden) < tokens * vocab


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_naive_autograd(dtype):
    """The same function on a GPU, against the fp32 naive path computed on the CPU."""
    h, w, labels, grad_lp, grad_ent = make_inputs(tokens=300, hidden=64, padded_vocab=1000, label_vocab=997)
    h, w = h.to(dtype), w.to(dtype)
    ref = naive(h, w, labels, temperature=0.7, vocab_size=997, grad_lp=grad_lp, grad_ent=grad_ent)
    out = fused(
        h.cuda(), w.cuda(), labels.cuda(), grad_lp=grad_lp.cuda(), grad_ent=grad_ent.cuda(),
        chunk_size=128, temperature=0.7, with_entropy=True, vocab_size=997,
    )
    # TF32 / bf16 GEMMs on the GPU: looser than the CPU's 1e-5
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=0.06, rtol=0.03)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got.float().cpu(), want, **tol)


def test_rejects_mismatched_inputs():
    h, w, labels, _, _ = make_inputs()
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs(h.double(), w, labels)
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(h, w, labels[:-1])


# ----------------------------------------------------------------------------------------------------
# TP = 2: one spawn of two gloo ranks runs every case
# ----------------------------------------------------------------------------------------------------

TP_CASES = [
    # (chunk_size, temperature, with_entropy, gradient through entropy, vocab_size, dtype)
    (8, 0.6, True, True, 21, torch.float32),  # rank 1 holds 3 padding rows; 8 does not divide 37
    (37, 1.0, False, False, None, torch.float32),  # one chunk, no padding
    (10, 1.3, True, True, 12, torch.float32),  # rank 1 is all padding (edges of the merge and backward)
    (16, 0.8, True, True, 21, torch.bfloat16),
]


def _tp_worker(rank, world_size, cases):
    import torch.distributed as dist

    from megatron_nft import runtime

    runtime.init_process_group()
    group = dist.new_group(list(range(world_size)))
    results = []
    for chunk, temperature, with_entropy, entropy_grad, vocab_size, dtype in cases:
        # on the device the GPU run would use (the strict device mode checks the all-reduces' tensors)
        h, w, labels, grad_lp, grad_ent = (t.to(runtime.device()) for t in make_inputs(dtype=dtype, label_vocab=vocab_size))
        per_rank = w.shape[0] // world_size
        local_w = w[rank * per_rank : (rank + 1) * per_rank]
        results.append(
            fused(
                h, local_w, labels, grad_lp=grad_lp, grad_ent=grad_ent if entropy_grad else None,
                tp_group=group, chunk_size=chunk, temperature=temperature,
                with_entropy=with_entropy, vocab_size=vocab_size,
            )
        )
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp_worker, 2, TP_CASES)


@pytest.mark.parametrize("case", range(len(TP_CASES)))
def test_tp2_matches_full_vocab_naive(tp2_results, case):
    chunk, temperature, with_entropy, entropy_grad, vocab_size, dtype = TP_CASES[case]
    h, w, labels, grad_lp, grad_ent = make_inputs(dtype=dtype, label_vocab=vocab_size)
    ref = naive(
        h, w, labels, temperature=temperature, vocab_size=vocab_size,
        grad_lp=grad_lp, grad_ent=grad_ent if entropy_grad else None,
    )
    per_rank = w.shape[0] // 2
    if dtype == torch.float32:
        tol = TOL
    else:  # bf16 logits: a few hundredths of a nat; gradients checked in bf16 resolution
        tol = dict(atol=0.06, rtol=0.03)
    for rank, (lp, ent, grad_h, grad_w) in enumerate(x[case] for x in tp2_results):
        torch.testing.assert_close(lp, ref[0], **tol)
        if with_entropy:
            torch.testing.assert_close(ent, ref[1], **tol)
        else:
            assert ent is None
        # grad_hidden is the FULL gradient on every rank (all-reduced over the group) ...
        torch.testing.assert_close(grad_h.float(), ref[2], **tol)
        # ... grad_weight is this rank's slice of the full weight gradient.
        torch.testing.assert_close(grad_w.float(), ref[3][rank * per_rank : (rank + 1) * per_rank], **tol)
    if dtype == torch.float32:
        # both ranks agree exactly on the values (they come from the same all-reduced statistics)
        assert torch.equal(tp2_results[0][case][0], tp2_results[1][case][0])
