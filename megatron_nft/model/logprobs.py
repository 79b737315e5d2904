"""Per-token log-probs (and exact entropy) from vocab-parallel logits, without gathering the vocabulary.

The output layer is column-parallel over the vocabulary: each tensor-parallel rank holds logits for a
slice of it. megatron-core's vocab_parallel_cross_entropy computes -log softmax at the label with one
max and one sum all-reduce and a matching backward; entropy needs two more sums and is computed
without gradient (it is a metric). Rows beyond the real vocabulary (padding to a multiple of TP) are
masked out before either.

`token_logprobs` is the fused path the actor uses: it starts from the hidden states and this rank's
slice of the output weight, walks the tokens in chunks, and never holds [T, V] logits or their
softmax whole (a hand-written backward recomputes each chunk's logits); entropy is exact and
differentiable there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


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


# ---------------------------------------------------------------------------------------------------
# Fused, chunked log-probs straight from the hidden states (no [T, V] logits held whole)
# ---------------------------------------------------------------------------------------------------

# Tokens per chunk. A chunk holds one fp32 [chunk, V/TP] buffer (two with entropy) at a time: at
# V = 152064, 0.6 GB per 1024 tokens, on top of the [V/TP, H] weight gradient both paths produce.
# Measured on the 2-core box (bench/logprobs.py, docs/benchmarks.md; T = 4096, H = 1536, fp32,
# quiet box): peak extra memory / naive's 0.16 and time / naive's 1.22-1.27 at 1024; 2048 gave
# 0.22 and no clear speed-up, 512 gave 0.13 and 1.40x before the buffers were reused. Smaller
# chunks make the GEMMs (M or K = chunk) less efficient.
DEFAULT_CHUNK_SIZE = 1024


def _tp_rank_and_group(tp_group):
    """(rank in the group, group or None); a one-rank group behaves exactly like no group."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0, None
    return dist.get_rank(tp_group), tp_group


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (so torch.autograd.gradcheck applies)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkWorkspace:
    """[chunk, V/TP] buffers reused by every chunk of one pass.

    On CPU a fresh 0.6 GB allocation per chunk is mmap-ed anew and page-faulted in (the kernel zeroes
    every page), a cost the naive path pays once per buffer; reusing them keeps it once per pass.
    (On CUDA the caching allocator would reuse them anyway.)
    """

    def __init__(self, rows: int, weight_rows: torch.Tensor, stats_dtype: torch.dtype):
        self.weight_rows, self.stats_dtype = weight_rows, stats_dtype
        self.shape = (rows, weight_rows.shape[0])
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The named buffer's first `rows` rows (allocated on first use)."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.shape, dtype=dtype or self.stats_dtype, device=self.weight_rows.device)
        return self._buffers[name][:rows]

    def scaled_logits(self, hidden_rows: torch.Tensor, temperature: float) -> torch.Tensor:
        """logits / temperature of a chunk against this rank's real vocabulary rows, in the stats dtype.

        The GEMM runs in the inputs' dtype (as Megatron's output layer does: bf16 logits, then
        .float()), so the fused and the unfused actor paths see the same logits.
        """
        rows = hidden_rows.shape[0]
        z = self.buffer("logits", rows)
        if hidden_rows.dtype == self.stats_dtype:
            torch.mm(hidden_rows, self.weight_rows.t(), out=z)
        else:
            z.copy_(torch.mm(hidden_rows, self.weight_rows.t(), out=self.buffer("gemm", rows, hidden_rows.dtype)))
        if temperature != 1.0:
            z.div_(temperature)
        return z

    def in_dtype(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`grad` cast to the inputs' dtype for the gradient GEMMs (a reused buffer when a cast is needed)."""
        if grad.dtype == dtype:
            return grad
        return self.buffer("gemm", grad.shape[0], dtype).copy_(grad)


def _combine_over_tp(local_max, sum_exp, sum_exp_shifted, label_logit, tp_group):
    """Full-vocabulary statistics from per-rank ones: (logsumexp, entropy or None, label logit).

    Each rank's sums are relative to its own max m_r; with the global max m they rescale as
    S = sum_r e^{m_r - m} S_r and U = sum_r e^{m_r - m} (U_r + (m_r - m) S_r), where
    S_r = sum e^{z - m_r} and U_r = sum e^{z - m_r} (z - m_r). Then logsumexp = m + log S and
    entropy = log S - U / S. Two all-reduces for the whole sequence, whatever the chunking.
    """
    global_max = local_max.clone()
    if tp_group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    offset = local_max - global_max  # -inf on a rank without real vocabulary rows
    scale = offset.exp()
    parts = [sum_exp * scale, label_logit]
    if sum_exp_shifted is not None:
        # where(): a rank with no rows has S_r = 0 and offset = -inf; 0 * -inf would be nan.
        parts.append(torch.where(sum_exp > 0, (sum_exp_shifted + offset * sum_exp) * scale, 0.0))
    sums = torch.stack(parts)
    if tp_group is not None:
        dist.all_reduce(sums, group=tp_group)
    log_sum = sums[0].log()
    entropy = log_sum - sums[2] / sums[0] if sum_exp_shifted is not None else None
    return global_max + log_sum, entropy, sums[1]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[label] (and the entropy of that softmax) with a hand-written backward.

    Forward keeps the per-token logsumexp only; backward recomputes each chunk's logits,
    turns them into d(loss)/d(logits) in place, and accumulates grad_hidden (rows of the chunk) and
    grad_weight (in place) chunk by chunk. Gradients, with p = softmax(z), z = logits / T:
        d logprob / dz_j = [j = label] - p_j
        d entropy / dz_j = -p_j (log p_j + entropy)
    and d/dlogits = d/dz / T. grad_hidden is all-reduced over the TP group: the hidden states are
    replicated there and each rank contributes its vocabulary slice (the job of Megatron's
    copy_to_tensor_model_parallel_region, which this path bypasses).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, chunk_size, temperature, with_entropy, vocab_size):
        tp_rank, tp_group = _tp_rank_and_group(tp_group)
        per_rank = weight.shape[0]
        vocab_start = tp_rank * per_rank
        real_rows = per_rank if vocab_size is None else max(0, min(per_rank, vocab_size - vocab_start))
        weight_rows = weight[:real_rows]  # vocabulary padding rows never enter the softmax

        tokens = hidden.shape[0]
        stats = dict(dtype=_stats_dtype(hidden.dtype), device=hidden.device)
        local_max = torch.full((tokens,), float("-inf"), **stats)
        sum_exp = torch.zeros(tokens, **stats)
        sum_exp_shifted = torch.zeros(tokens, **stats) if with_entropy else None
        label_logit = torch.zeros(tokens, **stats)
        local_label = labels - vocab_start
        owned = (local_label >= 0) & (local_label < real_rows)
        label_index = torch.where(owned, local_label, 0).unsqueeze(1)

        workspace = _ChunkWorkspace(min(chunk_size, tokens), weight_rows, stats["dtype"])
        for start in range(0, tokens if real_rows else 0, chunk_size):
            rows = slice(start, min(start + chunk_size, tokens))
            z = workspace.scaled_logits(hidden[rows], temperature)
            label_logit[rows] = z.gather(1, label_index[rows]).squeeze(1)
            chunk_max = z.amax(dim=1)
            local_max[rows] = chunk_max
            z.sub_(chunk_max.unsqueeze(1))
            if with_entropy:
                e = torch.exp(z, out=workspace.buffer("spare", z.shape[0]))
                sum_exp[rows] = e.sum(dim=1)
                # row-wise dot product without a third [chunk, V] buffer
                sum_exp_shifted[rows] = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
            else:
                sum_exp[rows] = z.exp_().sum(dim=1)
        del workspace
        label_logit.mul_(owned)

        lse, entropy, label_logit = _combine_over_tp(local_max, sum_exp, sum_exp_shifted, label_logit, tp_group)
        logprobs = label_logit - lse

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tp_group, ctx.chunk_size, ctx.temperature = tp_group, chunk_size, temperature
        ctx.vocab_start, ctx.real_rows = vocab_start, real_rows
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, labels, lse = ctx.saved_tensors
        temperature, real_rows = ctx.temperature, ctx.real_rows
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = hidden.new_zeros(hidden.shape) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        weight_rows = weight[:real_rows]
        local_label = labels - ctx.vocab_start
        owned = (local_label >= 0) & (local_label < real_rows)

        tokens = hidden.shape[0]
        workspace = _ChunkWorkspace(min(ctx.chunk_size, tokens), weight_rows, lse.dtype)
        # Every chunk runs even on a rank without real vocabulary rows (empty [c, 0] logits): the
        # entropy gradient all-reduces per chunk, and all ranks must join each of those.
        for start in range(0, tokens, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, tokens))
            hidden_rows = hidden[rows]
            # One [chunk, V] buffer: z -> log p -> d(loss)/dz, all in place.
            grad_z = _chunk_logit_grad(
                workspace.scaled_logits(hidden_rows, temperature).sub_(lse[rows].unsqueeze(1)),
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                owned[rows],
                local_label[rows],
                ctx.tp_group,
                workspace,
            )
            g = workspace.in_dtype(grad_z, hidden.dtype)
            if need_hidden:
                torch.mm(g, weight_rows, out=grad_hidden[rows])
                if temperature != 1.0:
                    grad_hidden[rows].div_(temperature)
            if need_weight:
                grad_weight[:real_rows].addmm_(g.t(), hidden_rows, alpha=1.0 / temperature)
        del workspace

        if need_hidden and ctx.tp_group is not None:
            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _chunk_logit_grad(log_p, grad_logprobs, grad_entropy, owned, local_label, tp_group, workspace):
    """d(loss)/dz for one chunk, written over `log_p` [c, V/TP] (fp32, z minus the global logsumexp).

    d/dz_j = g_lp ([j = label] - p_j) - g_H p_j (log p_j + H) = -p_j (g_lp + g_H (log p_j + H))
    plus g_lp at the label column (on the rank that owns it). H here is -sum p log p over this very
    chunk's p (summed over TP): with it sum_j d/dz_j is zero to rounding, as in autograd's
    log_softmax backward; the forward's logsumexp-based entropy would leave a ~1e-6 offset that the
    weight multiplies into the hidden gradient.
    """
    if grad_entropy is not None:
        p = torch.exp(log_p, out=workspace.buffer("spare", log_p.shape[0]))
        entropy = -torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)
        if tp_group is not None:
            dist.all_reduce(entropy, group=tp_group)
        coeff = log_p.add_(entropy.unsqueeze(1)).mul_(grad_entropy.unsqueeze(1))
        if grad_logprobs is not None:
            coeff.add_(grad_logprobs.unsqueeze(1))
        grad = coeff.mul_(p).neg_()
    elif grad_logprobs is not None:
        grad = log_p.exp_().mul_(grad_logprobs.neg().unsqueeze(1))
    else:
        return log_p.zero_()
    if grad_logprobs is not None:
        rows = owned.nonzero().squeeze(1)
        grad.index_put_((rows, local_label[rows]), grad_logprobs[rows], accumulate=True)
    return grad


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log softmax(hidden @ weight.T / temperature)[labels] without materialising [T, V] logits.

    hidden [T, H] (fp32 or bf16; replicated on every rank of `tp_group`), weight [V/TP, H] (this rank's
    vocab-parallel slice of the output layer, same dtype), labels [T] (global vocabulary ids).
    Returns (logprobs [T] fp32, entropy [T] fp32 or None): both over the full vocabulary, the same on
    every TP rank. `vocab_size` (the real vocabulary) masks padding rows of the last rank(s) out of
    the softmax; None means every row is real.

    Differentiable in hidden and weight, through the log-probs and through the entropy. In the
    backward grad_hidden is all-reduced over `tp_group` (so it is the full gradient on every rank) and
    grad_weight is this rank's slice. Tokens are processed `chunk_size` at a time in both passes;
    the backward recomputes each chunk's logits (one extra GEMM) instead of keeping them. With bf16
    inputs the GEMMs run in bf16 (fp32 accumulation inside each), the softmax statistics in fp32,
    and grad_weight is accumulated over chunks in bf16, i.e. rounded once per chunk.
    Not supported: double backward; labels outside [0, vocab_size).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden [T, H] and weight [V/TP, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: labels must be [T] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"token_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"token_logprobs: chunk_size >= 1 and temperature > 0 needed, got {chunk_size}, {temperature}")
    logprobs, entropy = _ChunkedTokenLogprobs.apply(
        hidden, weight, labels, tp_group, int(chunk_size), float(temperature), bool(with_entropy), vocab_size
    )
    return logprobs, entropy
