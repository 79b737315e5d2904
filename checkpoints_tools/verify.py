"""Logit parity between a Hugging Face Qwen2 checkpoint (transformers' own forward, fp32) and a
megatron-core distributed checkpoint (the Megatron GPTModel at the requested TP/PP) on one token batch.

Prints max |delta logit|, max |delta log-prob| of the batch's next tokens, the cosine similarity of the
logit vectors and the next-token argmax agreement; exits 1 when any is past its threshold, 2 on bad
input, 0 otherwise.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from checkpoints_tools import common

PROG = "python -m checkpoints_tools.verify"
MAX_BATCH_SIZE = 1024
# Defaults per Megatron compute dtype: fp32 tests the mapping itself; bf16 adds rounding.
THRESHOLDS = {
    "fp32": {"max_logit_diff": 1e-3, "min_cosine": 0.99999, "min_argmax_agreement": 0.99},
    "bf16": {"max_logit_diff": 0.5, "min_cosine": 0.999, "min_argmax_agreement": 0.9},
}


def build_parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        description="Compare the logits of a Hugging Face Qwen2 checkpoint (transformers, fp32) with those of "
        "a megatron-core distributed checkpoint (Megatron GPTModel at --tp/--pp) on one random token batch.",
        epilog="Exit status: 0 within thresholds, 1 past a threshold, 2 bad input.",
    )
    p.add_argument("--hf", required=True, type=Path, metavar="DIR", help="HF checkpoint folder (the reference)")
    p.add_argument("--ckpt", required=True, type=Path, metavar="DIR", help="megatron-core dist checkpoint folder")
    common.add_layout_args(p, "to run the Megatron model at")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32",
        help="Megatron parameter/compute dtype (default fp32: checks the conversion, not bf16 rounding)",
    )
    p.add_argument("--batch-size", type=int, default=2, metavar="B", help="sequences in the batch (default 2)")
    p.add_argument("--seq-len", type=int, default=64, metavar="S", help="tokens per sequence (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token batch (default 0)")
    p.add_argument("--max-logit-diff", type=float, metavar="X", help="fail above this max |delta logit| (default 1e-3 fp32, 0.5 bf16)")
    p.add_argument("--min-cosine", type=float, metavar="X", help="fail below this cosine similarity (default 0.99999 fp32, 0.999 bf16)")
    p.add_argument(
        "--min-argmax-agreement", type=float, metavar="X",
        help="fail below this fraction of positions with the same next-token argmax (default 0.99 fp32, 0.9 bf16)",
    )
    return p


def random_tokens(vocab_size: int, batch_size: int, seq_len: int, seed: int):
    import torch

    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


def logits_rank(ckpt: str, shape, tp: int, pp: int, dtype: str, tokens):
    """One rank: load the checkpoint's weights into the model at tp/pp and return rank 0's full-vocabulary
    logits (ModelBundle.logits: one forward through megatron-core's schedule)."""
    from megatron_nft.model.bundle import ModelBundle

    bundle = ModelBundle.build(shape, tp=tp, pp=pp, dtype=dtype, seed=0, initialize=False)  # every weight is loaded
    bundle.load(ckpt)
    return bundle.logits(tokens)


def hf_logits(hf_dir: Path, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def compare(reference, got, tokens) -> dict:
    """Parity metrics of logits `got` against `reference` ([B, S, V] each) on the batch `tokens`."""
    import torch

    diff = (got - reference).abs()
    lp_ref = torch.log_softmax(reference, -1)[:, :-1].gather(-1, tokens[:, 1:, None])
    lp_got = torch.log_softmax(got, -1)[:, :-1].gather(-1, tokens[:, 1:, None])
    cosine = torch.nn.functional.cosine_similarity(got.flatten(0, 1).double(), reference.flatten(0, 1).double(), dim=-1)
    agree = got.argmax(-1) == reference.argmax(-1)
    return {
        "max_logit_diff": diff.max().item(),
        "mean_logit_diff": diff.mean().item(),
        "max_logprob_diff": (lp_got - lp_ref).abs().max().item(),
        "min_cosine": cosine.min().item(),
        "mean_cosine": cosine.mean().item(),
        "argmax_agreement": agree.float().mean().item(),
        "positions": agree.numel(),
    }


def verdict(metrics: dict, limits: dict) -> list[str]:
    """The thresholds that `metrics` violates (empty: pass)."""
    failed = []
    if not metrics["max_logit_diff"] <= limits["max_logit_diff"]:
        failed.append(f"max |delta logit| {metrics['max_logit_diff']:.3g} > {limits['max_logit_diff']:g}")
    if not metrics["min_cosine"] >= limits["min_cosine"]:
        failed.append(f"min cosine {metrics['min_cosine']:.8f} < {limits['min_cosine']:g}")
    if not metrics["argmax_agreement"] >= limits["min_argmax_agreement"]:
        failed.append(f"argmax agreement {metrics['argmax_agreement']:.4f} < {limits['min_argmax_agreement']:g}")
    return failed


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    _, shape = common.read_hf_config(args.hf, "--hf")
    common.check_parallel(shape, args.tp, args.pp, args.hf / "config.json")
    common.check_hf_tensors(args.hf, shape)
    ckpt = common.resolve_megatron_checkpoint(args.ckpt)
    common.check_megatron_checkpoint(ckpt, shape, args.hf / "config.json")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise common.ConfigError(f"{flag} {value}: expected a positive integer")
    # both sides hold B x S x vocab fp32 logits: a parity check needs a few sequences, not a dataset
    if args.batch_size > MAX_BATCH_SIZE:
        raise common.ConfigError(f"--batch-size {args.batch_size}: expected at most {MAX_BATCH_SIZE}")
    if not 0 <= args.seed < 2**63:
        raise common.ConfigError(f"--seed {args.seed}: expected an integer in [0, 2**63)")
    for flag, value, low, high in (("--max-logit-diff", args.max_logit_diff, 0.0, math.inf),
                                   ("--min-cosine", args.min_cosine, -1.0, 1.0),
                                   ("--min-argmax-agreement", args.min_argmax_agreement, 0.0, 1.0)):
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise common.ConfigError(f"{flag} {value}: expected a finite number in [{low:g}, {high:g}]")
    if args.seq_len > shape.max_position_embeddings:
        raise common.ConfigError(
            f"--seq-len {args.seq_len}: more than the model's max_position_embeddings={shape.max_position_embeddings}"
        )
    limits = dict(THRESHOLDS[args.dtype])
    for key in limits:
        if getattr(args, key) is not None:
            limits[key] = getattr(args, key)
    tokens = random_tokens(shape.vocab_size, args.batch_size, args.seq_len, args.seed)
    got = common.launch(logits_rank, args.tp, args.pp, str(ckpt), shape, args.tp, args.pp, args.dtype, tokens)
    if not common.is_main_rank():
        return 0
    metrics = compare(hf_logits(args.hf, tokens), got, tokens)
    failed = verdict(metrics, limits)
    print(f"HF {args.hf} (transformers, fp32) vs Megatron {ckpt} (tp={args.tp} pp={args.pp}, {args.dtype})")
    print(f"batch: {args.batch_size} x {args.seq_len} random tokens (seed {args.seed}), {metrics['positions']} positions")
    print(f"max |delta logit|          {metrics['max_logit_diff']:.3e}  (mean {metrics['mean_logit_diff']:.3e}; limit {limits['max_logit_diff']:g})")
    print(f"max |delta logprob| (next) {metrics['max_logprob_diff']:.3e}")
    print(f"cosine similarity          min {metrics['min_cosine']:.8f}  mean {metrics['mean_cosine']:.8f}  (limit {limits['min_cosine']:g})")
    print(f"next-token argmax agree    {metrics['argmax_agreement']:.4f}  (limit {limits['min_argmax_agreement']:g})")
    print("FAIL: " + "; ".join(failed) if failed else "PASS")
    return 1 if failed else 0


def main(argv=None) -> int:
    return common.run_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
