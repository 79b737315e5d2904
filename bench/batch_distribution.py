"""Getting a step's batch to the data-parallel ranks: today's path against the sharded one, per rank.

    python bench/batch_distribution.py                                  # 8,192 answers, mean 1,024 tokens, 2 and 4 ranks
    python bench/batch_distribution.py --mean-tokens 2048 --worlds 2
    python bench/batch_distribution.py --answers 512 --worlds 2        # a quick look

A synthetic rollout of the paper's batch size (512 prompts x 16 answers, prompts of 50-250 tokens,
answer lengths uniform in [1, 2 x mean - 1], token ids and log-probs as the engine returns them:
Python ints and floats in a StepRollout) is built on rank 0 before anything is measured; then, on
gloo ranks (one process each, DP = world size), in a fresh set of processes per (path, world):

  before  trainer's path today: broadcast_object(rollout) over the control group (pickled), then
          trainer.rollout_batch on every rank (the whole padded batch everywhere);
  after   batch_shards: rank 0 turns the rollout into one RaggedBatch, train_rows gives each
          data-parallel rank its rows (the padded micro-batch plan, micro_batch_size 8, 2 minibatches),
          scatter_shards sends each rank only those rows, and each rank pads its shard;
  trainer the trainer's sync step as it runs now: sharded_train.share_rollout (rank 0's outline of the
          step to every rank, the ragged batch, train_rows from the actor's own plan, the scatter)
          then the shard padded, with a tiny real Actor (DP = world, micro-batch 8, 2 minibatches)
          built before the measurement.

Per rank: wall seconds from a barrier to the rank's padded batch (a rank that receives includes its
wait for rank 0), the process's CPU seconds over the same span (one thread a rank; on a box shared
with other work the wall time measures the neighbours too, the CPU time much less; waiting in gloo
costs little CPU), and host peak memory: the kernel's
peak-RSS counter is reset (5 written to /proc/self/clear_refs) after the rollout exists and a
barrier, VmRSS read, the step run, and VmHWM read: extra = VmHWM - VmRSS before, i.e. what the
distribution itself costs the rank above what it already held (rank 0 holds the rollout either way).
Every rank ends by checking its rows against the batch it must equal (before: its rows of the whole
batch; after: row ids and shapes), so the two paths are known to deliver the same rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GiB = 1 << 30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def synthetic_rollout(answers: int, k: int, mean_tokens: int, seed: int = 0):
    import torch

    from megatron_nft.collect import Prompt, StepRollout
    from megatron_nft.rollout.base import Completion

    g = torch.Generator().manual_seed(seed)
    prompts = [Prompt(torch.randint(300, 150000, (int(n),), generator=g).tolist(), "42")
               for n in torch.randint(50, 251, (answers // k,), generator=g)]
    completions = []
    for i, n in enumerate(torch.randint(1, 2 * mean_tokens, (answers,), generator=g).tolist()):
        completions.append(Completion(i // k, torch.randint(300, 150000, (n,), generator=g).tolist(),
                                      (-torch.rand(n, generator=g, dtype=torch.float64) * 4).tolist(), "stop", 0))
    rewards = [float(x) for x in (torch.rand(answers, generator=g) < 0.5).tolist()]
    return StepRollout(prompts=prompts, completions=completions, rewards=rewards)


def _rank(rank, world_size, path, answers, k, mean_tokens):
    import torch
    import torch.distributed as dist

    from megatron_nft import runtime
    from megatron_nft.batch_shards import (
        rollout_ragged_batch,
        scatter_shards,
        train_rows,
    )
    from megatron_nft.microbatches import MicroBatchPlan
    from megatron_nft.trainer import rollout_batch

    runtime.init_process_group()
    actor = cfg = None
    if path == "trainer":
        from megatron_nft.actor import Actor
        from megatron_nft.config import load_config
        from megatron_nft.model.qwen2 import Qwen2Shape

        cfg = load_config(None, [f"rollout.samples_per_prompt={k}", "algo.num_minibatches=2", "parallel.micro_batch_size=8"])
        shape = Qwen2Shape(vocab_size=150000, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=4, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8,
                           tie_word_embeddings=True)
        actor = Actor(shape, micro_batch_size=8, algo=cfg.algo)
    rollout = synthetic_rollout(answers, k, mean_tokens) if rank == 0 else None
    tokens = sum(len(c.token_ids) for c in rollout.completions) if rank == 0 else 0
    gc.collect()
    runtime.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS counter starts again from the current RSS
    before = _status("VmRSS")
    phases = {}
    cpu = time.process_time()
    start = time.perf_counter()
    if path == "before":
        got = runtime.broadcast_object(rollout)
        phases["broadcast_object_s"] = time.perf_counter() - start
        mark = time.perf_counter()
        batch = rollout_batch(got, k, got.rewards)
        phases["rollout_batch_s"] = time.perf_counter() - mark
        mine = MicroBatchPlan(dp=world_size, micro_batch_size=8).rows_by_rank([1] * len(got.rewards))[rank]
        rows = [r for r in mine if r < len(got.rewards)]
    elif path == "trainer":
        from megatron_nft.sharded_train import share_rollout

        shared = share_rollout(actor, cfg, rollout)
        phases["share_rollout_s"] = time.perf_counter() - start
        mark = time.perf_counter()
        batch = shared.shard.padded()
        phases["pad_s"] = time.perf_counter() - mark
        rows = shared.shard.row_ids.tolist()
        del shared
    else:
        plan = MicroBatchPlan(dp=world_size, dp_rank=rank, micro_batch_size=8)
        ragged = assignment = None
        if rank == 0:
            ragged = rollout_ragged_batch(rollout, k, rollout.rewards)
            assignment = train_rows(plan, ragged.needed_lengths(), group_size=k, num_minibatches=2)
            phases["tensorise_s"] = time.perf_counter() - start
        mark = time.perf_counter()
        shard = scatter_shards(ragged, assignment, rank)
        phases["scatter_s"] = time.perf_counter() - mark
        del ragged
        mark = time.perf_counter()
        batch = shard.padded()
        phases["pad_s"] = time.perf_counter() - mark
        rows = shard.row_ids.tolist()
    seconds = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    peak = _status("VmHWM")
    width = batch["tokens"].shape[1]
    held = batch["tokens"].shape[0]
    # what every rank must hold: the data-parallel rank's rows (before: of the whole batch it built)
    runtime.barrier()
    all_rows = runtime.gather_objects(sorted(rows))
    assert sorted(r for part in all_rows for r in part) == list(range(answers)), "a row lost or doubled"
    dist.barrier(group=runtime.control_group())
    return {"rank": rank, "seconds": seconds, "cpu": cpu_s, **phases, "extra_gib": (peak - before) / GiB, "peak_gib": peak / GiB,
            "rows_held": held, "width": width, "response_tokens": tokens, "torch": str(torch.__version__)}


def run(path: str, world: int, answers: int, k: int, mean_tokens: int) -> list[dict]:
    from megatron_nft.testing import run_distributed

    return run_distributed(_rank, world, path, answers, k, mean_tokens, timeout_s=3600, strict=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=8192)
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--mean-tokens", type=int, default=1024)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", type=Path, help="also write the per-rank results here")
    args = parser.parse_args(argv)
    if args.answers % args.samples_per_prompt or args.answers < 1 or args.mean_tokens < 1:
        parser.error(f"--answers {args.answers}: expected a positive multiple of --samples-per-prompt "
                     f"{args.samples_per_prompt}; --mean-tokens {args.mean_tokens}: expected >= 1")
    print(f"# {args.answers} answers ({args.answers // args.samples_per_prompt} prompts x {args.samples_per_prompt}), "
          f"answer lengths uniform in [1, {2 * args.mean_tokens - 1}]; {platform.node()}, "
          f"{platform.processor() or platform.machine()}")
    results = {}
    print("| DP | path | rank | wall s | CPU s | wall phases (s) | extra host peak GiB | host peak GiB | rows held | width |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for world in args.worlds:
        for path in ("before", "after", "trainer"):
            out = run(path, world, args.answers, args.samples_per_prompt, args.mean_tokens)
            results[f"{path} dp={world}"] = out
            for r in out:
                phases = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r.items() if k.endswith("_s"))
                print(f"| {world} | {path} | {r['rank']} | {r['seconds']:.2f} | {r['cpu']:.2f} | {phases} | {r['extra_gib']:.3f} | "
                      f"{r['peak_gib']:.2f} | {r['rows_held']} | {r['width']} |", flush=True)
        tokens = results[f"before dp={world}"][0]["response_tokens"]
        b, a = results[f"before dp={world}"], results[f"trainer dp={world}"]
        worst_b = max(r["extra_gib"] for r in b[1:]) if world > 1 else b[0]["extra_gib"]
        worst_a = max(r["extra_gib"] for r in a[1:]) if world > 1 else a[0]["extra_gib"]
        print(f"# DP={world}: {tokens / 1e6:.1f}M response tokens; other ranks' extra peak {worst_b:.3f} -> "
              f"{worst_a:.3f} GiB ({worst_a / worst_b:.2f}x; 1/DP = {1 / world:.2f}); rank 0 {b[0]['extra_gib']:.3f} -> "
              f"{a[0]['extra_gib']:.3f} GiB; slowest rank {max(r['seconds'] for r in b):.2f} -> "
              f"{max(r['seconds'] for r in a):.2f} s wall, CPU of all ranks {sum(r['cpu'] for r in b):.2f} -> "
              f"{sum(r['cpu'] for r in a):.2f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
