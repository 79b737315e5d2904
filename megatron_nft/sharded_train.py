"""A sync step on a sharded batch (issue #18 item 2): rank 0 keeps the rollout, turns it into one
RaggedBatch and sends each data-parallel rank only the rows it trains on (batch_shards); every rank
computes the old log-probs of its own rows, on the micro-batches each minibatch trains on, and trains
on them (Actor.compute_logprobs_local, Actor.train_step_local). What needs the whole batch is worked
out on rank 0 from the answers' values gathered to it in the whole batch's order (gather_answer_values)
and sent to every rank as a few scalars per minibatch: the rollout / actor log-prob gap, the TIS
weights' statistics, the aggregation norms (token_mean's token count, group_mean's groups). So the
metrics are trainer.train_on_rollout's, number for number (tests/test_recorded_run.py), while no rank
but 0 holds the whole batch, and no rank its pickled Python lists.

Two differences from train_on_rollout, both below the last bit of what it computes or at an edge:
with packed micro-batches the old log-probs come from the packing each minibatch trains on (the
whole-batch path packs the whole batch once for them; padded rows give per-row results either way),
and rows are packed by their response lengths, where the whole-batch path reads them off the
TIS-weighted loss mask (different only if a weight underflows to 0 at a row's last token).

What stays on the whole-batch path (trainer.train_on_rollout, the rollout broadcast whole): a
group-coupled loss (InfoNCA) whose groups do not fit a micro-batch (its split pre-pass contrasts the
rows of a group across ranks), and rollout.mode=async (its pending rollouts keep [B, S] old log-probs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_nft.actor import Actor
from megatron_nft.algorithms import StepStats, algorithm, average_steps, truncated_is_weights
from megatron_nft.batch_shards import (
    RaggedBatch,
    gather_answer_values,
    minibatch_rows,
    rollout_ragged_batch,
    scatter_shards,
    train_rows,
)
from megatron_nft.collect import StepRollout
from megatron_nft.config import TrainConfig
from megatron_nft.data.batching import select_rows
from megatron_nft.microbatches import LocalRows
from megatron_nft.runtime import broadcast_object, is_main_rank


@dataclass
class SharedRollout:
    """A step's rollout as every rank holds it. `rollout`: the whole StepRollout on rank 0; elsewhere
    the whole one when not `sharded`, else only its metrics (no prompts, no completions). `lengths`:
    every row's needed length (sharded). `shard`: this rank's rows (sharded). `ragged`: the whole
    batch (rank 0, sharded). `batch_metrics`: train/reward and train/accuracy (sharded)."""

    rollout: StepRollout
    groups: int
    sharded: bool
    lengths: list[int] = field(default_factory=list)
    shard: RaggedBatch | None = None
    ragged: RaggedBatch | None = None
    batch_metrics: dict = field(default_factory=dict)


def shardable(actor: Actor, lengths: list[int], k: int, num_minibatches: int) -> bool:
    """Whether every minibatch can train on shards: not a group-coupled loss that needs the split pre-pass."""
    if not algorithm(actor.algo.resolved().name).couples_group:
        return True
    return all(actor.keeps_groups_whole(lengths[span.start : span.stop], k)
               for span in minibatch_rows(len(lengths), k, num_minibatches))


def share_rollout(actor: Actor, cfg: TrainConfig, collected: StepRollout | None) -> SharedRollout:
    """Every rank calls it; rank 0 with the step's rollout. Sends its outline (metrics, row lengths) to
    every rank, then each data-parallel rank its rows (or, where shards cannot train, the whole rollout)."""
    from megatron_nft.trainer import training_rewards

    k, main = cfg.rollout.samples_per_prompt, is_main_rank()
    head = ragged = None
    if main:
        rewards = training_rewards(cfg, collected)
        ragged = rollout_ragged_batch(collected, k, rewards) if collected.prompts else None
        lengths = ragged.needed_lengths() if ragged is not None else []
        head = {"metrics": collected.metrics, "groups": len(collected.prompts),
                "lengths": lengths if shardable(actor, lengths, k, cfg.algo.num_minibatches) else None,
                "batch_metrics": {"train/reward": sum(rewards) / max(len(rewards), 1),
                                  "train/accuracy": sum(collected.rewards) / max(len(collected.rewards), 1)}}
    head = broadcast_object(head)
    if head["lengths"] is None:
        return SharedRollout(broadcast_object(collected), head["groups"], sharded=False)
    lengths = head["lengths"]
    shard = None
    if lengths:
        spans = minibatch_rows(len(lengths), k, cfg.algo.num_minibatches)
        whole = [actor.keeps_groups_whole(lengths[s.start : s.stop], k) for s in spans]
        assignment = train_rows(actor.microbatches, lengths, group_size=k, num_minibatches=cfg.algo.num_minibatches,
                                whole_groups=whole) if main else None
        shard = scatter_shards(ragged, assignment, actor.dp_rank, replica_group=actor.replica_group)
    return SharedRollout(collected if main else StepRollout(metrics=head["metrics"]), head["groups"], sharded=True,
                         lengths=lengths, shard=shard, ragged=ragged, batch_metrics=head["batch_metrics"])


def train_on_shards(actor: Actor, cfg: TrainConfig, shared: SharedRollout) -> tuple[dict, list[bool]]:
    """train_on_rollout on this rank's shard: old log-probs of its rows, then `num_minibatches`
    optimizer steps; returns the same metrics, and per minibatch whether its update was skipped."""
    k, main, cap = cfg.rollout.samples_per_prompt, is_main_rank(), cfg.algo.tis_cap
    lengths, shard = shared.lengths, shared.shard
    spans = minibatch_rows(len(lengths), k, cfg.algo.num_minibatches)
    batch = shard.padded()
    row_ids = shard.row_ids.tolist()
    mine = [[i for i, row in enumerate(row_ids) if row in span] for span in spans]  # local rows per minibatch

    def local(span: range, rows: list[int], tensors: dict) -> LocalRows:
        index = torch.tensor(rows, dtype=torch.long)
        return LocalRows(select_rows(tensors, index), [row_ids[i] - span.start for i in rows],
                         lengths[span.start : span.stop])

    # 3. old log-probs of this rank's rows, on the micro-batches each minibatch trains on
    started = time.perf_counter()
    old = torch.zeros_like(batch["loss_mask"])
    for span, rows in zip(spans, mine):
        whole = k if actor.keeps_groups_whole(lengths[span.start : span.stop], k) else None
        old[torch.tensor(rows, dtype=torch.long)] = actor.compute_logprobs_local(local(span, rows, batch), group_size=whole)[0]
    old_logprobs_s = time.perf_counter() - started
    batch["old_logprobs"] = old
    if cap is not None:  # as train_on_rollout: each token weighted by min(π_old / π_rollout, cap)
        batch["loss_mask"] = batch["loss_mask"] * truncated_is_weights(old, batch["rollout_logprobs"],
                                                                       batch["loss_mask"].bool(), cap)
    # the whole batch's old log-probs on rank 0, in its order: the figures over every token, and the norms
    gathered = gather_answer_values(shard, shard.answer_values(old), rows=len(lengths), sends=actor.replica_leader)
    whole_batch = _whole_batch_figures(actor, shared.ragged, gathered, spans, k, cap) if main else None
    metrics, norms = broadcast_object(whole_batch)
    metrics = {**metrics, "time/old_logprobs_s": old_logprobs_s, **shared.batch_metrics}
    # 4. the minibatch updates
    step_metrics = []
    started = time.perf_counter()
    for span, rows, norm in zip(spans, mine, norms):
        step_metrics.append(actor.train_step_local(local(span, rows, batch), group_size=k, norm=norm))
    metrics["time/train_s"] = time.perf_counter() - started
    metrics |= {f"actor/{key}": value for key, value in average_steps(StepStats, step_metrics).items()}
    metrics["actor/loss_first_minibatch"] = step_metrics[0]["loss"]
    metrics["actor/minibatches"] = len(step_metrics)
    metrics["actor/skipped_updates"] = sum(not m["update_ok"] for m in step_metrics)
    metrics["actor/nonfinite_updates"] = sum(m["nonfinite"] for m in step_metrics)
    return metrics, [m["nonfinite"] for m in step_metrics]


def _whole_batch_figures(actor: Actor, ragged: RaggedBatch, old: torch.Tensor, spans: list[range], k: int,
                         cap: float | None) -> tuple[dict, list[float]]:
    """Rank 0: from the whole batch's old log-probs (one per response token, rows end to end), the
    figures train_on_rollout computes over the padded batch's masked tokens (the same values in the
    same order, so the same numbers) and each minibatch's aggregation norm over its loss mask."""
    metrics = {}
    weights = None
    if cap is not None:
        weights = truncated_is_weights(old, ragged.rollout_logprobs, torch.ones_like(old, dtype=torch.bool), cap)
        metrics["actor/tis_weight_mean"] = weights.mean().item()
        metrics["actor/tis_capped_frac"] = (weights >= cap).float().mean().item()
    metrics["actor/rollout_logprob_abs_diff"] = (old - ragged.rollout_logprobs).abs().mean().item()
    ends = torch.cumsum(ragged.response_lens, 0).tolist()
    norms = []
    for span in spans:
        if not actor.needs_aggregation_norm:
            norms.append(actor.aggregation_norm(torch.zeros(0), k))
            continue
        rows = ragged.select(span)
        first = ends[span.start - 1] if span.start else 0
        values = weights[first : ends[span.stop - 1]] if weights is not None else torch.ones(int(rows.response_lens.sum()))
        norms.append(actor.aggregation_norm(rows.aligned(values), k))  # the minibatch's (weighted) loss mask
    return metrics, norms
