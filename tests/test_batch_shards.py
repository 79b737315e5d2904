"""The sharded batch (megatron_nft.batch_shards): a shard padded on its rank is, row for row, the batch
pack_rows / trainer.rollout_batch builds whole; the rows each data-parallel rank gets are the rows the
actor's micro-batch plan gives it (checked against MicroBatchPlan.split itself); and the scatter over
gloo ranks delivers exactly those rows, under the strict device mode. A rank holding only its rows cuts
the micro-batches MicroBatchPlan.split cuts from the whole minibatch, and the trainer's sharded step
(sharded_train.py) gives train_on_rollout's metrics and updated weights bit for bit on DP=2."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_nft.batch_shards import (
    gather_answer_values,
    ragged_batch,
    rollout_ragged_batch,
    scatter_shards,
    train_rows,
)
from megatron_nft.data.batching import needed_lengths, pack_rows, select_rows
from megatron_nft.microbatches import MicroBatchPlan
from megatron_nft.testing import run_distributed


def _rows(lengths=(5, 0, 9, 3, 7, 1, 4, 8), seed=0):
    """Prompts of 1-4 tokens, responses of the given lengths (one empty), log-probs not float32-exact."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 60000, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
               for _ in lengths]
    responses = [torch.randint(1, 60000, (n,), generator=g).tolist() for n in lengths]
    logprobs = [(-torch.rand(n, generator=g, dtype=torch.float64) * 3).tolist() for n in lengths]
    per_row = {"rewards": [float(i % 2) for i in range(len(lengths))], "correct_rate": [0.5] * len(lengths)}
    return prompts, responses, logprobs, per_row


def _whole(prompts, responses, logprobs, per_row):
    return pack_rows(prompts, responses, extra={"rollout_logprobs": logprobs, **per_row})


def test_a_padded_shard_is_the_whole_batch_s_rows():
    rows = _rows()
    whole, ragged = _whole(*rows), ragged_batch(*rows)
    assert ragged.width == whole["tokens"].shape[1]
    assert needed_lengths(whole["loss_mask"]) == ragged.needed_lengths()
    for picked in ([0, 1, 2, 3, 4, 5, 6, 7], [6, 1, 3], [2], []):
        shard = ragged.select(picked)
        assert shard.row_ids.tolist() == picked
        got, want = shard.padded(), select_rows(whole, torch.tensor(picked, dtype=torch.long))
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (picked, key)
    shard = ragged.select([6, 1, 3]).select([2, 0])  # a shard of a shard keeps the batch's ids and width
    assert shard.row_ids.tolist() == [3, 6] and torch.equal(shard.padded()["tokens"], whole["tokens"][[3, 6]])


def test_the_rollout_s_ragged_batch_is_rollout_batch():
    from megatron_nft.collect import Prompt, StepRollout
    from megatron_nft.rollout.base import Completion
    from megatron_nft.trainer import rollout_batch

    prompts, responses, logprobs, _ = _rows(lengths=(3, 6, 2, 5, 4, 7))
    k = 3
    rollout = StepRollout(
        prompts=[Prompt(prompts[0], "1"), Prompt(prompts[1], "2")],
        completions=[Completion(i // k, r, lp, "stop", 0) for i, (r, lp) in enumerate(zip(responses, logprobs))],
        rewards=[1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
    )
    shaped = [1.0, -0.25, 0.0, 0.75, 1.0, -0.5]  # over-long shaping: reward_std is computed, not sqrt(r(1-r))
    want = rollout_batch(rollout, k, shaped)
    got = rollout_ragged_batch(rollout, k, shaped).padded()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_bad_input_is_one_line_naming_it():
    prompts, responses, logprobs, per_row = _rows(lengths=(2, 3))
    with pytest.raises(ValueError, match=r"^ragged_batch: row 1 has an empty prompt; expected at least one token"):
        ragged_batch([prompts[0], []], responses, logprobs, per_row)
    with pytest.raises(ValueError, match=r"^train_rows: whole_groups has 1 flags for 2 minibatches$"):
        train_rows(MicroBatchPlan(dp=1), [3, 4, 5, 6], group_size=2, num_minibatches=2, whole_groups=[True])
    with pytest.raises(ValueError, match=r"^train_rows: 5 rows are not whole groups of 2$"):
        train_rows(MicroBatchPlan(dp=1), [3, 4, 5, 6, 7], group_size=2, num_minibatches=2)


def _split_rows(plan_args, batch, group_size):
    """Per rank, the row ids split() puts in its micro-batches (0-based; -1 for the zero rows it adds)."""
    ids = {**batch, "row": torch.arange(1, batch["tokens"].shape[0] + 1, dtype=torch.float32)}
    out = []
    for rank in range(plan_args["dp"]):
        micro = MicroBatchPlan(dp_rank=rank, **plan_args).split(ids, group_size=group_size).micro
        out.append([int(r) - 1 for mb in micro for r in mb["row"]])
    return out


PLANS = [
    {"dp": 2, "micro_batch_size": 2},
    {"dp": 3, "micro_batch_size": 2, "align": 4},
    {"dp": 2, "max_tokens": 28, "align": 2},
    {"dp": 3, "max_tokens": 26},
]


@pytest.mark.parametrize("plan_args", PLANS)
@pytest.mark.parametrize("group_size", [1, 2])
def test_rows_by_rank_is_what_split_gives(plan_args, group_size):
    batch = _whole(*_rows(lengths=(5, 0, 9, 3, 7, 1, 4, 8, 2, 6)))
    plan = MicroBatchPlan(**plan_args)
    want = _split_rows(plan_args, batch, group_size)
    got = plan.rows_by_rank(needed_lengths(batch["loss_mask"]), group_size=group_size)
    rows = batch["tokens"].shape[0]
    assert [[r if r < rows else -1 for r in rank] for rank in got] == want


@pytest.mark.parametrize("plan_args", PLANS)
@pytest.mark.parametrize("num_minibatches,whole", [(1, False), (2, True), (3, [True, False, True])])
def test_train_rows_are_the_rows_each_rank_trains_on(plan_args, num_minibatches, whole):
    """Against the trainer's own cut: minibatches of whole groups (train_on_rollout), each split by the
    plan as the actor splits it (groups whole in packed micro-batches where the loss keeps them)."""
    k = 2
    batch = _whole(*_rows(lengths=(5, 0, 9, 3, 7, 1, 4, 8, 2, 6, 3, 3)))
    groups = batch["tokens"].shape[0] // k
    per_mb = math.ceil(groups / min(num_minibatches, groups))
    flags = whole if isinstance(whole, list) else [whole] * num_minibatches
    want = [set() for _ in range(plan_args["dp"])]
    for i, start in enumerate(range(0, groups, per_mb)):
        rows = slice(start * k, min(groups, start + per_mb) * k)
        for rank, ids in enumerate(_split_rows(plan_args, select_rows(batch, rows), k if flags[i] else None)):
            want[rank].update(rows.start + r for r in ids if r >= 0)
    got = train_rows(MicroBatchPlan(**plan_args), needed_lengths(batch["loss_mask"]), group_size=k,
                     num_minibatches=num_minibatches, whole_groups=whole)
    assert [set(r) for r in got] == want
    assert sorted(r for rank in got for r in rank) == list(range(batch["tokens"].shape[0]))  # each row once


def _scatter_on_ranks(rank, world_size):
    from megatron_nft import runtime

    runtime.init_process_group()
    rows = _rows(lengths=(5, 0, 9, 3, 7, 1, 4, 8, 2, 6))
    ragged = ragged_batch(*rows) if rank == 0 else None
    if rank == 0:  # old log-probs computed before the cut (async mode) travel with their rows
        ragged = dataclasses.replace(ragged, old_logprobs=ragged.rollout_logprobs * 2 - 1)
    out = {}
    # each rank its own data-parallel rank (DP = world); then both ranks one data-parallel rank (a
    # TP/PP layout), sent to each by rank 0, or to rank 0 only and broadcast within their replica
    # group (a NCCL group on GPUs: the strict mode refuses host tensors there)
    replicas = torch.distributed.new_group([0, 1])
    for label, dp_rank, assignment, group in (("dp", rank, [[0, 3, 4, 9, 6], [1, 2, 8, 5, 7]], None),
                                              ("mp", 0, [[7, 5, 6]], None), ("replicas", 0, [[8, 1]], replicas)):
        shard = scatter_shards(ragged, assignment if rank == 0 else None, dp_rank, replica_group=group)
        out[label] = {"ids": shard.row_ids, **shard.padded()}
        out[f"{label} old"] = torch.equal(shard.old_logprobs, shard.rollout_logprobs * 2 - 1)
        old = shard.answer_values(_old_logprobs(out[label]["tokens"]))  # this rank's rows' "old log-probs"
        if label == "dp":  # rank 0 gets the whole batch's, in order: the whole-batch gap from the shards
            gathered = gather_answer_values(shard, old, rows=10)
            out["gap"] = (gathered - ragged.rollout_logprobs).abs().mean() if rank == 0 else None
        if label == "replicas":  # both ranks hold rows 8 and 1, and only they: rank 0 is told what is missing
            try:
                gather_answer_values(shard, old, rows=10, sends=rank == 0)
            except ValueError as error:
                out["missing"] = str(error)
    try:
        scatter_shards(ragged, [[0]] if rank == 0 else None, rank)  # DP rank 1 has no rows assigned
    except ValueError as error:
        out["refused"] = str(error)
    return out


def _old_logprobs(tokens):
    return tokens.float() * -1e-5 - 0.3  # a made-up per-position value that differs row to row


def test_answer_values_and_their_gather_on_one_rank():
    rows = _rows()
    whole, ragged = _whole(*rows), ragged_batch(*rows)
    shard = ragged.select([5, 2, 7])
    assert torch.equal(shard.answer_values(shard.padded()["rollout_logprobs"]), shard.rollout_logprobs)
    mask = whole["loss_mask"].bool()
    old = ragged.answer_values(_old_logprobs(whole["tokens"]))
    assert torch.equal(old, _old_logprobs(whole["tokens"])[mask])  # the order a boolean mask reads
    order = [3, 1, 0, 2, 4, 5, 6, 7]  # a shard's rows in its own order come back in the batch's
    assert torch.equal(gather_answer_values(ragged.select(order), old[_reorder(ragged, order)], rows=8), old)
    with pytest.raises(ValueError, match="no values for rows"):
        gather_answer_values(shard, shard.rollout_logprobs, rows=8)


def _reorder(ragged, order):
    """Positions, in the whole batch's answer layout, of the answers of rows `order`, in that order."""
    ends, lengths = torch.cumsum(ragged.response_lens, 0).tolist(), ragged.response_lens.tolist()
    return torch.cat([torch.arange(ends[i] - lengths[i], ends[i]) for i in order])


def test_scatter_gives_each_rank_only_its_rows():
    whole = _whole(*_rows(lengths=(5, 0, 9, 3, 7, 1, 4, 8, 2, 6)))
    results = run_distributed(_scatter_on_ranks, 2, timeout_s=300)
    for rank, out in enumerate(results):
        for label, ids in (("dp", [[0, 3, 4, 9, 6], [1, 2, 8, 5, 7]][rank]), ("mp", [7, 5, 6]), ("replicas", [8, 1])):
            assert out[f"{label} old"], (rank, label)
            got = out[label]
            assert got.pop("ids").tolist() == ids
            want = select_rows(whole, torch.tensor(ids))
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (rank, label, key)
        mask = whole["loss_mask"].bool()
        if rank == 0:  # the whole batch's gap, bit for bit, as train_on_rollout computes it
            assert torch.equal(out["gap"], (_old_logprobs(whole["tokens"]) - whole["rollout_logprobs"]).abs()[mask].mean())
            assert out["missing"].startswith("gather_answer_values: no values for rows [0, 2, 3, 4, 5, 6, 7, 9]")
        else:
            assert out["gap"] is None and "missing" not in out
        assert out["refused"] == "scatter_shards: rows for 1 data-parallel ranks, but rank 1 is data-parallel rank 1"


@pytest.mark.parametrize("plan_args", PLANS)
@pytest.mark.parametrize("group_size", [None, 2])
def test_split_local_is_split_of_the_whole_minibatch(plan_args, group_size):
    """A rank that holds only its rows (rows_by_rank's) cuts the very micro-batches split cuts from the
    whole minibatch, zero rows included; a row it lacks is refused, naming it."""
    from megatron_nft.microbatches import LocalRows

    batch = _whole(*_rows(lengths=(5, 0, 9, 3, 7, 1, 4, 8, 2, 6)))
    lengths = needed_lengths(batch["loss_mask"])
    for rank in range(plan_args["dp"]):
        plan = MicroBatchPlan(dp_rank=rank, **plan_args)
        mine = [r for r in plan.rows_by_rank(lengths, group_size=group_size or 1)[rank] if r < len(lengths)]
        order = mine[::-1]  # the shard's own order is not the plan's
        local = LocalRows(select_rows(batch, torch.tensor(order, dtype=torch.long)), order, lengths)
        got, want = plan.split_local(local, group_size=group_size), plan.split(batch, group_size=group_size)
        assert got.rows == want.rows and len(got.micro) == len(want.micro)
        for g, w in zip(got.micro, want.micro):
            assert g.keys() == w.keys()
            for key in w:
                if key == "packed":
                    assert g[key].micro == w[key].micro and torch.equal(g[key].tokens, w[key].tokens)
                else:
                    assert torch.equal(g[key], w[key]), (rank, key)
        if mine:
            short = LocalRows(select_rows(batch, torch.tensor(order[1:], dtype=torch.long)), order[1:], lengths)
            with pytest.raises(ValueError, match=rf"^split_local: data-parallel rank {rank} trains on rows \[{order[0]}\] of"):
                plan.split_local(short, group_size=group_size)


# (algo overrides, parallel overrides, num_minibatches): token_mean + TIS on padded micro-batches over
# two minibatches; GRPO + TIS packed; InfoNCA's group_mean with whole groups; NFT at TP=2
SHARDED_CASES = [
    (["algo.name=dapo", "algo.tis_cap=1.05"], {"micro_batch_size": 2}, 2),
    (["algo.name=grpo", "algo.tis_cap=1.2"], {"micro_batch_size": 2, "max_tokens_per_micro_batch": 40}, 1),
    (["algo.name=infonca"], {"micro_batch_size": 4}, 2),
    (["algo.name=nft"], {"micro_batch_size": 4, "tp": 2}, 2),  # one data-parallel rank: its shard broadcast over TP
    # InfoNCA whose groups do not fit a micro-batch: the split pre-pass, its autograd on rank 0
    (["algo.name=infonca"], {"micro_batch_size": 1}, 2),
    (["algo.name=infonca", "algo.agg=token_sum_norm"], {"micro_batch_size": 1, "max_tokens_per_micro_batch": 16}, 1),
]


def _step_rollout(prompts=6, k=2, seed=0):
    from megatron_nft.collect import Prompt, StepRollout
    from megatron_nft.rollout.base import Completion

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (prompts * k,), generator=g).tolist()
    return StepRollout(
        prompts=[Prompt(torch.randint(1, 96, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist(), "1")
                 for _ in range(prompts)],
        completions=[Completion(i // k, torch.randint(1, 96, (n,), generator=g).tolist(),
                                (-torch.rand(n, generator=g, dtype=torch.float64) * 0.2 - 4.4).tolist(), "stop", 0)
                     for i, n in enumerate(lengths)],
        rewards=[float(i % 3 == 0) for i in range(prompts * k)],
        metrics={"rollout/reward": 0.5},
    )


def _sharded_against_whole(rank, world_size):
    from megatron_nft import runtime
    from megatron_nft.actor import Actor
    from megatron_nft.config import load_config
    from megatron_nft.model.qwen2 import Qwen2Shape
    from megatron_nft.sharded_train import ahead_old_logprobs, share_rollout, train_on_shards
    from megatron_nft.trainer import rollout_batch, rollout_old_logprobs, train_on_rollout

    runtime.init_process_group()
    shape = Qwen2Shape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=64,
                       tie_word_embeddings=False)
    rollout = _step_rollout()
    out = []
    for algo, parallel, num_mb in SHARDED_CASES:
        cfg = load_config(None, [*algo, f"algo.num_minibatches={num_mb}", "rollout.samples_per_prompt=2",
                                 "optim.lr=1e-2", "optim.warmup_steps=0"])
        results = []
        for sharded in (False, True):
            actor = Actor(shape, optim=cfg.optim, algo=cfg.algo, seed=5, **parallel)
            if sharded:
                shared = share_rollout(actor, cfg, rollout if rank == 0 else None)
                metrics, _ = train_on_shards(actor, cfg, shared)
                rows = shared.shard.row_ids.tolist()
            else:
                metrics, _ = train_on_rollout(actor, cfg, rollout)
                rows = None
            weights = [p.detach().clone() for p in actor.model.parameters()]
            actor.close()
            results.append(({k: v for k, v in metrics.items() if not k.startswith("time/")}, weights, rows))
        (want, want_w, _), (got, got_w, rows) = results
        out.append({"want": want, "got": got, "rows": rows,
                    "same_weights": all(torch.equal(a, b) for a, b in zip(want_w, got_w))})
    # async mode: old log-probs scored ahead (gathered to rank 0, sent back with the rows) against the
    # whole-batch path's [B, S] ones, and a step trained on each
    cfg = load_config(None, ["algo.num_minibatches=2", "rollout.samples_per_prompt=2", "optim.lr=1e-2"])
    ahead = []
    for sharded in (False, True):
        actor = Actor(shape, optim=cfg.optim, algo=cfg.algo, seed=5, micro_batch_size=2)
        if sharded:
            old = ahead_old_logprobs(actor, cfg, rollout if rank == 0 else None)
            shared = share_rollout(actor, cfg, rollout if rank == 0 else None, old_logprobs=old)
            # a checkpoint written before this layout holds [B, S]: its rows get the same values
            legacy = share_rollout(actor, cfg, rollout if rank == 0 else None, old_logprobs=ahead[0][0] if rank == 0 else None)
            legacy_same = torch.equal(legacy.shard.old_logprobs, shared.shard.old_logprobs)
            metrics, _ = train_on_shards(actor, cfg, shared)
        else:
            old = rollout_old_logprobs(actor, cfg, rollout)
            metrics, _ = train_on_rollout(actor, cfg, rollout, old_logprobs=old)
        ahead.append((old, {k: v for k, v in metrics.items() if not k.startswith("time/")},
                      [p.detach().clone() for p in actor.model.parameters()]))
        actor.close()
    (whole_old, want, want_w), (flat_old, got, got_w) = ahead
    mask = rollout_batch(rollout, 2, rollout.rewards)["loss_mask"].bool()
    out.append({"old_gathered": torch.equal(flat_old, whole_old[mask]) if rank == 0 else flat_old is None,
                "want": want, "got": got, "same_weights": all(torch.equal(a, b) for a, b in zip(want_w, got_w)),
                "legacy_same": legacy_same})
    return out


def test_the_sharded_step_gives_the_whole_batch_step_s_numbers():
    """train_on_shards (each data-parallel rank its rows, the whole-batch figures from rank 0) against
    train_on_rollout (every rank the whole batch) on 2 ranks, DP=2 (and TP=2), from the same weights:
    every metric bit for bit, the same updated weights, each data-parallel rank trained on rows of its own;
    in async mode's form too (old log-probs scored ahead, gathered to rank 0, trained on later)."""
    results = run_distributed(_sharded_against_whole, 2, timeout_s=600)
    for rank, out in enumerate(results):
        *cases, ahead = out
        assert ahead["old_gathered"] and ahead["same_weights"] and ahead["legacy_same"], rank
        assert ahead["want"] == ahead["got"], rank
        for (algo, _, _), case in zip(SHARDED_CASES, cases):
            assert case["got"].keys() == case["want"].keys(), algo
            diff = {k: (v, case["got"][k]) for k, v in case["want"].items() if not _same(v, case["got"][k])}
            assert not diff, (rank, algo, diff)
            assert case["same_weights"], (rank, algo)
            if "algo.tis_cap=1.05" in algo:
                assert 0 < case["got"]["actor/tis_capped_frac"] < 1  # the cap bites on some tokens only
    for i, (_, parallel, _) in enumerate(SHARDED_CASES):
        held = [set(out[i]["rows"]) for out in results]
        if parallel.get("tp", 1) == 1:  # DP=2: each rank its own rows
            assert not held[0] & held[1] and held[0] | held[1] == set(range(12)), (i, held)
        else:  # TP=2: both ranks the whole batch
            assert held[0] == held[1] == set(range(12)), (i, held)


def _same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
