"""`megatron-nft plan`: per-GPU memory and step time of a run before it is launched. Pure arithmetic.

Given a Qwen2 model, the context length, the batch shape and a parallel layout (TP/PP/CP/DP, FP8,
activation recompute, GPU), it adds up what one GPU holds at its busiest moment and estimates how long
a step takes; `search` tries every layout that divides the model and ranks those that fit. Every number
is a `Line` that carries its formula, so the report explains itself. The formulas:

Parameters (HF Qwen2 = megatron GPTModel, biases on q/k/v only):
    P = V*h*(1 + untied) + L*[h*(nq+2nkv)*d + (nq+2nkv)*d + nq*d*h + 3*h*f + 2h] + h
  A GPU of pipeline stage i holds its L/pp layers with the TP-split weights divided by tp (the norms are
  replicated), stage 0 the vocabulary-parallel embedding (V padded to a multiple of tp, / tp), the last
  stage the final norm and the output layer (also when tied and pp > 1: Megatron keeps a copy there).

Static memory per GPU (megatron-core DDP with grad_reduce_in_fp32 and the distributed optimizer, as in
actor.py): weights p*bytes(dtype) + fp32 gradient buffer 4p + Adam states (m, v and, for bf16 weights, the
fp32 main copy) (8 [+4]) * p / (dp*cp) -- the distributed optimizer shards them over the data-parallel
ranks of every context-parallel slice. For bf16 that is Megatron's documented 6 + 12/(dp*cp) bytes per
parameter. FP8 (Transformer Engine) adds the cached fp8 copy of each linear weight and its transpose
(2 bytes per linear parameter).

Activations: the tensors autograd saves for the backward pass, per token of a micro-batch, per layer;
two tables because the two layer implementations save different things (`implementation`):
  "te"    Transformer Engine layers (GPU): fused norm+GEMM modules save the norm input and output,
          cuDNN/flash attention saves q, k, v, the output and the softmax statistics (no s*s terms),
          the fused SwiGLU saves its input only;
  "local" megatron-core's local layers with SdpaAttention (the CPU path): torch RMSNorm also saves the
          normalised input, the unfused GLU saves SiLU(gate) and a copy of `up`, and the padded-row
          path keeps a float copy of the causal mask per layer.
`activation_terms` lists every saved tensor by name. Without sequence parallelism the norm-side
tensors are replicated over TP; everything else is divided by tp, and all of it by cp (each CP rank
holds 1/cp of the sequence). Recompute (`RECOMPUTE`) removes what Megatron's corresponding
setting stops saving and adds the recomputed part to the backward's working set. Under the 1F1B
pipeline schedule stage i holds the activations of min(pp - i, m) micro-batches (m = micro-batches per
optimizer step per DP rank). The last stage adds the fused log-prob path of model/logprobs.py: it
saves the final hidden states, labels and the log-sum-exp per token; its forward holds two fp32
[chunk, V/tp] buffers, its backward one plus the zero-initialised gradient of the output weight.

The phases of a step do not overlap, so a GPU's peak is the largest of: the training step (static +
activations + working set); the gradient finiteness check after the backward (Actor.grads_finite runs
torch.isfinite on the fp32 gradient buffer in chunks of actor.FINITE_CHECK_CHUNK elements: 7 bytes per
element of one chunk); with torch's
non-fused Adam (CPU) the optimizer step (one fp32 temporary per shard parameter); the old-log-prob
forward, whose per-token log-probs and entropies of the whole batch are all-gathered over DP onto every
GPU (2 * rows * S fp32); and, colocated, the actor's static memory next to SGLang's weights.

Rollout: an SGLang server with TP tp_r keeps P*2/tp_r bytes of bf16 weights per GPU and
2*L*nkv*d*2/tp_r bytes of KV cache per token (KV heads replicated when tp_r > nkv), in
mem_fraction_static of a dedicated GPU, or in what the resident actor leaves of a colocated one.
Without a stated TP, the one with the highest decode throughput per GPU is chosen.

Step time: actor FLOPs per token 2*P_mm forward with P_mm the matmul parameters (all but the input
embedding) plus causal attention 2*nq*d*S per layer, S the token's sequence length, so a step's
attention is rows x E[S^2] (response lengths from a sample, or uniform around their mean: Workload).
Model FLOPs of training = 3 x forward (forward + backward), as Megatron and bench/actor_throughput.py
count them: `--mfu` is utilisation in those terms, measured on a run with recompute `--mfu-recompute`.
Recompute adds executed (hardware) FLOPs -- the layers' forward with "full", the MLPs' GEMMs with
"mlp", QK^T/PV with "core_attn" -- and every layout runs at the hardware rate the measured run
reached (hardware_utilisation); the old-log-prob pass is one more forward. Time = FLOPs / (GPUs *
peak * that rate), divided by (1 - pipeline bubble) with the 1F1B bubble (pp-1)/(m+pp-1); FP8
doubles the peak of the GEMM part. Rollout time = generated tokens /
(decode tokens/s per GPU * rollout GPUs); without a stated throughput it comes from a roofline:
every decode step reads the weights and the running sequences' KV cache from HBM (or, if slower,
computes 2*P_mm FLOPs per running sequence). Communication (`communication_time`): TP all-reduces of
the hidden states, the CP exchange of keys and values, the gradient reduce-scatter and parameter
all-gather of the distributed optimizer per minibatch, PP sends, at assumed NVLink / network bus
bandwidths and without overlap. Not modelled: weight sync, prefill, CUDA graphs, kernel efficiency
differences between layouts (one MFU for all), fragmentation beyond the stated reserve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = 2**30

# Public config.json fields (Hugging Face model cards) of the models the paper trains and their smaller
# siblings; `model_shape(name)` reads them through the same parser as a checkpoint's config.json.
_QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False)
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings")
PUBLIC_CONFIGS: dict[str, dict] = {
    name: dict(_QWEN2, **dict(zip(_FIELDS, values)))
    for name, values in {
        #                  vocab    hidden  ffn    layers heads kv  positions rope_theta tied
        "qwen2.5-0.5b":    (151936, 896,   4864,  24,    14,   2,  32768,    1e6,       True),
        "qwen2.5-1.5b":    (151936, 1536,  8960,  28,    12,   2,  131072,   1e6,       True),
        "qwen2.5-7b":      (152064, 3584,  18944, 28,    28,   4,  131072,   1e6,       False),
        "qwen2.5-math-7b": (152064, 3584,  18944, 28,    28,   4,  4096,     1e4,       False),
        "qwen2.5-32b":     (152064, 5120,  27648, 64,    40,   8,  131072,   1e6,       False),
    }.items()
}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what the driver reports as total
    bf16_tflops: float  # dense peak
    fp8_tflops: float | None
    hbm_tbps: float  # memory bandwidth, TB/s
    nvlink_gbs: float  # assumed NCCL bus bandwidth inside a node, GB/s per GPU
    network_gbs: float  # assumed NCCL bus bandwidth across nodes, GB/s per GPU (one NIC per GPU)


GPUS = {
    # H100 SXM5: 81,559 MiB reported by nvidia-smi; 989 / 1979 dense TFLOP/s; HBM3 3.35 TB/s;
    # NVLink 4 (900 GB/s both ways) and one 400 Gb/s NDR NIC per GPU.
    "h100-80gb": Gpu("H100-80GB", 79.6, 989.4, 1978.9, 3.35, 400.0, 45.0),
    "h200": Gpu("H200-141GB", 139.8, 989.4, 1978.9, 4.8, 400.0, 45.0),
    "a100-80gb": Gpu("A100-80GB", 79.2, 312.0, None, 2.04, 230.0, 22.0),
}

RECOMPUTE = {
    "none": "everything saved",
    "core_attn": "Megatron recompute_granularity=selective, recompute_modules=[core_attn]",
    "mlp": "Megatron recompute_granularity=selective, recompute_modules=[mlp]",
    "full": "Megatron recompute_granularity=full, recompute_method=uniform, recompute_num_layers=1",
}
SEARCHED_RECOMPUTE = ("none", "mlp", "full")
IMPLEMENTATIONS = ("te", "local")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FINITE_CHECK_CHUNK = 1 << 24  # actor.FINITE_CHECK_CHUNK (this module imports no torch; a test ties them)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    recompute: str = "none"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def __str__(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp} recompute={self.recompute}"


@dataclass(frozen=True)
class Workload:
    """One RL step: N prompts x K answers, each at most prompt_len + response_len tokens."""

    prompt_len: int
    response_len: int
    prompts_per_step: int = 512
    samples_per_prompt: int = 16
    num_minibatches: int = 16
    gen_prompts: int | None = None  # prompts per generation round (default: prompts_per_step)
    gen_rounds: float = 1.0  # generation rounds per step (dynamic sampling may need more than one)
    mean_response_len: float | None = None  # for step time (default: half of response_len)
    micro_batch_tokens: int | None = None  # tokens per micro-batch (default: one full sequence)
    # a measured sample of response lengths (e.g. a previous run's); its mean replaces mean_response_len
    response_lengths: tuple[float, ...] | None = None

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_tokens or self.seq_len

    @property
    def mean_response(self) -> float:
        if self.response_lengths:
            return sum(self.response_lengths) / len(self.response_lengths)
        return self.response_len / 2 if self.mean_response_len is None else self.mean_response_len

    @property
    def mean_seq_len(self) -> float:
        return self.prompt_len + self.mean_response

    def _uniform_response_range(self) -> tuple[float, float]:
        """Without a sample, response lengths are taken as uniform around their mean, as wide as
        [0, response_len] allows: [0, 2m] or [2m - response_len, response_len]."""
        m = self.mean_response
        half = min(m, self.response_len - m)
        return m - half, m + half

    @property
    def mean_square_seq_len(self) -> float:
        """E[S^2] over the step's sequences (causal attention costs S^2 per sequence, so its total is
        rows x E[S^2], not rows x E[S]^2): from the sample, else the uniform law above,
        E[S^2] = E[S]^2 + width^2 / 12."""
        if self.response_lengths:
            return sum((self.prompt_len + u) ** 2 for u in self.response_lengths) / len(self.response_lengths)
        low, high = self._uniform_response_range()
        return self.mean_seq_len**2 + (high - low) ** 2 / 12

    def length_assumption(self) -> str:
        if self.response_lengths:
            return f"response lengths: a sample of {len(self.response_lengths)} (mean {self.mean_response:,.0f})"
        low, high = self._uniform_response_range()
        mean = "stated" if self.mean_response_len is not None else "default: half of the maximum"
        return f"response lengths uniform on [{low:,.0f}, {high:,.0f}] tokens (mean {self.mean_response:,.0f}, {mean})"


@dataclass(frozen=True)
class Settings:
    gpu: Gpu = GPUS["h100-80gb"]
    gpu_memory_gib: float | None = None  # default: the GPU's
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    dtype: str = "bf16"
    fp8: bool = False
    sequence_parallel: bool = False  # actor.py's fused log-probs do not support it yet
    implementation: str = "te"
    colocate: bool = False  # SGLang on the training GPUs
    rollout_gpus: int | None = None  # disaggregated: GPUs running SGLang (default: as many as training)
    rollout_tp: int | None = None  # SGLang TP; None: the one with the best decode throughput per GPU
    rollout_mem_fraction: float = 0.85  # SGLang --mem-fraction-static on dedicated rollout GPUs
    mfu: float = 0.35  # DEFAULT_MFU; model-FLOPs utilisation (see hardware_utilisation): an assumption unless stated
    mfu_recompute: str = "none"  # the recompute mode of the run `mfu` was measured on
    decode_tps: float | None = None  # decode tokens/s per rollout GPU; None: bandwidth roofline
    hbm_efficiency: float = 0.6  # achieved fraction of HBM bandwidth in decode
    max_running_requests: int = 512  # SGLang's cap on concurrently decoded sequences per server
    logprob_chunk: int = 1024  # model/logprobs.py DEFAULT_CHUNK_SIZE
    optimizer_scratch: bool = False  # torch's (non-fused) Adam allocates one fp32 shard-sized temporary
    stated: frozenset = frozenset()  # inputs the user gave ("mfu", "decode_tps"); the rest are assumptions

    @property
    def budget_bytes(self) -> float:
        return ((self.gpu_memory_gib or self.gpu.memory_gib) - self.reserve_gib) * GIB

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Line:
    """One number of the plan: what it is, its value (bytes or seconds) and how it was computed."""

    label: str
    value: float
    formula: str


@dataclass
class LayoutPlan:
    layout: Layout
    stage: int  # the pipeline stage whose GPU is the busiest
    memory: list[Line]  # training phase on that GPU; the peak is their sum
    phases: list[Line]  # peak of each phase (training, old log-probs, colocated rollout)
    time: list[Line]  # step-time terms; the step is their sum
    peak_bytes: float
    budget_bytes: float
    static_bytes: float  # weights, gradients, optimizer states (and fp8 copies)
    rollout_tp: int = 1
    kv_tokens_per_server: float | None = None  # SGLang KV cache capacity, tokens
    problems: list[str] = field(default_factory=list)  # why it does not fit / cannot run

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def step_seconds(self) -> float:
        return sum(t.value for t in self.time)


# --------------------------------------------------------------------------------------------------
# model arithmetic
# --------------------------------------------------------------------------------------------------


def model_shape(name_or_config):
    """A Qwen2Shape from a PUBLIC_CONFIGS name, a config.json path, a checkpoint directory, or a dict."""
    import json
    from pathlib import Path

    from megatron_nft.errors import ConfigError
    from megatron_nft.model.qwen2 import shape_from_hf

    if isinstance(name_or_config, dict):
        return shape_from_hf(name_or_config)
    key = str(name_or_config).lower()
    if key in PUBLIC_CONFIGS:
        return shape_from_hf(PUBLIC_CONFIGS[key])
    path = Path(name_or_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"--model {name_or_config}: not a known model ({', '.join(PUBLIC_CONFIGS)}) "
            f"nor a config.json or checkpoint directory"
        )
    try:
        return shape_from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model {path}: not valid JSON ({e})") from None


def _qkv_width(shape) -> int:
    return (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim


def layer_parameters(shape) -> dict[str, int]:
    h, f, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    return {
        "qkv": h * _qkv_width(shape) + _qkv_width(shape),  # weight + bias
        "proj": shape.num_heads * d * h,
        "mlp": 3 * h * f,  # gate, up, down
        "norms": 2 * h,
    }


def parameter_count(shape) -> int:
    """Total parameters, as transformers counts them (a tied embedding once)."""
    embedding = shape.vocab_size * shape.hidden_size
    untied = 0 if shape.tie_word_embeddings else embedding
    return embedding + untied + shape.num_layers * sum(layer_parameters(shape).values()) + shape.hidden_size


def matmul_parameters(shape) -> int:
    """Parameters that take part in a GEMM per token: the layers' linear weights and the output layer."""
    per_layer = layer_parameters(shape)
    linear = per_layer["qkv"] - _qkv_width(shape) + per_layer["proj"] + per_layer["mlp"]
    return shape.num_layers * linear + shape.vocab_size * shape.hidden_size


def stage_parameters(shape, tp: int, pp: int, stage: int) -> dict[str, int]:
    """Parameters held by one GPU of pipeline stage `stage` (TP-split ones divided by tp)."""
    per_layer = layer_parameters(shape)
    layers = shape.num_layers // pp
    split = per_layer["qkv"] + per_layer["proj"] + per_layer["mlp"]
    out = {"layers (TP-split)": layers * split // tp, "norms (replicated)": layers * per_layer["norms"]}
    vocab_rows = shape.padded_vocab_size(tp) // tp
    if stage == 0:
        out["embedding"] = vocab_rows * shape.hidden_size
    if stage == pp - 1:
        out["final norm"] = shape.hidden_size
        if not shape.tie_word_embeddings or pp > 1:
            out["output layer"] = vocab_rows * shape.hidden_size
    return out


def linear_parameters_on_stage(shape, tp: int, pp: int, stage: int) -> int:
    per_layer = layer_parameters(shape)
    linear = per_layer["qkv"] - _qkv_width(shape) + per_layer["proj"] + per_layer["mlp"]
    return (shape.num_layers // pp) * linear // tp


def kv_bytes_per_token(shape, tp: int, kv_bytes: int = 2) -> float:
    """KV cache per token on one GPU of a TP group (KV heads are replicated when tp > nkv)."""
    heads = max(shape.num_kv_heads / tp, 1)
    return 2 * shape.num_layers * heads * shape.head_dim * kv_bytes


# --------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------


def activation_terms(shape, *, tokens: int, tp: int, cp: int, settings: Settings, recompute: str = "none",
                     seq_len: int | None = None) -> list[Line]:
    """The tensors one layer saves for backward for one micro-batch of `tokens` tokens (before CP)."""
    h, f, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    nq, nkv = shape.num_heads, shape.num_kv_heads
    a = settings.act_bytes
    gemm_in = 1 if settings.fp8 else a  # TE keeps fp8 GEMM inputs for the weight gradient
    t = tokens / cp
    norm_split = tp if settings.sequence_parallel else 1
    hn = h / norm_split
    rows: list[tuple[str, float, int, str]] = []  # (label, elements per token, bytes, group)

    def add(label, elems, nbytes, group):
        rows.append((label, elems, nbytes, group))

    if settings.implementation == "te":
        add("layer input (norm+QKV GEMM input)", hn, a, "norm")
        add("QKV GEMM input (norm output)", hn, gemm_in, "norm")
        add("1/rms (input norm)", 1 / norm_split, 4, "norm")
    else:
        add("layer input (input norm input)", hn, a, "norm")
        add("input norm: normalised x", hn, a, "norm")
        add("input norm: 1/rms", 1 / norm_split, a, "norm")
        add("QKV GEMM input (norm output)", hn, a, "norm")
    add("QKV GEMM output (kept whole by the v view)", _qkv_width(shape) / tp, a, "attn")
    add("q after RoPE", nq * d / tp, a, "attn")
    add("k after RoPE", nkv * d / tp, a, "attn")
    add("attention output (also the output projection input)", nq * d / tp, a, "attn")
    add("softmax log-sum-exp", nq / tp, 4, "core_attn")
    if settings.implementation == "te" and settings.fp8:
        add("attention output, fp8 copy (projection GEMM input)", nq * d / tp, 1, "attn")
    if settings.implementation == "te":
        add("residual sum (norm+FC1 GEMM input)", hn, a, "mlp_input")
        add("FC1 GEMM input (norm output)", hn, gemm_in, "mlp")
        add("1/rms (pre-MLP norm)", 1 / norm_split, 4, "mlp")
        add("FC1 output (fused SwiGLU input)", 2 * f / tp, a, "mlp")
        add("FC2 GEMM input (SwiGLU output)", f / tp, gemm_in, "mlp")
    else:
        add("residual sum (pre-MLP norm input)", hn, a, "norm")
        add("pre-MLP norm: normalised x", hn, a, "norm")
        add("pre-MLP norm: 1/rms", 1 / norm_split, a, "norm")
        add("FC1 GEMM input (norm output)", hn, a, "mlp")
        add("FC1 output (gate | up)", 2 * f / tp, a, "mlp")
        add("SiLU(gate)", f / tp, a, "mlp")
        add("up + glu_linear_offset (a copy)", f / tp, a, "mlp")
        add("FC2 GEMM input (SiLU(gate) * up)", f / tp, a, "mlp")

    lines = [Line(label, t * elems * nbytes, f"{_num(elems)} x {nbytes} B x {_num(t)} tokens")
             for label, elems, nbytes, group in rows if _kept(group, recompute)]
    if recompute == "full":
        lines = [Line("layer input (checkpointed; the rest is recomputed)", t * hn * a, f"{_num(hn)} x {a} B x {_num(t)} tokens")]
    if settings.implementation == "local" and seq_len is not None and cp == 1:
        # SdpaAttention turns the padded rows' boolean causal mask into a float one per layer
        lines.append(Line("causal mask as float (padded rows)", seq_len**2 * a, f"S^2 x {a} B, S = {seq_len}"))
    return lines


def _kept(group: str, recompute: str) -> bool:
    if recompute == "core_attn":
        return group != "core_attn"
    if recompute == "mlp":
        return group != "mlp"
    return True


def recompute_working_set(shape, *, tokens, tp, cp, settings, recompute, seq_len=None) -> float:
    """What the backward of one layer recomputes and holds on top of the saved activations."""
    if recompute == "full":
        return sum(x.value for x in activation_terms(shape, tokens=tokens, tp=tp, cp=cp, settings=settings, seq_len=seq_len))
    if recompute == "mlp":
        full = activation_terms(shape, tokens=tokens, tp=tp, cp=cp, settings=settings, seq_len=seq_len)
        kept = {x.label for x in activation_terms(shape, tokens=tokens, tp=tp, cp=cp, settings=settings, recompute="mlp", seq_len=seq_len)}
        return sum(x.value for x in full if x.label not in kept)
    return 0.0


def logprob_terms(shape, *, tokens: int, tp: int, cp: int, settings: Settings) -> tuple[list[Line], Line]:
    """Last stage: what the final norm and the fused log-prob path save, and their backward's scratch."""
    h, a = shape.hidden_size, settings.act_bytes
    t = tokens / cp
    vocab = shape.padded_vocab_size(tp) / tp
    if settings.implementation == "te":
        norm = [Line("final norm input + 1/rms", t * (h * a + 4), f"({h} x {a} B + 4 B) x {_num(t)} tokens")]
    else:
        norm = [Line("final norm input, normalised x, 1/rms", t * (2 * h + 1) * a, f"(2 x {h} + 1) x {a} B x {_num(t)} tokens")]
    saved = norm + [
        Line("log-prob input: final hidden states", t * h * a, f"{h} x {a} B x {_num(t)} tokens"),
        Line("labels (int64) + log-sum-exp (fp32)", t * 12, f"12 B x {_num(t)} tokens"),
        Line("per-token loss terms (fp32)", t * 5 * 4, f"5 x 4 B x {_num(t)} tokens"),
    ]
    chunk = min(settings.logprob_chunk, t)
    buffer = chunk * vocab * 4
    # forward: the chunk's logits and their exp (entropy); backward (entropy detached): one chunk
    # buffer reused in place, the zero-initialised output-weight gradient and the hidden-state gradient
    forward, backward = 2 * buffer, buffer + vocab * h * a + t * h * a
    working = Line(
        "log-prob chunk scratch",
        max(forward, backward),
        f"max(forward 2 fp32 [{_num(chunk)}, {_num(vocab)}] chunks, backward 1 chunk + output-weight grad "
        f"[{_num(vocab)}, {h}] + hidden grad)",
    )
    return saved, working


# --------------------------------------------------------------------------------------------------
# one layout
# --------------------------------------------------------------------------------------------------


def micro_batches_per_rank(work: Workload, layout: Layout) -> int:
    """Micro-batches one DP rank runs per optimizer step (a minibatch's rows over DP, packed by tokens)."""
    rows = work.rows / work.num_minibatches / layout.dp
    return max(1, math.ceil(rows * work.seq_len / work.tokens_per_micro_batch))


def stage_phases(shape, work: Workload, layout: Layout, settings: Settings, stage: int) -> tuple[list[Line], list[Line], float]:
    """One GPU of pipeline stage `stage`: (training-phase memory lines, the peak of each phase of a step,
    static bytes). The phases do not overlap in time, so the GPU's peak is the largest of them."""
    memory = _stage_memory(shape, work, layout, settings, stage, micro_batches_per_rank(work, layout))
    static = sum(x.value for x in memory if x.label.split(":")[0] in _STATIC)
    params = sum(stage_parameters(shape, layout.tp, layout.pp, stage).values())
    phases = [
        Line("training step peak", sum(x.value for x in memory), "static + activations + working set (above)"),
        # Actor.grads_finite: torch.isfinite over one chunk of the fp32 gradient buffer evaluates
        # (g == g) * (|g| != inf), holding |g| and three boolean tensors at once
        Line("gradient finiteness check", static + 7 * min(params, FINITE_CHECK_CHUNK),
             f"static + 7 B x {min(params, FINITE_CHECK_CHUNK):,} gradient elements (torch.isfinite, one chunk at a time)"),
    ]
    if settings.optimizer_scratch:
        # torch's (non-fused) Adam: one fp32 temporary per parameter of this rank's shard
        shard = _optimizer_shard_params(shape, layout, stage)
        phases.append(Line("optimizer step peak", static + shard * 4, f"static + 4 B x {shard:,.0f} shard parameters"))
    gather = 2 * work.rows * work.seq_len * 4
    phases.append(Line("old log-prob pass peak", static + gather + _logprob_forward_scratch(shape, work, layout, settings),
                       f"static + all-gathered [2, {work.rows}, {work.seq_len}] fp32 + forward scratch"))
    return memory, phases, static


def plan_layout(shape, work: Workload, layout: Layout, settings: Settings = Settings(), gpus_per_node: int = 8) -> LayoutPlan:
    problems = _structural_problems(shape, work, layout)
    by_stage = [stage_phases(shape, work, layout, settings, stage) for stage in range(layout.pp)]
    stage = max(range(layout.pp), key=lambda i: max(x.value for x in by_stage[i][1]))
    memory, phases, static = by_stage[stage]

    budget = settings.budget_bytes
    # SGLang's share of a GPU: what the resident actor leaves (colocated) or its static fraction
    sglang_bytes = budget - static if settings.colocate else budget * settings.rollout_mem_fraction
    tp_r = settings.rollout_tp or best_rollout_tp(shape, work, settings, sglang_bytes, gpus_per_node)
    kv_tokens = rollout_kv_tokens(shape, tp_r, sglang_bytes)
    if settings.colocate:
        weights = parameter_count(shape) * 2 / tp_r
        phases.append(Line("colocated rollout: actor static + SGLang weights", static + weights,
                           f"static + {_gib(weights)} (bf16 / rollout TP {tp_r}); the KV cache takes the rest"))
    if kv_tokens < work.seq_len:
        where = "colocated" if settings.colocate else "dedicated"
        problems.append(f"{where} SGLang (TP{tp_r}) has KV room for {kv_tokens:,.0f} tokens, "
                        f"less than one {work.seq_len}-token sequence")
    peak = max(p.value for p in phases)
    if peak > budget:
        worst = max(phases, key=lambda p: p.value)
        problems.append(f"{worst.label} {_gib(worst.value)} > budget {_gib(budget)}")
    m = micro_batches_per_rank(work, layout)
    return LayoutPlan(
        layout=layout, stage=stage, memory=memory, phases=phases, static_bytes=static,
        time=step_time(shape, work, layout, settings, m, tp_r, kv_tokens, gpus_per_node),
        peak_bytes=peak, budget_bytes=budget, rollout_tp=tp_r, kv_tokens_per_server=kv_tokens, problems=problems,
    )


_STATIC = ("weights", "fp8 weight copies", "gradient buffer", "optimizer states")


def _optimizer_shard_params(shape, layout: Layout, stage: int) -> float:
    return sum(stage_parameters(shape, layout.tp, layout.pp, stage).values()) / (layout.dp * layout.cp)


def _stage_memory(shape, work, layout, settings, stage, m) -> list[Line]:
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    params = stage_parameters(shape, tp, pp, stage)
    p = sum(params.values())
    w = settings.act_bytes
    parts = ", ".join(f"{k} {v:,}" for k, v in params.items())
    lines = [
        Line("weights", p * w, f"{p:,} params ({parts}) x {w} B"),
        Line("gradient buffer", p * 4, f"{p:,} x 4 B (fp32 grad_reduce_in_fp32)"),
    ]
    adam = 8 + (4 if w < 4 else 0)
    lines.append(Line("optimizer states", p * adam / (dp * cp),
                      f"{p:,} x {adam} B ({'fp32 main copy + ' if w < 4 else ''}Adam m, v) / (dp {dp} x cp {cp})"))
    if settings.fp8:
        lin = linear_parameters_on_stage(shape, tp, pp, stage)
        lines.insert(1, Line("fp8 weight copies", lin * 2, f"{lin:,} linear params x 2 B (fp8 weight + transpose)"))

    tokens = work.tokens_per_micro_batch
    in_flight = min(pp - stage, m)
    layers = shape.num_layers // pp
    per_layer = activation_terms(shape, tokens=tokens, tp=tp, cp=cp, settings=settings, recompute=layout.recompute,
                                 seq_len=work.seq_len)
    per_layer_bytes = sum(x.value for x in per_layer)
    lines.append(Line("activations: layers", in_flight * layers * per_layer_bytes,
                      f"{in_flight} micro-batch(es) in flight x {layers} layers x {_gib(per_layer_bytes)} per layer "
                      f"({_num(tokens / cp)} tokens per micro-batch per GPU)"))
    if stage == 0:
        lines.append(Line("activations: token ids", in_flight * tokens / cp * 8, "int64 per token (embedding backward)"))
    working = [Line("working set: recompute", recompute_working_set(
        shape, tokens=tokens, tp=tp, cp=cp, settings=settings, recompute=layout.recompute, seq_len=work.seq_len),
        f"one layer's recomputed activations ({layout.recompute})")]
    if stage == pp - 1:
        saved, scratch = logprob_terms(shape, tokens=tokens, tp=tp, cp=cp, settings=settings)
        lines += [Line(f"activations: {x.label}", in_flight * x.value, f"{in_flight} x ({x.formula})") for x in saved]
        working.append(Line(f"working set: {scratch.label}", scratch.value, scratch.formula))
    lines.append(max(working, key=lambda x: x.value))  # the log-prob and layer backward do not overlap
    return lines


def _logprob_forward_scratch(shape, work, layout, settings) -> float:
    """Forward without autograd: one layer's largest intermediate plus the log-prob chunk buffers."""
    t = work.tokens_per_micro_batch / layout.cp
    widest = max(_qkv_width(shape), 2 * shape.intermediate_size) / layout.tp
    vocab = shape.padded_vocab_size(layout.tp) / layout.tp
    return 2 * t * widest * settings.act_bytes + 2 * min(settings.logprob_chunk, t) * vocab * 4


def _structural_problems(shape, work, layout) -> list[str]:
    """Why a layout cannot run at all (megatron-core would refuse it), whatever the memory."""
    out = shape.parallel_problems(layout.tp, layout.pp, "TP ", "PP ")
    if layout.cp > 1 and (work.seq_len % (2 * layout.cp)):
        out.append(f"CP {layout.cp}: the sequence length {work.seq_len} is not a multiple of 2*cp")
    if work.rows / work.num_minibatches < layout.dp:
        out.append(f"DP {layout.dp} exceeds the {work.rows // work.num_minibatches} rows of a minibatch")
    if work.seq_len > shape.max_position_embeddings:
        out.append(f"context {work.seq_len} exceeds the model's max_position_embeddings {shape.max_position_embeddings}")
    if layout.recompute not in RECOMPUTE:
        out.append(f"recompute={layout.recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    return out


# --------------------------------------------------------------------------------------------------
# rollout
# --------------------------------------------------------------------------------------------------


def rollout_kv_tokens(shape, tp_r: int, sglang_bytes: float) -> float:
    """KV-cache tokens one SGLang server (TP tp_r) holds when each of its GPUs gives it `sglang_bytes`:
    every GPU keeps its 1/tp_r of the weights and of every token's keys and values."""
    free = sglang_bytes - parameter_count(shape) * 2 / tp_r
    return max(free, 0) / kv_bytes_per_token(shape, tp_r)


def decode_tokens_per_gpu(shape, work: Workload, settings: Settings, tp_r: int, kv_tokens: float) -> tuple[float, str]:
    """Decode throughput per GPU: stated, or from HBM bandwidth (weights + running KV read every step)."""
    if settings.decode_tps:
        return settings.decode_tps, "stated"
    running = max(1.0, min(settings.max_running_requests, kv_tokens / work.seq_len))
    context = work.prompt_len + work.mean_response / 2
    step_bytes = parameter_count(shape) * 2 + running * context * kv_bytes_per_token(shape, tp_r) * tp_r
    memory_s = step_bytes / (tp_r * settings.gpu.hbm_tbps * 1e12 * settings.hbm_efficiency)
    gemm, attention = forward_flops_per_token(shape, 2 * context)  # one new token attends to `context`
    hw = hardware_utilisation(shape, work, settings)
    compute_s = running * (gemm + attention) / (tp_r * settings.gpu.bf16_tflops * 1e12 * hw)
    bound = "HBM" if memory_s >= compute_s else "compute"
    return running / max(memory_s, compute_s) / tp_r, (
        f"roofline, {bound}-bound: {running:.0f} running x {context:.0f}-token context per TP{tp_r} server, "
        f"{settings.hbm_efficiency:.0%} of {settings.gpu.hbm_tbps} TB/s, {hw:.0%} of peak FLOP/s"
    )


def best_rollout_tp(shape, work: Workload, settings: Settings, sglang_bytes: float, gpus_per_node: int = 8) -> int:
    """The SGLang TP with the highest decode throughput per GPU among those that hold a full sequence."""
    candidates = [t for t in (1, 2, 4, 8) if t <= gpus_per_node and (shape.num_kv_heads % t == 0 or t % shape.num_kv_heads == 0)]
    feasible = [t for t in candidates if rollout_kv_tokens(shape, t, sglang_bytes) >= work.seq_len]
    if not feasible:
        return candidates[-1]
    return max(feasible, key=lambda t: decode_tokens_per_gpu(shape, work, settings, t, rollout_kv_tokens(shape, t, sglang_bytes))[0])


# --------------------------------------------------------------------------------------------------
# step time
# --------------------------------------------------------------------------------------------------


def forward_flops_per_token(shape, seq_len: float) -> tuple[float, float]:
    """(GEMM FLOPs, causal attention FLOPs) of one token's forward in a sequence of seq_len tokens."""
    gemm = 2 * matmul_parameters(shape)
    attention = shape.num_layers * 2 * shape.num_heads * shape.head_dim * seq_len  # QK^T and PV, causal half
    return gemm, attention


def step_model_flops(shape, work: Workload) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of one forward over all the step's sequences. GEMMs scale with tokens;
    causal attention with each sequence's S^2, so its total is rows x E[S^2] x 2*nq*d*L (what
    bench/actor_throughput.py sums sequence by sequence), not rows x E[S]^2."""
    tokens = work.rows * work.mean_seq_len
    gemm, attention = forward_flops_per_token(shape, work.mean_square_seq_len / work.mean_seq_len)
    return tokens * gemm, tokens * attention


def recompute_flops(shape, work: Workload, recompute: str) -> tuple[float, float]:
    """(GEMM, attention) FLOPs the backward recomputes per step: hardware FLOPs, never model FLOPs.
    Full recompute re-runs every transformer layer's forward (not the output layer, which sits
    outside the checkpointed layers); "mlp" the MLPs' GEMMs; "core_attn" QK^T and PV."""
    gemm, attention = step_model_flops(shape, work)
    tokens = work.rows * work.mean_seq_len
    output_layer = tokens * 2 * shape.vocab_size * shape.hidden_size
    mlp = tokens * 2 * layer_parameters(shape)["mlp"] * shape.num_layers
    return {"none": (0.0, 0.0), "core_attn": (0.0, attention), "mlp": (mlp, 0.0),
            "full": (gemm - output_layer, attention)}[recompute]


def _peak_seconds(settings: Settings, gemm: float, attention: float) -> float:
    """One GPU's seconds for these FLOPs at 100% of peak (GEMMs at the FP8 peak under FP8)."""
    gemm_peak = settings.gpu.fp8_tflops if settings.fp8 and settings.gpu.fp8_tflops else settings.gpu.bf16_tflops
    return (gemm / gemm_peak + attention / settings.gpu.bf16_tflops) / 1e12


def hardware_utilisation(shape, work: Workload, settings: Settings) -> float:
    """The fraction of peak at which the GPUs execute FLOPs, from settings.mfu.

    settings.mfu is a model-FLOPs utilisation, Megatron's and bench/actor_throughput.py's definition:
    the training pass's model FLOPs (3 x forward; recomputation is not credited) / (time x GPUs x
    peak), measured on a run with recompute settings.mfu_recompute. That run executed its model
    FLOPs plus what it recomputed in the same time, so its GPUs ran at
        mfu x (model + recomputed) / model
    of peak. Every layout is assumed to reach this hardware rate: recompute then costs time for the
    FLOPs it adds, and an MFU measured under full recompute reproduces its own run's time."""
    gemm, attention = step_model_flops(shape, work)
    extra_gemm, extra_attention = recompute_flops(shape, work, settings.mfu_recompute)
    model = _peak_seconds(settings, 3 * gemm, 3 * attention)
    return settings.mfu * (model + _peak_seconds(settings, extra_gemm, extra_attention)) / model


# TP all-reduces per layer, by recompute mode
_TP_ALLREDUCES = {"none": 4, "core_attn": 4, "mlp": 5, "full": 6}


def communication_time(shape, work: Workload, layout: Layout, settings: Settings, gpus_per_node: int = 8) -> Line:
    """Exposed communication of one RL step on one GPU (nothing overlapped: the actor does not overlap
    gradient reduction, TP all-reduces sit on the critical path). Megatron orders ranks TP, CP, DP, PP:
    a group stays on NVLink while the product of its own and the inner sizes fits in a node."""
    tp, cp, dp, pp = layout.tp, layout.cp, layout.dp, layout.pp
    gpu, a = settings.gpu, settings.act_bytes
    tokens = work.rows * work.mean_seq_len / (dp * cp)  # tokens this GPU's activations cover per RL step
    layers = shape.num_layers / pp

    def link(inner: int) -> float:
        return gpu.nvlink_gbs * 1e9 if inner <= gpus_per_node else gpu.network_gbs * 1e9

    def ring(size: int) -> float:
        return (size - 1) / size

    passes = _TP_ALLREDUCES.get(layout.recompute, 4) + 2  # + the old-log-prob forward's two
    t_tp = passes * layers * tokens * shape.hidden_size * a * 2 * ring(tp) / link(tp) if tp > 1 else 0.0
    kv = 2 * shape.num_kv_heads * shape.head_dim / tp * a
    t_cp = 3 * layers * tokens * (cp - 1) * kv / link(tp * cp) if cp > 1 else 0.0  # gather fwd x2, scatter bwd
    params = sum(stage_parameters(shape, tp, pp, 0).values())
    group = dp * cp
    t_dp = work.num_minibatches * ring(group) * params * (4 + a) / link(tp * cp * dp) if group > 1 else 0.0
    t_pp = 3 * tokens * shape.hidden_size * a / link(gpus_per_node + 1) if pp > 1 else 0.0
    total = t_tp + t_cp + t_dp + t_pp
    return Line("actor: communication", total,
                f"TP all-reduces {_hms(t_tp)} + CP K/V exchange {_hms(t_cp)} + gradient reduce-scatter/param "
                f"all-gather x{work.num_minibatches} {_hms(t_dp)} + PP {_hms(t_pp)} "
                f"({gpu.nvlink_gbs:.0f} GB/s NVLink, {gpu.network_gbs:.0f} GB/s network per GPU)")


def step_time(shape, work: Workload, layout: Layout, settings: Settings, m: int, tp_r: int, kv_tokens: float,
              gpus_per_node: int = 8) -> list[Line]:
    tokens = work.rows * work.mean_seq_len
    gemm, attn = step_model_flops(shape, work)
    extra_gemm, extra_attn = recompute_flops(shape, work, layout.recompute)
    hw = hardware_utilisation(shape, work, settings)
    fwd_s = _peak_seconds(settings, gemm, attn) / (layout.gpus * hw)
    train_s = _peak_seconds(settings, 3 * gemm + extra_gemm, 3 * attn + extra_attn) / (layout.gpus * hw)
    # what bench/actor_throughput.py would measure for this layout (model FLOPs, dense BF16 peak)
    layout_mfu = 3 * (gemm + attn) / (train_s * layout.gpus * settings.gpu.bf16_tflops * 1e12)
    bubble = (layout.pp - 1) / (m + layout.pp - 1)
    bubble_note = f" / (1 - pipeline bubble {bubble:.0%})" if bubble else ""
    gen_tokens = (work.gen_prompts or work.prompts_per_step) * work.samples_per_prompt * work.mean_response * work.gen_rounds
    rollout_gpus = layout.gpus if settings.colocate else (settings.rollout_gpus or layout.gpus)
    tps, how = decode_tokens_per_gpu(shape, work, settings, tp_r, kv_tokens)
    return [
        Line("rollout: decode", gen_tokens / (tps * rollout_gpus),
             f"{gen_tokens:,.0f} tokens / ({tps:,.0f} tok/s per GPU [{how}] x {rollout_gpus} GPUs)"),
        Line("actor: old log-probs (forward)", fwd_s / (1 - bubble),
             f"{tokens:,.0f} tokens x {(gemm + attn) / tokens / 1e9:,.1f} GFLOP / ({layout.gpus} GPUs x {hw:.1%} of peak)"
             + bubble_note),
        Line("actor: training", train_s / (1 - bubble),
             f"3 x forward + {(extra_gemm + extra_attn) / (gemm + attn):.2f} x forward recomputed ({layout.recompute}) at "
             f"{hw:.1%} of peak = model-FLOPs MFU {layout_mfu:.1%}{bubble_note}"),
        communication_time(shape, work, layout, settings, gpus_per_node),
    ]


# --------------------------------------------------------------------------------------------------
# search and report
# --------------------------------------------------------------------------------------------------


def candidate_layouts(shape, work: Workload, gpus: int, gpus_per_node: int = 8, *, tp=None, pp=None, cp=None,
                      recompute=None) -> list[Layout]:
    """Every layout of `gpus` GPUs that can run: TP within a node dividing the heads, key/value heads
    and FFN width, PP dividing the layers, sequences a multiple of 2*cp, a minibatch row per DP rank.
    Fixed values restrict it. A ConfigError (one line) when none can."""
    every = _every_layout(shape, gpus, gpus_per_node, tp=tp, pp=pp, cp=cp, recompute=recompute)
    runnable = [layout for layout in every if not _structural_problems(shape, work, layout)]
    if not runnable:
        from megatron_nft.errors import ConfigError

        reasons = sorted({p for layout in every for p in _structural_problems(shape, work, layout)})
        raise ConfigError(f"no layout of {gpus} GPUs can run this model and batch: " + "; ".join(reasons or ["none divides them"]))
    return runnable


def _every_layout(shape, gpus: int, gpus_per_node: int, *, tp, pp, cp, recompute) -> list[Layout]:
    out = []
    for t in [tp] if tp else [x for x in (1, 2, 4, 8) if x <= gpus_per_node]:
        for p in [pp] if pp else [x for x in (1, 2, 4, 8, 16) if shape.num_layers % x == 0]:
            for c in [cp] if cp else (1, 2, 4, 8, 16):
                if gpus % (t * p * c):
                    continue
                # core_attn is not searched: with flash attention it saves next to nothing (see RECOMPUTE)
                for r in [recompute] if recompute else SEARCHED_RECOMPUTE:
                    out.append(Layout(tp=t, pp=p, cp=c, dp=gpus // (t * p * c), recompute=r))
    return out


# Step-time estimates closer than this are not told apart: one MFU for every layout ignores that TP and
# CP shrink each GPU's GEMMs, so among near-equals the layout with less model parallelism ranks first.
TIE_FRACTION = 0.05


def search(shape, work: Workload, gpus: int, settings: Settings = Settings(), gpus_per_node: int = 8, **fixed) -> list[LayoutPlan]:
    """All candidate layouts, planned: those that fit first, fastest first (within TIE_FRACTION, the one
    with the smallest tp*pp*cp), then the others by how far they overshoot."""
    layouts = candidate_layouts(shape, work, gpus, gpus_per_node, **fixed)
    plans = [plan_layout(shape, work, layout, settings, gpus_per_node) for layout in layouts]
    fastest = min((p.step_seconds for p in plans if p.fits), default=1.0)

    def key(p: LayoutPlan):
        lay = p.layout
        if not p.fits:
            return (1, p.peak_bytes / p.budget_bytes, 0, 0.0)
        return (0, math.floor(p.step_seconds / fastest / TIE_FRACTION + 1e-9), lay.tp * lay.pp * lay.cp, p.step_seconds)

    return sorted(plans, key=key)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


def _hms(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


_PHASE_NAMES = {"training": "train", "gradient": "isfinite", "optimizer": "optimizer", "old": "logprobs", "colocated": "rollout"}


def format_table(plans: list[LayoutPlan], limit: int = 12) -> str:
    head = f"{'#':>3} {'TP':>2} {'PP':>2} {'CP':>2} {'DP':>3} {'recompute':>9} {'weights':>8} {'grads':>7} {'optim':>7} " \
           f"{'activ':>7} {'peak':>7} {'at':>9} {'free':>7} {'actor':>8} {'rollout':>8} {'step':>8}"
    rows = [head, "-" * len(head)]
    for i, p in enumerate(plans[:limit], 1):
        mem = {x.label.split(":")[0]: 0.0 for x in p.memory}
        for x in p.memory:
            mem[x.label.split(":")[0]] += x.value
        act = mem.get("activations", 0) + mem.get("working set", 0)
        actor = sum(t.value for t in p.time if t.label.startswith("actor"))
        rollout = sum(t.value for t in p.time if t.label.startswith("rollout"))
        lay = p.layout
        rows.append(
            f"{i:>3} {lay.tp:>2} {lay.pp:>2} {lay.cp:>2} {lay.dp:>3} {lay.recompute:>9} {mem['weights'] / GIB:>8.1f} "
            f"{mem['gradient buffer'] / GIB:>7.1f} {mem['optimizer states'] / GIB:>7.1f} {act / GIB:>7.1f} "
            f"{p.peak_bytes / GIB:>7.1f} {_PHASE_NAMES[max(p.phases, key=lambda x: x.value).label.split(' ')[0]]:>9} "
            f"{(p.budget_bytes - p.peak_bytes) / GIB:>7.1f} {_hms(actor):>8} "
            f"{_hms(rollout):>8} {_hms(p.step_seconds):>8}"
        )
    return "\n".join(rows)


def format_details(plan: LayoutPlan, shape, work: Workload, settings: Settings) -> str:
    lay = plan.layout
    out = [f"{lay} on {lay.gpus} x {settings.gpu.name} "
           f"(budget {_gib(plan.budget_bytes)} = {settings.gpu_memory_gib or settings.gpu.memory_gib} GiB - "
           f"{settings.reserve_gib} GiB reserve), busiest GPU: pipeline stage {plan.stage}"]
    out.append(f"  {'memory (training phase)':<44} {'':>11}  formula")
    for x in plan.memory:
        out.append(f"  {x.label:<44} {_gib(x.value):>11}  {x.formula}")
    for x in plan.phases:
        out.append(f"  {'= ' + x.label:<44} {_gib(x.value):>11}  {x.formula}")
    if plan.kv_tokens_per_server is not None:
        where = "colocated" if settings.colocate else "dedicated rollout GPU"
        tp_r = plan.rollout_tp
        chosen = "" if settings.rollout_tp else " (chosen for decode throughput)"
        out.append(f"  rollout KV cache ({where}, SGLang TP{tp_r}{chosen}): {plan.kv_tokens_per_server:,.0f} tokens per server = "
                   f"{plan.kv_tokens_per_server / work.seq_len:,.1f} full-length sequences "
                   f"({kv_bytes_per_token(shape, tp_r) / 1024:,.0f} KiB per token per GPU)")
    out.append(f"  {'step time':<44} {'':>11}")
    for x in plan.time:
        out.append(f"  {x.label:<44} {_hms(x.value):>11}  {x.formula}")
    out.append(f"  {'= step':<44} {_hms(plan.step_seconds):>11}")
    host = work.rows * work.seq_len * 20
    out.append(f"  host memory per rank for the step's batch: {_gib(host)} (tokens int64 + 3 fp32 per token, "
               f"[{work.rows}, {work.seq_len}], replicated on every rank)")
    for problem in plan.problems:
        out.append(f"  does not fit: {problem}")
    return "\n".join(out)


def report(shape, work: Workload, gpus: int, settings: Settings, *, gpus_per_node: int = 8, limit: int = 12,
           model_name: str = "model", **fixed) -> str:
    """The text `megatron-nft plan` prints: assumptions, a ranked table, the best layout explained."""
    plans = search(shape, work, gpus, settings, gpus_per_node, **fixed)
    fitting = [p for p in plans if p.fits]
    total = parameter_count(shape)
    out = [
        f"{model_name}: {total:,} parameters ({total / 1e9:.2f} B); context {work.seq_len} = {work.prompt_len} prompt + "
        f"{work.response_len} response; {work.prompts_per_step} prompts x {work.samples_per_prompt} answers, "
        f"{work.num_minibatches} minibatches, {work.tokens_per_micro_batch} tokens per micro-batch",
        f"{gpus} x {settings.gpu.name} for training"
        + (", SGLang colocated" if settings.colocate else f", {settings.rollout_gpus or gpus} GPUs for SGLang")
        + f"; {settings.dtype}{' + FP8' if settings.fp8 else ''}, {settings.implementation} layers, "
        f"sequence parallel {'on' if settings.sequence_parallel else 'off'}, MFU {settings.mfu:.0%} "
        f"(model FLOPs, of a run with recompute={settings.mfu_recompute}: GPUs at "
        f"{hardware_utilisation(shape, work, settings):.1%} of peak in executed FLOPs)",
    ]
    unmeasured = assumptions(work, settings)
    if unmeasured:
        out.append("assumed, not measured (state them to replace):")
        out += [f"  - {line}" for line in unmeasured]
    out.append("")
    if fitting:
        out.append(f"{len(fitting)} of {len(plans)} layouts fit; fastest first (GiB per GPU; actor/rollout/step per RL step):")
        out.append(format_table(fitting, limit))
        out.append("")
        out.append("best layout, every number explained:")
        out.append(format_details(fitting[0], shape, work, settings))
    else:
        out.append(f"none of the {len(plans)} layouts fits; the closest:")
        out.append(format_table(plans, min(limit, 5)))
        out.append("")
        out.append(format_details(plans[0], shape, work, settings))
        out.append("more GPUs, a shorter context, FP8, recompute or smaller micro-batches would help")
    return "\n".join(out)



# Where the default MFU stands against published step times (README "Plan"): NeMo-RL's GRPO runs,
# Qwen3-32B on 32 H100 (376 s/step) and Llama-3.1-8B on 16 (92.8 s/step), were predicted at 0.71x and
# 0.50x of the measured time at MFU 0.35, i.e. those runs reached 0.21-0.26 in this planner's terms
# (issue #16; computed before items 12-13, and not rerun here: neither model is a Qwen2 shape).
DEFAULT_MFU = 0.35
PUBLISHED_IMPLIED_MFU = (0.21, 0.26)


def assumptions(work: Workload, settings: Settings) -> list[str]:
    """The inputs of a plan that nobody measured: printed with every report."""
    out = []
    if "mfu" not in settings.stated:
        low, high = PUBLISHED_IMPLIED_MFU
        out.append(f"actor MFU {settings.mfu:.0%}: a default, not measured for this actor; NeMo-RL's published GRPO "
                   f"step times imply {low:.0%}-{high:.0%} (README); measure with bench/actor_throughput.py, pass --mfu")
    if "decode_tps" not in settings.stated:
        out.append(f"decode speed: an HBM roofline at {settings.hbm_efficiency:.0%} of {settings.gpu.hbm_tbps} TB/s "
                   f"(pass --decode-tps from a SGLang benchmark)")
    if not work.response_lengths:
        out.append(work.length_assumption())
    out.append(f"NCCL bus bandwidths {settings.gpu.nvlink_gbs:.0f} GB/s in a node, {settings.gpu.network_gbs:.0f} GB/s "
               f"across nodes per GPU, no overlap")
    if settings.implementation == "te":
        out.append("Transformer Engine activation sizes" + (" and FP8 rates" if settings.fp8 else "")
                   + ": from the kernels' design, not yet measured on a GPU")
    return out


# --------------------------------------------------------------------------------------------------
# command line (`megatron-nft plan`)
# --------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """The `megatron-nft plan` flags (cli.py registers the subcommand). Flags that describe the run
    default to None here so that `--recipe` can tell a given one from a default (FLAG_DEFAULTS)."""
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="plan the run `megatron-nft train --recipe FILE [overrides]` would start: model, batch, "
                        "context, layout, recompute, dtype and FP8 from the config (then the flags marked "
                        "'run' are refused: override the config instead)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="with --recipe: config overrides, as for train")
    m = p.add_argument_group("model and batch (run)")
    m.add_argument("--model", default=None,
                   help=f"{', '.join(PUBLIC_CONFIGS)}, an HF config.json or a checkpoint directory")
    m.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 512, the paper's 7B)")
    m.add_argument("--response-len", type=int, default=None, help="max new tokens (default: 3584; 32B: 14336)")
    m.add_argument("--prompts", type=int, default=None, help="prompts per step N (default: 512)")
    m.add_argument("--samples", type=int, default=None, help="answers per prompt K (default: 16)")
    m.add_argument("--minibatches", type=int, default=None, help="optimizer steps per RL step (default: 16)")
    m.add_argument("--gen-prompts", type=int, default=None, help="prompts per generation round (default: --prompts)")
    m.add_argument("--micro-batch-tokens", type=int, default=None, help="tokens per micro-batch (default: one sequence)")
    a = p.add_argument_group("assumptions about the run's rollouts")
    a.add_argument("--mean-response-len", type=float, default=None,
                   help="for step time (default: half of the response length; lengths taken as uniform around it)")
    a.add_argument("--gen-rounds", type=float, default=1.0, help="generation rounds per step (default: %(default)s)")
    g = p.add_argument_group("hardware")
    g.add_argument("--gpus", type=int, default=8, help="training GPUs (default: %(default)s)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node (default: %(default)s)")
    g.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="(default: %(default)s)")
    g.add_argument("--gpu-memory-gib", type=float, default=None, help="override the GPU's memory")
    g.add_argument("--reserve-gib", type=float, default=4.0, help="kept free for CUDA context, NCCL, fragmentation (default: %(default)s)")
    lay = p.add_argument_group("layout (run)")
    lay.add_argument("--tp", type=int, default=None, help="fix tensor parallelism (default: search 1, 2, 4, 8)")
    lay.add_argument("--pp", type=int, default=None, help="fix pipeline parallelism (default: search)")
    lay.add_argument("--cp", type=int, default=None, help="fix context parallelism (default: search)")
    lay.add_argument("--recompute", choices=list(RECOMPUTE), default=None, help="fix activation recompute (default: search)")
    lay.add_argument("--fp8", action="store_true", default=None, help="Transformer Engine FP8 (Hopper)")
    lay.add_argument("--sequence-parallel", action="store_true", default=None, help="norm activations split over TP too")
    lay.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None, help="(default: bf16)")
    lay.add_argument("--implementation", choices=IMPLEMENTATIONS, default=None, help="te (GPU, default) or local (CPU) layers")
    r = p.add_argument_group("rollout and speed")
    r.add_argument("--colocate", action="store_true", help="SGLang on the training GPUs")
    r.add_argument("--rollout-gpus", type=int, default=None, help="dedicated SGLang GPUs (default: as many as --gpus)")
    r.add_argument("--rollout-tp", type=int, default=None,
                   help="(run) SGLang tensor parallelism (default: the fastest that fits)")
    r.add_argument("--mfu", type=float, default=None,
                   help=f"actor model-FLOPs utilisation, as bench/actor_throughput.py and Megatron measure it "
                        f"(recompute not credited; default: {DEFAULT_MFU}, an assumption)")
    r.add_argument("--mfu-recompute", choices=list(RECOMPUTE), default=None,
                   help="the recompute mode of the run --mfu was measured on (default: the run's recompute if fixed, else none)")
    r.add_argument("--decode-tps", type=float, default=None, help="decode tokens/s per GPU (default: bandwidth roofline)")
    p.add_argument("--top", type=int, default=12, help="table rows (default: %(default)s)")


# The flags that describe the run, their defaults without --recipe, and the config key that says the
# same with one (a flag given with --recipe is refused, naming that key).
FLAG_DEFAULTS = {"prompt_len": 512, "response_len": 3584, "prompts": 512, "samples": 16, "minibatches": 16,
                 "fp8": False, "sequence_parallel": False, "dtype": "bf16", "implementation": "te"}
RUN_FLAGS = {
    "model": "model.hf_path", "prompt_len": "data.max_prompt_len", "response_len": "rollout.max_new_tokens",
    "prompts": "rollout.prompts_per_step", "samples": "rollout.samples_per_prompt",
    "minibatches": "algo.num_minibatches", "gen_prompts": "rollout.gen_prompts",
    "micro_batch_tokens": "parallel.max_tokens_per_micro_batch (packed) or parallel.micro_batch_size (padded rows)",
    "tp": "parallel.tp", "pp": "parallel.pp", "cp": "parallel.cp", "recompute": "parallel.recompute",
    "fp8": "model.fp8", "dtype": "model.dtype", "implementation": "model.impl",
    "sequence_parallel": "nothing (the trainer runs without sequence parallelism)",
    "rollout_tp": "rollout.server_tp_size (with rollout.engine=sglang)",
}
# model.impl -> the planner's layer tables: "auto" takes Transformer Engine where it runs, which is the
# GPU machines a plan describes
_IMPL = {"auto": "te", "te": "te", "local": "local"}


@dataclass(frozen=True)
class PlanInputs:
    """What a report needs besides the GPU count: the model, one step's work, the settings, and the
    layout fields the run fixes (None: searched)."""

    model_name: str
    shape: object
    work: Workload
    settings: Settings
    fixed: dict
    shape_source: str = ""

    def layout(self, gpus: int) -> Layout:
        """The run's layout on `gpus` GPUs (every field fixed, as from a config)."""
        f = self.fixed
        model_parallel = (f["tp"] or 1) * (f["pp"] or 1) * (f["cp"] or 1)
        return Layout(tp=f["tp"] or 1, pp=f["pp"] or 1, cp=f["cp"] or 1, dp=gpus // model_parallel,
                      recompute=f["recompute"] or "none")


def config_model_shape(model) -> tuple[str, object, str]:
    """(name, Qwen2Shape, where it came from) of a config's model section, by one rule:
    1. model.hf_path with a readable config.json: that file (what train loads);
    2. else model.hf_path's last component, lower-cased, naming a PUBLIC_CONFIGS model (the paper
       recipes' /checkpoints/Qwen2.5-32B is qwen2.5-32b): its published config.json fields;
    3. without model.hf_path: the model.* fields (the random model the demo builds);
    anything else is a ConfigError naming model.hf_path."""
    from pathlib import Path

    from megatron_nft.errors import ConfigError

    if model.hf_path is None:
        return "random Qwen2 (model.* fields)", model.random_shape(), "the model.* fields (no model.hf_path)"
    path = Path(model.hf_path)
    if (path / "config.json").is_file():
        return str(path), model_shape(path), f"{path / 'config.json'}"
    name = path.name.lower()
    if name in PUBLIC_CONFIGS:
        return name, model_shape(name), (f"model.hf_path={model.hf_path} is not on this machine: the published "
                                         f"config.json of {name}")
    raise ConfigError(f"model.hf_path={model.hf_path}: no config.json on this machine, and {path.name!r} is not a known "
                      f"model ({', '.join(PUBLIC_CONFIGS)}); plan where the checkpoint is, or override model.hf_path "
                      f"with a directory named after the model")


def from_config(cfg, settings: Settings = Settings(), **assumptions) -> PlanInputs:
    """The plan inputs of the run `megatron-nft train` starts from `cfg` (a TrainConfig from
    config.load_config): model shape (config_model_shape), batch (rollout.prompts_per_step,
    samples_per_prompt, gen_prompts, algo.num_minibatches), context (data.max_prompt_len +
    rollout.max_new_tokens), the layout fixed to parallel.tp/pp/cp/recompute, micro-batches of
    parallel.max_tokens_per_micro_batch tokens (packed) or micro_batch_size full-length rows (padded),
    model.dtype, FP8 and layer implementation, and the SGLang TP of rollout.server_tp_size when the run
    uses SGLang servers. `settings` carries what is the plan's own (GPU, memory, MFU, rollout GPUs, ...);
    `assumptions` the Workload fields no config holds (mean_response_len, gen_rounds, response_lengths).
    The one adapter from a config to the planner: `megatron-nft plan --recipe` and the launch tests use it."""
    import dataclasses

    from megatron_nft.errors import ConfigError

    name, shape, source = config_model_shape(cfg.model)
    p, r, d = cfg.parallel, cfg.rollout, cfg.data
    shape.check_parallel(p.tp, p.pp)
    seq = d.max_prompt_len + r.max_new_tokens
    if seq > shape.max_position_embeddings:
        raise ConfigError(f"data.max_prompt_len + rollout.max_new_tokens = {seq} exceeds the model's "
                          f"max_position_embeddings {shape.max_position_embeddings} ({source})")
    work = Workload(
        prompt_len=d.max_prompt_len, response_len=r.max_new_tokens, prompts_per_step=r.prompts_per_step,
        samples_per_prompt=r.samples_per_prompt, num_minibatches=cfg.algo.num_minibatches, gen_prompts=r.gen_prompts,
        micro_batch_tokens=p.max_tokens_per_micro_batch or p.micro_batch_size * seq, **assumptions,
    )
    settings = dataclasses.replace(
        settings, dtype=cfg.model.dtype, fp8=cfg.model.fp8 is not None, sequence_parallel=False,
        implementation=_IMPL[cfg.model.impl],
        rollout_tp=r.server_tp_size if r.engine == "sglang" else settings.rollout_tp,
        mfu_recompute=settings.mfu_recompute if "mfu_recompute" in settings.stated else p.recompute,
    )
    fixed = dict(tp=p.tp, pp=p.pp, cp=p.cp, recompute=p.recompute)
    return PlanInputs(model_name=name, shape=shape, work=work, settings=settings, fixed=fixed, shape_source=source)


def _check_flags(args, shape) -> None:
    """The flags' own ranges, one clear line per problem (a config's are config.validate's)."""
    from megatron_nft.errors import ConfigError

    positive = {"--prompt-len": args.prompt_len, "--response-len": args.response_len, "--prompts": args.prompts,
                "--samples": args.samples, "--minibatches": args.minibatches}
    for flag, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag}={value}: expected a positive integer")
    if args.mean_response_len is not None and not 0 < args.mean_response_len <= args.response_len:
        raise ConfigError(f"--mean-response-len={args.mean_response_len}: expected a length in (0, --response-len={args.response_len}]")
    if (args.prompts * args.samples) % args.minibatches:
        raise ConfigError(f"--minibatches={args.minibatches} must divide --prompts x --samples = {args.prompts * args.samples}")
    shape.check_parallel(1 if args.tp is None else args.tp, 1 if args.pp is None else args.pp, "--tp=", "--pp=")
    if args.cp is not None and args.cp < 1:
        raise ConfigError(f"--cp={args.cp}: expected a positive integer")
    seq_len = args.prompt_len + args.response_len
    if seq_len > shape.max_position_embeddings:
        raise ConfigError(f"--prompt-len + --response-len = {seq_len} exceeds the model's max_position_embeddings "
                          f"{shape.max_position_embeddings}")
    if args.cp is not None and args.cp > 1 and seq_len % (2 * args.cp):
        raise ConfigError(f"--cp={args.cp}: the sequence length {seq_len} (--prompt-len + --response-len) is not a "
                          f"multiple of 2 x cp = {2 * args.cp} (context parallel cuts it into 2*cp chunks)")


def _from_flags(args, settings: Settings) -> PlanInputs:
    import dataclasses

    from megatron_nft.errors import ConfigError

    if args.model is None:
        raise ConfigError("plan needs --recipe FILE (the run a recipe describes) or --model NAME (flags describe the run)")
    if args.overrides:
        raise ConfigError(f"{args.overrides[0]}: config overrides need --recipe FILE (without one, flags describe the run)")
    for key, value in FLAG_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shape = model_shape(args.model)
    _check_flags(args, shape)
    work = Workload(
        prompt_len=args.prompt_len, response_len=args.response_len, prompts_per_step=args.prompts,
        samples_per_prompt=args.samples, num_minibatches=args.minibatches, gen_prompts=args.gen_prompts,
        gen_rounds=args.gen_rounds, mean_response_len=args.mean_response_len, micro_batch_tokens=args.micro_batch_tokens,
    )
    settings = dataclasses.replace(
        settings, dtype=args.dtype, fp8=args.fp8, sequence_parallel=args.sequence_parallel,
        implementation=args.implementation, rollout_tp=args.rollout_tp,
        mfu_recompute=args.mfu_recompute or args.recompute or "none",
    )
    name = args.model if str(args.model).lower() in PUBLIC_CONFIGS else str(args.model)
    return PlanInputs(model_name=name, shape=shape, work=work, settings=settings,
                      fixed=dict(tp=args.tp, pp=args.pp, cp=args.cp, recompute=args.recompute))


def _from_recipe(args, settings: Settings) -> PlanInputs:
    from megatron_nft.config import load_config
    from megatron_nft.errors import ConfigError

    given = [key for key in RUN_FLAGS if getattr(args, key) is not None]
    if given:
        key = given[0]
        raise ConfigError(f"--{key.replace('_', '-')} with --recipe: the recipe describes the run; "
                          f"override {RUN_FLAGS[key]} instead")
    cfg = load_config(args.recipe, args.overrides)  # what `megatron-nft train` loads, refused the same way
    return from_config(cfg, settings, gen_rounds=args.gen_rounds, mean_response_len=args.mean_response_len)


def run(args) -> str:
    """Checks the flags (one clear line per problem) and returns the report."""
    from megatron_nft.config import ParallelConfig
    from megatron_nft.errors import ConfigError

    for flag, value in {"--gpus": args.gpus, "--gpus-per-node": args.gpus_per_node, "--top": args.top}.items():
        if value < 1:
            raise ConfigError(f"{flag}={value}: expected a positive integer")
    if args.rollout_tp is not None and args.rollout_tp < 1:
        raise ConfigError(f"--rollout-tp={args.rollout_tp}: expected a positive integer")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu={args.mfu}: expected a fraction in (0, 1]")
    stated = frozenset(k for k in ("mfu", "decode_tps", "mfu_recompute") if getattr(args, k) is not None)
    settings = Settings(
        gpu=GPUS[args.gpu], gpu_memory_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib, colocate=args.colocate,
        rollout_gpus=args.rollout_gpus, mfu=DEFAULT_MFU if args.mfu is None else args.mfu,
        mfu_recompute=args.mfu_recompute or "none", decode_tps=args.decode_tps, stated=stated,
    )
    inputs = _from_recipe(args, settings) if args.recipe is not None else _from_flags(args, settings)
    f = inputs.fixed
    # the world rule of the run (config.ParallelConfig.check_world), for a fixed layout
    ParallelConfig(tp=f["tp"] or 1, pp=f["pp"] or 1, cp=f["cp"] or 1).check_world(args.gpus, f"--gpus={args.gpus}")
    text = report(inputs.shape, inputs.work, args.gpus, inputs.settings, gpus_per_node=args.gpus_per_node,
                  limit=args.top, model_name=inputs.model_name, **f)
    if args.recipe is None:
        return text
    run_line = " ".join(["megatron-nft train --recipe", str(args.recipe), *args.overrides])
    return f"plan of `{run_line}`; model shape from {inputs.shape_source}\n{text}"
