"""A step on a sharded batch (issue #18 item 2): rank 0 keeps the rollout, turns it into one
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

A group-coupled loss (InfoNCA) whose groups do not fit a micro-batch needs a pre-pass over the whole
minibatch (Actor._split_group_coefficients): each rank computes its rows' log-probs, rank 0 runs the
loss's autograd on them gathered and sends the coefficients back (4 bytes a response token of the
minibatch to every rank). In rollout.mode=async the rollouts scored ahead are cut the same way,
their old log-probs gathered to rank 0 (where checkpoints keep them, one per response token) and sent
back with the rows when trained on.
"""

from __future__ import annotations

import dataclasses
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
    only its metrics (no prompts, no completions). `lengths`: every row's needed length. `shard`: this
    rank's rows, with their old log-probs when they came with the rollout. `ragged`: the whole batch
    (rank 0). `batch_metrics`: train/reward and train/accuracy."""

    rollout: StepRollout
    groups: int
    lengths: list[int] = field(default_factory=list)
    shard: RaggedBatch | None = None
    ragged: RaggedBatch | None = None
    batch_metrics: dict = field(default_factory=dict)


def share_rollout(actor: Actor, cfg: TrainConfig, collected: StepRollout | None,
                  old_logprobs: torch.Tensor | None = None) -> SharedRollout:
    """Every rank calls it; rank 0 with the step's rollout, and its old log-probs if computed already
    (one per response token, rows end to end; or [B, S] as checkpoints before this layout hold them).
    Sends its outline (metrics, row lengths) to every rank, then each data-parallel rank its rows."""
    from megatron_nft.trainer import training_rewards

    k, main = cfg.rollout.samples_per_prompt, is_main_rank()
    head = ragged = None
    if main:
        rewards = training_rewards(cfg, collected)
        ragged = rollout_ragged_batch(collected, k, rewards) if collected.prompts else None
        if ragged is not None and old_logprobs is not None:
            flat = ragged.answer_values(old_logprobs) if old_logprobs.dim() == 2 else old_logprobs
            ragged = dataclasses.replace(ragged, old_logprobs=flat)
        lengths = ragged.needed_lengths() if ragged is not None else []
        head = {"metrics": collected.metrics, "groups": len(collected.prompts), "lengths": lengths,
                "batch_metrics": {"train/reward": sum(rewards) / max(len(rewards), 1),
                                  "train/accuracy": sum(collected.rewards) / max(len(collected.rewards), 1)}}
    head = broadcast_object(head)
    lengths = head["lengths"]
    shard = None
    if lengths:
        spans = minibatch_rows(len(lengths), k, cfg.algo.num_minibatches)
        whole = [actor.keeps_groups_whole(lengths[s.start : s.stop], k) for s in spans]
        assignment = train_rows(actor.microbatches, lengths, group_size=k, num_minibatches=cfg.algo.num_minibatches,
                                whole_groups=whole) if main else None
        shard = scatter_shards(ragged, assignment, actor.dp_rank, replica_group=actor.replica_group)
    return SharedRollout(collected if main else StepRollout(metrics=head["metrics"]), head["groups"],
                         lengths=lengths, shard=shard, ragged=ragged, batch_metrics=head["batch_metrics"])


class _Minibatches:
    """This rank's rows of each of the step's minibatches, as LocalRows of a padded shard."""

    def __init__(self, cfg: TrainConfig, shared: SharedRollout):
        self.k, self.lengths = cfg.rollout.samples_per_prompt, shared.lengths
        self.spans = minibatch_rows(len(self.lengths), self.k, cfg.algo.num_minibatches)
        self.row_ids = shared.shard.row_ids.tolist()
        self.mine = [[i for i, row in enumerate(self.row_ids) if row in span] for span in self.spans]

    def local(self, m: int, tensors: dict) -> LocalRows:
        span, rows = self.spans[m], self.mine[m]
        return LocalRows(select_rows(tensors, torch.tensor(rows, dtype=torch.long)),
                         [self.row_ids[i] - span.start for i in rows], self.lengths[span.start : span.stop])

    def old_logprobs(self, actor: Actor, batch: dict) -> torch.Tensor:
        """log π_old [n, S] of the shard's rows under the actor's current weights, on the micro-batches
        each minibatch trains on."""
        old = torch.zeros_like(batch["loss_mask"])
        for m, span in enumerate(self.spans):
            whole = self.k if actor.keeps_groups_whole(self.lengths[span.start : span.stop], self.k) else None
            old[torch.tensor(self.mine[m], dtype=torch.long)] = actor.compute_logprobs_local(self.local(m, batch), group_size=whole)[0]
        return old


def ahead_old_logprobs(actor: Actor, cfg: TrainConfig, rollout: StepRollout | None) -> torch.Tensor | None:
    """Async mode: log π_old of a rollout under the actor's current weights (swapped in: the version
    that sampled it), computed now, trained on later. Every rank calls it, rank 0 with the rollout;
    rank 0 gets them, one per response token with rows end to end (share_rollout takes them back),
    the other ranks None. A rollout without groups has none."""
    shared = share_rollout(actor, cfg, rollout)
    if not shared.groups:
        return None
    shard = shared.shard
    old = _Minibatches(cfg, shared).old_logprobs(actor, shard.padded())
    return gather_answer_values(shard, shard.answer_values(old), rows=len(shared.lengths), sends=actor.replica_leader)


def train_on_shards(actor: Actor, cfg: TrainConfig, shared: SharedRollout) -> tuple[dict, list[bool]]:
    """train_on_rollout on this rank's shard: old log-probs of its rows (unless they came with the
    rollout), then `num_minibatches` optimizer steps; returns the same metrics, and per minibatch
    whether its update was skipped."""
    k, main, cap = cfg.rollout.samples_per_prompt, is_main_rank(), cfg.algo.tis_cap
    lengths, shard = shared.lengths, shared.shard
    minibatches = _Minibatches(cfg, shared)
    spans = minibatches.spans
    batch = shard.padded()
    # 3. old log-probs of this rank's rows, on the micro-batches each minibatch trains on
    started = time.perf_counter()
    if shard.old_logprobs is not None:  # computed ahead (async): at the labels, 0 elsewhere (the loss reads no other)
        old = shard.aligned(shard.old_logprobs)
    else:
        old = minibatches.old_logprobs(actor, batch)
    old_logprobs_s = time.perf_counter() - started
    batch["old_logprobs"] = old
    if cap is not None:  # as train_on_rollout: each token weighted by min(π_old / π_rollout, cap)
        batch["loss_mask"] = batch["loss_mask"] * truncated_is_weights(old, batch["rollout_logprobs"],
                                                                       batch["loss_mask"].bool(), cap)
    # the whole batch's old log-probs on rank 0, in its order: the figures over every token, and the norms
    gathered = gather_answer_values(shard, shard.answer_values(old), rows=len(lengths), sends=actor.replica_leader)
    whole_batch = _whole_batch_figures(actor, shared.ragged, gathered, spans, k, cap) if main else None
    metrics, norms = broadcast_object(whole_batch[:2] if main else None)
    weights = whole_batch[2] if main else None
    metrics = {**metrics, "time/old_logprobs_s": old_logprobs_s, **shared.batch_metrics}
    # 4. the minibatch updates
    step_metrics = []
    started = time.perf_counter()
    for m, norm in enumerate(norms):
        local, split_loss = minibatches.local(m, batch), None
        if algorithm(actor.algo.resolved().name).couples_group and not actor.keeps_groups_whole(local.lengths, k):
            split_loss = _split_pre_pass(actor, shared, minibatches, m, local, norm, gathered, weights)
        step_metrics.append(actor.train_step_local(local, group_size=k, norm=norm, split_loss=split_loss))
    metrics["time/train_s"] = time.perf_counter() - started
    return metrics | minibatch_metrics(step_metrics), [m["nonfinite"] for m in step_metrics]


def minibatch_metrics(step_metrics: list[dict]) -> dict:
    """A step's actor/ metrics from its minibatches' train-step results: each statistic as StepStats
    declares it reduces (min, max, else the mean), the first loss and the update counts."""
    return {f"actor/{key}": value for key, value in average_steps(StepStats, step_metrics).items()} | {
        "actor/loss_first_minibatch": step_metrics[0]["loss"],
        "actor/minibatches": len(step_metrics),
        "actor/skipped_updates": sum(not m["update_ok"] for m in step_metrics),
        "actor/nonfinite_updates": sum(m["nonfinite"] for m in step_metrics),
    }


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
    return metrics, norms, weights


def _split_pre_pass(actor: Actor, shared: SharedRollout, minibatches: _Minibatches, m: int, local: LocalRows,
                    norm: float, old: torch.Tensor | None, weights: torch.Tensor | None) -> float:
    """Actor._split_group_coefficients for minibatch `m` spread over ranks: every rank its rows'
    log-probs under the current weights (the micro-batches the whole-batch pre-pass cuts), gathered
    to rank 0, which runs the loss's autograd on the whole minibatch (its rows from the ragged batch,
    `old` and the TIS `weights` of the whole batch, one per response token) and sends back the
    coefficients; puts this rank's rows' coefficients in `local.batch` as "coef" and returns the
    loss's value. A group's rows may sit on different ranks: only rank 0 sees them together."""
    k, span = minibatches.k, minibatches.spans[m]
    current, _ = actor.compute_logprobs_local(local, group_size=None)
    rows = minibatches.mine[m]
    mine = shared.shard.select(rows)
    mine = dataclasses.replace(mine, row_ids=mine.row_ids - span.start)  # numbered within the minibatch
    gathered = gather_answer_values(mine, mine.answer_values(current), rows=len(span), sends=actor.replica_leader)
    payload = None
    if is_main_rank():
        whole = shared.ragged.select(span)
        ends = torch.cumsum(shared.ragged.response_lens, 0).tolist()
        first, last = (ends[span.start - 1] if span.start else 0), ends[span.stop - 1]
        padded = whole.padded()
        batch = {"old_logprobs": whole.aligned(old[first:last]), "rewards": padded["rewards"],
                 "correct_rate": padded["correct_rate"], "reward_std": padded["reward_std"],
                 "loss_mask": padded["loss_mask"] if weights is None else whole.aligned(weights[first:last])}
        split = actor.split_coefficients(whole.aligned(gathered), batch, k, norm)
        payload = (whole.answer_values(split["coef"]), whole.response_lens, split["loss"])
    coef, response_lens, loss = broadcast_object(payload)
    # this rank's rows' coefficients, in its rows' order, aligned as its batch
    starts = (torch.cumsum(response_lens, 0) - response_lens).tolist()
    sizes = response_lens.tolist()
    positions = mine.row_ids.tolist()
    values = torch.cat([coef[starts[p] : starts[p] + sizes[p]] for p in positions]) if positions else coef[:0]
    local.batch["coef"] = mine.aligned(values)
    return loss
