"""How often FlexAttention compiles as packed micro-batches change length.

    python bench/flex_compile.py                                   # CUDA: Qwen2.5-1.5B heads, 10 lengths 1K-16K
    python bench/flex_compile.py --device cpu --compile-backend eager --max-tokens 512 --heads 4 --head-dim 16

Each packed micro-batch has a new total length and new document boundaries. The actor's packed
attention (megatron_nft.model.attention, backend "flex") builds a BlockMask per micro-batch and calls
torch.compile'd flex_attention; a compile per length would cost seconds on every micro-batch, and past
torch._dynamo's recompile limit flex would fall back to its slow eager path. This runs the library's
own path (document_block_mask + flex_document_attention, forward and backward on CUDA) over
`--lengths` random streams and reads torch._dynamo's counters around each call: frames compiled
(a first compile or a recompile) and graphs captured. Expected: a compile at the first length, one
recompile with dynamic shapes at the second, none after.

On CPU the library runs flex eagerly (nothing to count); `--compile-backend eager` compiles
flex_attention with that dynamo backend instead (guards and recompiles as on CUDA, no kernels), which
checks this script's counting on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stream_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    """`count` distinct totals spread over [low, high], in a shuffled order (not monotone)."""
    step = (high - low) / max(count - 1, 1)
    totals = [int(low + i * step) | 1 for i in range(count)]  # odd: never a multiple of the 128 block
    random.Random(seed).shuffle(totals)
    return totals


def document_bounds(total: int, docs: int, rng: random.Random) -> list[int]:
    """cu_seqlens of `docs` (or fewer) documents of random lengths filling `total` tokens."""
    cuts = sorted(rng.sample(range(1, total), min(docs, total) - 1))
    return [0, *cuts, total]


def counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def attention_fn(device: str, backend: str | None):
    """The library's packed flex path; on CPU with `backend`, flex compiled with that dynamo backend."""
    from megatron_nft.model.attention import flex_document_attention

    if device == "cuda" or backend is None:
        return flex_document_attention
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, backend=backend)

    def attend(query, key, value, block_mask, scale):
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        out = compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1).reshape(query.shape[0], -1)

    return attend


def dense_reference(q, k, v, bounds, scale):
    """SDPA with the explicit document-causal mask (the dense backend), for a parity check."""
    from megatron_nft.model.attention import document_causal_mask

    mask = document_causal_mask(torch.tensor(bounds)).to(q.device)
    qq, kk, vv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                                           enable_gqa=qq.shape[1] != kk.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def run(args) -> dict:
    from megatron_nft.model.attention import document_block_mask

    device, dtype = args.device, DTYPES[args.dtype]
    backward = args.backward if args.backward is not None else device == "cuda"
    attend = attention_fn(device, args.compile_backend)
    scale = args.head_dim ** -0.5
    rng = random.Random(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    for i, total in enumerate(stream_lengths(args.lengths, args.min_tokens, args.max_tokens, args.seed)):
        bounds = document_bounds(total, args.docs, rng)
        q = torch.randn(total, args.heads, args.head_dim, generator=gen, device=device, dtype=dtype)
        k, v = (torch.randn(total, args.kv_heads, args.head_dim, generator=gen, device=device, dtype=dtype)
                for _ in range(2))
        for x in (q, k, v):
            x.requires_grad_(backward)
        timings = []
        frames0, graphs0 = counts()
        for _ in range(2):  # the first call pays any compile; the second is the steady state
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = attend(q, k, v, document_block_mask(bounds, device=device), scale)
            if backward:
                out.float().sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
        frames1, graphs1 = counts()
        row = {"i": i, "tokens": total, "documents": len(bounds) - 1, "compiles": frames1 - frames0,
               "graphs": graphs1 - graphs0, "first_call_s": timings[0], "second_call_s": timings[1]}
        if i == 0:  # parity with the dense backend once: the counted path computes the right thing
            with torch.no_grad():
                ref = dense_reference(q.detach(), k.detach(), v.detach(), bounds, scale).float()
                row["max_abs_diff_vs_dense"] = (out.detach().float() - ref).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
    compiles = [r["compiles"] for r in rows]
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or getattr(torch._dynamo.config, "cache_size_limit", None)
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(), "torch": torch.__version__,
        "dtype": args.dtype, "backward": backward, "heads": [args.heads, args.kv_heads, args.head_dim],
        "compile_backend": "inductor" if device == "cuda" else (args.compile_backend or "none (eager flex)"),
        "lengths": len(rows), "compiles_total": sum(compiles), "graphs_total": sum(r["graphs"] for r in rows),
        "compiles_after_second_length": sum(compiles[2:]), "recompile_limit": limit, "rows": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--lengths", type=int, default=10, help="micro-batches, each of a new total length")
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--docs", type=int, default=8, help="documents per micro-batch")
    ap.add_argument("--heads", type=int, default=12, help="query heads (default: Qwen2.5-1.5B's)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--backward", action=argparse.BooleanOptionalAction, default=None,
                    help="also the backward pass (default: on CUDA; torch refuses flex's backward on CPU)")
    ap.add_argument("--compile-backend", default=None, help="CPU only: compile flex_attention with this dynamo backend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the summary and rows here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("flex_compile: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.min_tokens < args.docs or args.max_tokens < args.min_tokens:
        print(f"flex_compile: need --docs <= --min-tokens <= --max-tokens (got {args.docs}, {args.min_tokens}, "
              f"{args.max_tokens})", file=sys.stderr)
        return 2
    summary = run(args)
    print(f"{summary['lengths']} lengths: {summary['compiles_total']} compiles ({summary['graphs_total']} graphs), "
          f"{summary['compiles_after_second_length']} after the second length; recompile limit {summary['recompile_limit']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
