"""The Megatron actor at TP=1/DP=2, TP=2 and PP=2 on two gloo ranks, against transformers' own forward.

One spawn of two processes runs every layout (process start-up dominates the cost). For each layout
and for a tied and an untied model: per-token log-probs equal HF's within 1e-5, the first-step loss
equals policy_loss evaluated on HF's log-probs, the gradient norm is the same in every layout, and so
are the log-probs after the optimizer step (the update itself is layout-invariant).
"""

from __future__ import annotations

import pytest
import torch

from helpers import hf_token_logprobs, random_qwen2
from megatron_nft.testing import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) on 2 ranks: DP=2, TP=2, PP=2


def make_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows, seq = 6, 10
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    prompt_len = torch.tensor([3, 4, 3, 5, 4, 3])
    length = torch.tensor([10, 8, 9, 10, 7, 6])
    t = torch.arange(seq)
    # label position t scores token t+1: a response token iff prompt_len <= t+1 < length
    loss_mask = ((t[None] + 1 >= prompt_len[:, None]) & (t[None] + 1 < length[:, None])).float()
    tokens = torch.where(t[None] < length[:, None], tokens, torch.zeros_like(tokens))
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    correct_rate = torch.tensor([0.5, 0.5, 0.5, 0.5, 1 / 3, 1 / 3])
    return {"tokens": tokens, "loss_mask": loss_mask, "rewards": rewards, "correct_rate": correct_rate}


def _worker(rank, world_size, models, batch):
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import shape_from_hf

    results = {}
    for label, (config, state) in models.items():
        shape = shape_from_hf(config)
        for tp, pp in LAYOUTS:
            actor = Actor(
                shape,
                tp=tp,
                pp=pp,
                micro_batch_size=2,
                optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0),
                algo=AlgoConfig(name="nft", agg="token_mean"),
            )
            actor.load_hf(lambda n: state[n])
            # only rank 0 reads the stream: the other rank's part of the gather is done within the call
            tensors = actor.hf_tensors()
            exported = dict(tensors) if rank == 0 else list(tensors)
            assert rank == 0 or exported == []
            logprobs, entropy = actor.compute_logprobs({"tokens": batch["tokens"]})
            metrics = actor.train_step(batch)
            after, _ = actor.compute_logprobs({"tokens": batch["tokens"]})
            results[(label, tp, pp)] = {
                "logprobs": logprobs,
                "entropy": entropy,
                "loss": metrics["loss"],
                "grad_norm": metrics["grad_norm"],
                "after": after,
                "exported": exported if rank == 0 else None,
            }
            actor.close()
    # InfoNCA contrasts whole groups (K = 2 here): micro-batches of 2 rows hold whole groups on each
    # DP rank; micro-batches of 1 row split every group (the step's forward pre-pass path)
    label, (config, state) = next(iter(models.items()))
    for name, rows in (("infonca", 2), ("infonca_split", 1)):
        actor = Actor(
            shape_from_hf(config),
            micro_batch_size=rows,
            optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0),
            algo=AlgoConfig(name="infonca", beta=0.5, sft_coef=0.2),
        )
        actor.load_hf(lambda n: state[n])
        metrics = actor.train_step(batch, group_size=2)
        after, _ = actor.compute_logprobs(batch)
        results[(label, name)] = {**metrics, "after": after}
        actor.close()
    return results


@pytest.fixture(scope="module")
def parallel_results():
    models, refs = {}, {}
    for label, tied in (("untied", False), ("tied", True)):
        config, model = random_qwen2(tied=tied, seed=1 if tied else 0)
        models[label] = (config, {k: v.clone() for k, v in model.state_dict().items()})
        refs[label] = model
    batch = make_batch(config.vocab_size)
    ref_lp = {label: hf_token_logprobs(m, batch["tokens"]) for label, m in refs.items()}
    # old log-probs a little off the current policy, so that the first loss is not trivially zero
    noise = torch.randn(batch["tokens"].shape, generator=torch.Generator().manual_seed(3)) * 0.2
    batches = {label: {**batch, "old_logprobs": ref_lp[label] + noise} for label in models}
    # one spawn per model keeps batches exact; both models share the processes' start-up cost
    out = {}
    for label in models:
        out.update(run_distributed(_worker, 2, {label: models[label]}, batches[label])[0])
    return out, ref_lp, batches, models


@pytest.mark.parametrize("label", ["untied", "tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logprobs_match_transformers(parallel_results, label, tp, pp):
    out, ref_lp, batches, _ = parallel_results
    mask = batches[label]["loss_mask"].bool()
    got = out[(label, tp, pp)]["logprobs"]
    assert torch.allclose(got[mask], ref_lp[label][mask], atol=1e-5), (got - ref_lp[label]).abs().max()


@pytest.mark.parametrize("label", ["untied", "tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_first_step_loss_and_update_are_layout_invariant(parallel_results, label, tp, pp):
    from megatron_nft.algorithms import policy_loss

    out, ref_lp, batches, _ = parallel_results
    b = batches[label]
    expected, _ = policy_loss(
        "nft", ref_lp[label], b["old_logprobs"], b["rewards"], b["correct_rate"], b["loss_mask"], agg="token_mean"
    )
    got = out[(label, tp, pp)]
    assert abs(expected.item()) > 1e-3  # the comparison below is not between zeros
    assert got["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    base = out[(label, 1, 1)]
    assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
    mask = b["loss_mask"].bool()
    assert torch.allclose(got["after"][mask], base["after"][mask], atol=1e-4)
    # the step moved the policy
    assert (got["after"][mask] - got["logprobs"][mask]).abs().max() > 1e-3


@pytest.mark.parametrize("label", ["untied", "tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_hf_megatron_hf_round_trip_is_bit_exact(parallel_results, label, tp, pp):
    # HF -> Megatron shards on each rank -> TP all-gather / PP transfer -> HF names: the same bits.
    from megatron_nft.model.mapping import hf_names
    from megatron_nft.model.qwen2 import shape_from_hf

    out, _, _, models = parallel_results
    config, state = models[label]
    got = out[(label, tp, pp)]["exported"]
    # transformers lists lm_head.weight even when it is the tied embedding; it is exported once
    assert set(got) == set(hf_names(shape_from_hf(config)))
    for name, tensor in got.items():
        assert torch.equal(tensor, state[name]), name


def test_infonca_step_on_data_parallel_ranks_matches_policy_loss(parallel_results):
    from megatron_nft.algorithms import group_correct_rate, policy_loss

    out, ref_lp, batches, _ = parallel_results
    b = batches["untied"]
    expected, _ = policy_loss(
        "infonca", ref_lp["untied"], b["old_logprobs"], b["rewards"], group_correct_rate(b["rewards"], 2),
        b["loss_mask"], group_size=2, beta=0.5, sft_coef=0.2, agg="group_mean",
    )
    assert abs(expected.item()) > 1e-3
    assert out[("untied", "infonca")]["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    # groups split over micro-batches: the same loss, gradient and update
    whole, split = out[("untied", "infonca")], out[("untied", "infonca_split")]
    assert split["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    assert torch.allclose(split["after"], whole["after"], atol=1e-6)
    mask = b["loss_mask"].bool()
    assert (whole["after"][mask] - ref_lp["untied"][mask]).abs().max() > 1e-3  # the step moved the policy
