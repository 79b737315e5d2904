"""The baselines beyond the per-token losses: InfoNCA (iterative DPO) against its closed form and DPO,
GRPO's advantage with shaped rewards, DAPO's over-long shaping, and the config rules that make switching
algorithm one field and wrong combinations an error before any work starts."""

from __future__ import annotations

import pytest
import torch

from megatron_nft.algorithms import group_correct_rate, group_reward_std, infonca_targets, policy_loss
from megatron_nft.config import load_config
from megatron_nft.errors import ConfigError
from megatron_nft.reward import overlong_penalty, shape_overlong

T, V = 6, 11


def close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def sample(rewards: list[float], seed: int, *, spread: float = 0.4):
    """Leaf logits, the sampled tokens' log-probs, old log-probs off by random ratios, and a mask."""
    g = torch.Generator().manual_seed(seed)
    rows = len(rewards)
    logits = torch.randn(rows, T, V, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(V, (rows, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp.detach() - spread * (2 * torch.rand(rows, T, generator=g, dtype=torch.float64) - 1)
    mask = torch.rand(rows, T, generator=g) < 0.75
    mask[:, 0] = True
    r = torch.tensor(rewards, dtype=torch.float64)
    return logits, logp, old, r, mask


def infonca(logp, old, r, mask, k, **kw):
    return policy_loss("infonca", logp, old, r, group_correct_rate(r, k), mask, group_size=k, **kw)


# ---------------------------------------------------------------------------------------------------
# InfoNCA


def test_infonca_with_two_answers_is_dpo():
    """K = 2, one right and one wrong answer, hard targets, no SFT term: -log σ(β(Δ_w - Δ_l)) with the
    iteration's start policy as DPO's reference, value and gradient."""
    rewards = [1, 0, 0, 1, 1, 0]
    _, logp, old, r, mask = sample(rewards, 0)
    beta = 0.3
    loss, stats = infonca(logp, old, r, mask, 2, beta=beta, sft_coef=0.0, agg="group_mean")
    delta = ((logp - old) * mask).sum(dim=1).view(-1, 2)
    win = r.view(-1, 2).argmax(dim=1)
    d_w = delta.gather(1, win[:, None]).squeeze(1)
    d_l = delta.gather(1, (1 - win)[:, None]).squeeze(1)
    dpo = -torch.nn.functional.logsigmoid(beta * (d_w - d_l)).mean()
    close(loss, dpo)
    close(torch.autograd.grad(loss, logp, retain_graph=True)[0], torch.autograd.grad(dpo, logp)[0])
    assert stats["num_groups"].item() == 3


@pytest.mark.parametrize("on_policy", [True, False])
def test_infonca_per_token_gradient_closed_form(on_policy):
    """d loss / d log π(token t of answer k) = [β(softmax(βΔ)_k - p_k) - λ p_k / |y_k|] / G on valid tokens."""
    k, beta, lam, alpha = 4, 0.5, 0.3, 0.7
    rewards = [1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0]
    _, logp, old, r, mask = sample(rewards, 1)
    if on_policy:
        old = logp.detach().clone()
    loss, _ = infonca(logp, old, r, mask, k, beta=beta, sft_coef=lam, target_temperature=alpha, agg="group_mean")
    grad = torch.autograd.grad(loss, logp)[0]
    m = mask.double()
    delta = ((logp.detach() - old) * m).sum(dim=1).view(-1, k)
    p = torch.softmax(r.view(-1, k) / alpha, dim=-1)
    q = torch.softmax(beta * delta, dim=-1)
    length = m.sum(dim=1).view(-1, k)
    groups = len(rewards) // k
    coef = (beta * (q - p) - lam * p / length).reshape(-1, 1) / groups
    close(grad, coef * m)
    if on_policy:  # Δ = 0: the contrastive part pushes each answer by β(1/K - p_k)
        close(q, torch.full_like(q, 1 / k))


def test_infonca_targets_hard_and_soft():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(infonca_targets(r, 0.0), torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.25] * 4]))
    close(infonca_targets(r, 2.0), torch.softmax(r / 2.0, dim=-1))


def test_infonca_padding_groups_and_splits():
    """Groups with no valid token (the actor's padding) change nothing; token_sum_norm is additive over
    splits by whole groups, group_mean is the mean over groups."""
    k = 3
    rewards = [1, 0, 0, 0, 1, 1, 1, 0, 1]
    _, logp, old, r, mask = sample(rewards, 2)
    full, stats = infonca(logp, old, r, mask, k, agg="token_sum_norm", agg_norm=7.0)
    padded_mask = torch.cat([mask, torch.zeros(k, T, dtype=torch.bool)])
    pad = lambda t: torch.cat([t, torch.zeros(k, *t.shape[1:], dtype=t.dtype)])  # noqa: E731
    padded, padded_stats = infonca(pad(logp), pad(old), pad(r), padded_mask, k, agg="token_sum_norm", agg_norm=7.0)
    close(padded, full)
    assert padded_stats["num_groups"].item() == stats["num_groups"].item() == 3
    parts = [infonca(logp[s], old[s], r[s], mask[s], k, agg="token_sum_norm", agg_norm=7.0)[0] for s in (slice(0, 3), slice(3, 9))]
    close(sum(parts), full)
    mean, _ = infonca(logp, old, r, mask, k, agg="group_mean")
    close(mean, full * 7.0 / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": None}, "group_size"),
        ({"group_size": 1}, "group_size"),
        ({"group_size": 4}, "multiple of group_size"),
        ({"group_size": 3, "beta": 0.0}, "beta"),
        ({"group_size": 3, "agg": "token_mean"}, "token_mean"),
    ],
)
def test_infonca_bad_arguments(kwargs, match):
    _, logp, old, r, mask = sample([1, 0, 0, 1, 1, 0], 3)
    with pytest.raises(ValueError, match=match):
        policy_loss("infonca", logp, old, r, r, mask, **kwargs)
    with pytest.raises(ValueError, match="group_mean"):
        policy_loss("grpo", logp, old, r, r, mask, agg="group_mean")


# ---------------------------------------------------------------------------------------------------
# GRPO with shaped rewards, DAPO's over-long shaping


def test_grpo_advantage_uses_the_group_std_of_shaped_rewards():
    k = 4
    rewards = [1.0, -0.5, 0.0, 0.75, 1.0, 1.0, 0.0, 0.0]  # correctness plus over-long penalties
    _, logp, _, r, mask = sample(rewards, 4)
    rhat, std = group_correct_rate(r, k), group_reward_std(r, k)
    close(std, r.view(-1, k).std(dim=1, correction=0).repeat_interleave(k))
    loss, _ = policy_loss("grpo", logp, logp.detach(), r, rhat, mask, reward_std=std, agg="token_sum_norm", agg_norm=1.0)
    grad = torch.autograd.grad(loss, logp)[0]
    adv = (r - rhat) / (std + 1e-6)
    close(grad, -adv[:, None] * mask.double())  # on-policy: R = 1, d(-R·A)/d log π = -A
    binary = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1], dtype=torch.float64)
    close(group_reward_std(binary, k), (group_correct_rate(binary, k) * (1 - group_correct_rate(binary, k))).sqrt())


def test_overlong_penalty_piecewise():
    # budget 20, buffer 5: free up to 15 tokens, then linear to -factor at 20
    values = [overlong_penalty(n, max_len=20, buffer=5, factor=2.0) for n in (0, 15, 16, 18, 20, 25)]
    assert values == [0.0, 0.0, -0.4, -1.2, -2.0, -2.0]
    assert overlong_penalty(20, max_len=20, buffer=0) == 0.0
    assert shape_overlong([1.0, 0.0, 1.0], [3, 20, 17], max_len=20, buffer=5) == [1.0, -1.0, 1.0 - 0.4]
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(3, max_len=4, buffer=5)


# ---------------------------------------------------------------------------------------------------
# config: one field switches algorithm; wrong combinations fail at load


DEMO = "recipes/demo.yaml"


@pytest.mark.parametrize(
    "name, agg, dynamic, buffer",
    [
        ("nft", "token_sum_norm", True, 0),
        ("rft", "token_sum_norm", False, 0),
        ("grpo", "token_sum_norm", False, 0),
        ("dr_grpo", "token_sum_norm", False, 0),
        ("dapo", "token_mean", True, 1),  # a fifth of the demo's 8-token budget
        ("infonca", "group_mean", True, 0),
    ],
)
def test_switching_algorithm_is_one_field(name, agg, dynamic, buffer):
    cfg = load_config(DEMO, [f"algo.name={name}"])
    assert (cfg.algo.name, cfg.algo.agg, cfg.algo.dynamic_sampling, cfg.reward.overlong_buffer) == (name, agg, dynamic, buffer)
    explicit = load_config(DEMO, [f"algo.name={name}", "algo.dynamic_sampling=true"])
    assert explicit.algo.dynamic_sampling is True


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["algo.name=infonca", "rollout.samples_per_prompt=1"], ["infonca", "samples_per_prompt=1"]),
        (["algo.name=infonca", "algo.agg=token_mean"], ["infonca", "token_mean"]),
        (["algo.name=grpo", "algo.agg=group_mean"], ["group_mean", "infonca"]),
        (["algo.name=nft", "reward.overlong_buffer=2"], ["overlong_buffer=2", "nft"]),
        (["algo.name=dapo", "reward.overlong_buffer=8"], ["overlong_buffer=8", "max_new_tokens=8"]),
        (["algo.name=infonca", "algo.beta=0"], ["algo.beta"]),
    ],
)
def test_wrong_combinations_are_config_errors(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_wrong_combination_stops_the_demo_before_any_work(capsys, tmp_path):
    from megatron_nft.cli import main

    run_dir = tmp_path / "run"
    code = main(["demo", f"run.dir={run_dir}", "algo.name=infonca", "rollout.samples_per_prompt=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "infonca" in err[0]
    assert not run_dir.exists()
