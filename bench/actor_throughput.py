"""Actor train-step throughput and MFU on one device, packed sequences.

    python bench/actor_throughput.py                                   # the GPU run: Qwen2.5-1.5B shape,
                                                                       # 4K and 16K tokens, BF16 (+ FP8 with TE)
    python bench/actor_throughput.py --model tiny --tokens 512 --steps 2 --warmup 1    # a CPU smoke run

What is timed: `Actor.train_step` (forward, backward, gradient check, optimizer step) of a randomly
initialised Megatron GPTModel with the given Qwen2 shape, on one rank, on packed micro-batches of
exactly `--tokens` tokens each (`--rows` sequences of equal length, or of random lengths with
`--spread`; a quarter prompt, the rest scored response), `--micro-batches` of them per step. The median of
`--steps` steps after `--warmup` untimed ones.

FLOPs are model FLOPs (what MFU counts; recomputation is not credited): 3x the forward's, where one
sequence of L tokens costs L * (2 * GEMM parameters + 2 * layers * heads * head_dim * L), the second
term being causal attention's QK^T and PV (megatron_nft.plan.forward_flops_per_token, checked there
against torch's FlopCounterMode; tests/test_bench_actor.py checks this script's count against the
counter on the actor itself). MFU divides by the GPU's dense BF16 peak, also for FP8 runs, so that the
variants compare on one scale: megatron_nft.plan.GPUS holds the peaks (H100/H200 SXM: 989.4 TFLOP/s),
`--peak-tflops` overrides them.

Baseline in the same run: the first variant at the first token budget; every row prints its throughput
as a ratio to it. Variants: bf16 (no recompute), fp8 (when Transformer Engine is importable), and any
`--variants` entries such as `bf16+full` (activation recompute) or `fp8-blockwise`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass

TINY = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}

# torch.cuda.get_device_name() substring -> megatron_nft.plan.GPUS entry, whose dense BF16 peak MFU divides
# by (the one table of GPU peaks). First match wins; a PCIe H100 (756 TFLOP/s) matches none.
PLAN_GPUS = (("H100 PCIe", None), ("GH200", "h200"), ("H200", "h200"), ("H100", "h100-80gb"), ("A100", "a100-80gb"))


def bf16_peak(device_name: str) -> float | None:
    from megatron_nft.plan import GPUS

    key = next((key for sub, key in PLAN_GPUS if sub in device_name), None)
    return GPUS[key].bf16_tflops if key else None


@dataclass(frozen=True)
class Variant:
    name: str
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    recompute: str = "none"


def parse_variant(text: str) -> Variant:
    """"bf16", "fp8", "fp8-<recipe>", each optionally "+<recompute>" (none, core_attn, mlp, full)."""
    precision, _, recompute = text.partition("+")
    recompute = recompute or "none"
    if precision == "bf16":
        return Variant(text, recompute=recompute)
    if precision.startswith("fp8"):
        recipe = precision.partition("-")[2] or "delayed"
        return Variant(text, fp8="hybrid", fp8_recipe=recipe, recompute=recompute)
    raise SystemExit(f"--variants: {text!r} is not bf16[+recompute] or fp8[-recipe][+recompute]")


def sequence_lengths(tokens: int, rows: int, rng: random.Random, spread: float = 0.5) -> list[int]:
    """`rows` lengths, each within (1 +- spread) x tokens/rows, summing to exactly `tokens`."""
    mean = tokens / rows
    raw = [rng.uniform(1 - spread, 1 + spread) * mean for _ in range(rows)]
    lengths = [max(2, int(x * tokens / sum(raw))) for x in raw]
    lengths[-1] += tokens - sum(lengths)
    return lengths


def step_flops(shape, lengths: list[int]) -> float:
    """Model FLOPs of one training step over sequences of these lengths (3x the forward)."""
    from megatron_nft.plan import forward_flops_per_token

    forward = 0.0
    for n in lengths:
        gemm, attention = forward_flops_per_token(shape, n)
        forward += n * (gemm + attention)
    return 3.0 * forward


def make_batch(shape, lengths: list[int], seed: int):
    import torch

    from megatron_nft.data.batching import pack_rows

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for n in lengths:
        p = max(1, n // 4)
        prompts.append(torch.randint(0, shape.vocab_size, (p,), generator=g).tolist())
        responses.append(torch.randint(0, shape.vocab_size, (n - p,), generator=g).tolist())
    batch = pack_rows(prompts, responses)
    rows = len(lengths)
    batch["old_logprobs"] = -torch.rand(batch["tokens"].shape, generator=g) * batch["loss_mask"]
    batch["rewards"] = torch.tensor([float(i % 2) for i in range(rows)])
    batch["correct_rate"] = torch.full((rows,), 0.5)
    return batch


def build_actor(shape, variant: Variant, *, tokens: int, dtype: str, impl: str = "auto"):
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import ModelOptions

    options = ModelOptions(impl=impl, fp8=variant.fp8, fp8_recipe=variant.fp8_recipe, recompute=variant.recompute)
    return Actor(shape, dtype=dtype, optim=OptimConfig(lr=1e-6, warmup_steps=0), algo=AlgoConfig(name="nft"),
                 max_tokens_per_micro_batch=tokens, options=options)


def measure(shape, variant: Variant, *, tokens: int, rows: int, micro_batches: int, steps: int, warmup: int,
            dtype: str, spread: float = 0.0, seed: int = 0, impl: str = "auto") -> dict:
    import torch

    cuda = torch.cuda.is_available()
    rng = random.Random(seed)
    lengths = [n for _ in range(micro_batches) for n in sequence_lengths(tokens, rows, rng, spread)]
    batch = make_batch(shape, lengths, seed)
    actor = build_actor(shape, variant, tokens=tokens, dtype=dtype, impl=impl)
    micro, _ = actor.microbatches.split({k: batch[k] for k in ("tokens", "loss_mask")})
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        metrics = actor.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    actor.close()  # frees its model and buffers before the next variant's actor
    del actor
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    seconds = statistics.median(times)
    return {
        "variant": variant.name, "tokens": sum(lengths), "micro_batches": len(micro), "sequences": len(lengths),
        "step_s": seconds, "tokens_per_s": sum(lengths) / seconds, "flops": step_flops(shape, lengths),
        "tflops": step_flops(shape, lengths) / seconds / 1e12, "peak_gib": peak, "loss": metrics["loss"],
    }


def machine() -> tuple[str, float | None]:
    import torch

    line = f"{platform.platform()} | {platform.processor() or platform.machine()} | python {platform.python_version()} | torch {torch.__version__}"
    peak = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        line += f" | {name}"
        peak = bf16_peak(name)
    try:
        import transformer_engine

        line += f" | transformer_engine {transformer_engine.__version__}"
    except ImportError:
        line += " | no transformer_engine"
    return line, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b", help="a megatron_nft.plan model name, a config.json, or 'tiny'")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="tokens per packed micro-batch")
    ap.add_argument("--rows", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="sequence lengths within (1 +- spread) x tokens/rows; 0 (default): equal lengths, so the "
                         "packer fills every micro-batch exactly; > 0 usually needs more micro-batches than asked")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--variants", default=None, help="comma-separated, e.g. bf16,fp8,bf16+full (default: bf16, "
                    "plus fp8 when Transformer Engine is importable)")
    ap.add_argument("--impl", choices=["auto", "local", "te"], default="auto",
                    help="layer spec (model.impl): local = megatron-core's own layers (FlexAttention when packed on a GPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense BF16 peak for MFU (default: the GPU's "
                    "entry in megatron_nft.plan.GPUS)")
    ap.add_argument("--json", default=None, help="append one JSON object per result row to this file")
    args = ap.parse_args()

    import torch

    from megatron_nft import runtime
    from megatron_nft.model.qwen2 import te_available
    from megatron_nft.plan import matmul_parameters, model_shape, parameter_count

    shape = model_shape(TINY if args.model == "tiny" else args.model)
    dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    names = args.variants.split(",") if args.variants else ["bf16"] + (["fp8"] if te_available() else [])
    variants = [parse_variant(v) for v in names]
    line, peak = machine()
    peak = args.peak_tflops or peak
    print(f"machine: {line}")
    print(f"model: {args.model}: {parameter_count(shape) / 1e9:.3f} B parameters ({matmul_parameters(shape) / 1e9:.3f} B "
          f"in GEMMs), {shape.num_layers} layers, hidden {shape.hidden_size}, heads {shape.num_heads}/{shape.num_kv_heads}, "
          f"vocab {shape.vocab_size}; dtype {dtype}; {args.rows} sequences x {args.micro_batches} micro-batches per step; "
          f"median of {args.steps} steps after {args.warmup}")
    runtime.init_process_group()
    baseline = None
    for tokens in args.tokens:
        for variant in variants:
            r = measure(shape, variant, tokens=tokens, rows=args.rows, micro_batches=args.micro_batches,
                        steps=args.steps, warmup=args.warmup, dtype=dtype, spread=args.spread, impl=args.impl)
            baseline = baseline or r["tokens_per_s"]
            mfu = f"MFU {100 * r['tflops'] / peak:.1f}% of {peak:.0f}" if peak else "MFU n/a (no known GPU peak)"
            memory = f"peak memory {r['peak_gib']:.1f} GiB" if r["peak_gib"] == r["peak_gib"] else "peak memory n/a (CPU)"
            label = variant.name.replace("bf16", dtype)  # the base precision is --dtype
            print(f"{label:>12s} {tokens:>6d}-token budget: {r['step_s']:.3f} s/step ({r['micro_batches']} micro-batches "
                  f"of {r['tokens'] / r['micro_batches']:,.0f} tokens on average, {r['sequences']} sequences), "
                  f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_s'] / baseline:.2f}x baseline), "
                  f"{r['flops'] / 1e12:.4g} TFLOP/step, {r['tflops']:.4g} TFLOP/s, {mfu}, {memory}, loss {r['loss']:.4f}")
            if args.json:  # one line per row, written as it comes: a run cut short keeps what it measured
                row = {"model": args.model, "impl": args.impl, "dtype": dtype, "budget": tokens, **r,
                       "variant": label, "peak_tflops": peak, "mfu": r["tflops"] / peak if peak else None,
                       "ratio_to_baseline": r["tokens_per_s"] / baseline}
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    runtime.destroy()


if __name__ == "__main__":
    main()
