"""The baselines beyond the per-token losses: InfoNCA (iterative DPO) against its closed form and DPO,
GRPO's advantage with shaped rewards, DAPO's over-long shaping, and the config rules that make switching
algorithm one field and wrong combinations an error before any work starts."""

from __future__ import annotations

import math

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
        policy_loss("grpo", logp, old, r, r, mask, agg="group_mean", group_size=2)


# ---------------------------------------------------------------------------------------------------
# GRPO with shaped rewards, DAPO's over-long shaping


def test_grpo_advantage_uses_the_group_std_of_shaped_rewards():
    k = 4
    rewards = [1.0, -0.5, 0.0, 0.75, 1.0, 1.0, 0.0, 0.0]  # correctness plus over-long penalties
    _, logp, _, r, mask = sample(rewards, 4)
    rhat, std = group_correct_rate(r, k), group_reward_std(r, k)
    close(std, r.view(-1, k).std(dim=1, correction=0).repeat_interleave(k))
    for adv_std, correction in (("unbiased", 1), ("population", 0)):
        loss, _ = policy_loss("grpo", logp, logp.detach(), r, rhat, mask, reward_std=std, agg="token_sum_norm",
                              agg_norm=1.0, group_size=k, adv_std=adv_std)
        grad = torch.autograd.grad(loss, logp)[0]
        groups = r.view(-1, k)
        adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True, correction=correction) + 1e-6)
        close(grad, -adv.reshape(-1, 1) * mask.double())  # on-policy: R = 1, d(-R·A)/d log π = -A
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
        ("nft_seq", "token_sum_norm", True, 0),
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


# ---------------------------------------------------------------------------------------------------
# Fidelity to the references (docs/fidelity.md, one test per row). Each reference formula is written
# here from the reference's definition, independently of megatron_nft.algorithms:
#   official NFT: NVlabs/NFT dp_actor.py (the NFT / RFT loss) and ray_nft_trainer.py (r̂, advantages);
#   verl: compute_grpo_outcome_advantage, compute_policy_loss (the commit NFT pins, 01ef718).


def verl_grpo_advantage(scores: torch.Tensor, k: int, *, norm_by_std: bool = True) -> torch.Tensor:
    """verl's group advantage, group by group: a single answer has mean 0 and std 1; else torch.std."""
    out = torch.empty_like(scores)
    for g in range(0, len(scores), k):
        group = scores[g:g + k]
        single = (torch.tensor(0.0, dtype=scores.dtype), torch.tensor(1.0, dtype=scores.dtype))
        mean, std = single if k == 1 else (group.mean(), torch.std(group))
        out[g:g + k] = (group - mean) / (std + 1e-6) if norm_by_std else group - mean
    return out


def official_nft_loss(logp, old, r, rhat, mask, *, eps=1.0, normalize=1, neg_weight=1.0):
    """The official NFT loss of one micro-batch (ratio_type=token, clamp_positive=0): sum / 1000."""
    ratio = torch.exp((logp - old).clamp(max=10.0))
    rate = rhat.clamp(0.02, 0.98)[:, None]

    def floor(x, low):  # the official clamp_preserve_grad: clamped value, the unclamped gradient
        return x + (x.clamp(min=low) - x).detach()

    negative = -torch.log(floor((1.0 - rate * ratio) / (1.0 - rate), eps))
    positive = -torch.log(floor(ratio, 0.0))
    correct = r[:, None]
    losses = negative * (1.0 - correct) * neg_weight + correct * positive
    weight = {0: torch.ones_like(rate), 1: 1.0 - rate, 2: ((1.0 - rate) / rate) ** 0.5}[normalize]
    return ((losses * weight) * mask).sum() / 1000.0


def mixed_groups(k: int, positives: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.zeros(k * len(positives), dtype=torch.float64)
    for i, n in enumerate(positives):
        r[i * k + torch.randperm(k, generator=g)[:n]] = 1.0
    return r


@pytest.mark.parametrize("k, positives", [(4, [1, 2, 3]), (64, [1, 13, 63])])  # K = 64: r̂ = 1/64 < 0.02 clamps
@pytest.mark.parametrize("normalize, prompt_weight", [(0, "uniform"), (1, "one_minus_r"), (2, "grpo")])
@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_nft_loss_and_gradient_equal_the_official_code(k, positives, normalize, prompt_weight, eps):
    """Defaults (log R capped at 10, r̂ clamped to [0.02, 0.98]) against the official formula, with
    ratios past the cap and groups of 64 answers; turning either off departs from it."""
    r = mixed_groups(k, positives, seed=k)
    g = torch.Generator().manual_seed(1)
    rows = len(r)
    logp = torch.log(torch.rand(rows, T, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    log_ratio = 13.0 * torch.rand(rows, T, generator=g, dtype=torch.float64) - 2.0  # up to 11: some past 10
    old = logp.detach() - log_ratio
    mask = torch.rand(rows, T, generator=g) < 0.8
    rhat = group_correct_rate(r, k)
    want = official_nft_loss(logp, old, r, rhat, mask.double(), eps=eps, normalize=normalize)
    want_g = torch.autograd.grad(want, logp)[0]
    loss, _ = policy_loss("nft", logp, old, r, rhat, mask, prompt_weight=prompt_weight, neg_clip=eps)
    close(loss, want, rtol=1e-9, atol=1e-12)
    close(torch.autograd.grad(loss, logp)[0], want_g, rtol=1e-9, atol=1e-12)
    assert (mask & (log_ratio > 10)).any()
    loose, _ = policy_loss("nft", logp, old, r, rhat, mask, prompt_weight=prompt_weight, neg_clip=eps, max_log_ratio=None)
    assert not torch.allclose(torch.autograd.grad(loose, logp)[0], want_g)
    if k == 64:  # r̂ = 1/64 and 63/64 are clamped; without the clamp the loss departs
        unclamped, _ = policy_loss("nft", logp, old, r, rhat, mask, prompt_weight=prompt_weight, neg_clip=eps, rhat_clamp=0.0)
        assert not torch.allclose(unclamped, want)


def test_log_ratio_cap_at_the_boundary_and_the_issue_numbers():
    """One negative token, r̂ = 0.5, ω = 1 - r̂, sum / 1000: the straight-through gradient
    d loss / d log π = ω r̂ R / ((1 - r̂) max(x, ε)) / 1000 stops at log R = 10 (the official cap)."""
    r, rhat, mask = torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)

    def grad(log_ratio, eps, **kw):
        logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
        loss, _ = policy_loss("nft", logp, logp.detach() - log_ratio, r, rhat, mask, neg_clip=eps, **kw)
        return torch.autograd.grad(loss, logp)[0].item()

    for eps in (1.0, 0.1):
        below = 10.0 - 1e-6
        assert grad(below, eps) == pytest.approx(0.5 * math.exp(below) / eps / 1000, rel=1e-9)
        assert grad(10.0, eps) == 0.0  # torch.clamp(max=10), as the official code, passes none at the cap itself
        assert grad(10.0 + 1e-6, eps) == 0.0
        assert grad(12.0, eps) == 0.0
    # uncapped, log R = 12: the issue's 81 (ε = 1) and 814 (ε = 0.1)
    assert grad(12.0, 1.0, max_log_ratio=None) == pytest.approx(0.5 * math.exp(12) / 1000, rel=1e-9)
    assert round(grad(12.0, 1.0, max_log_ratio=None)) == 81 and round(grad(12.0, 0.1, max_log_ratio=None)) == 814
    # positive tokens: -log min(R, e^10), no gradient beyond either
    rp = torch.tensor([1.0], dtype=torch.float64)
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss("nft", logp, logp.detach() - 12.0, rp, rhat, mask)
    assert torch.autograd.grad(loss, logp)[0].item() == 0.0 and loss.item() == pytest.approx(-0.5 * 10 / 1000)


def test_rhat_clamp_at_k64_and_all_same_groups_unchanged():
    """K = 64, one right answer: the official r̂ is max(1/64, 0.02) = 0.02 in ω and in (1 - r̂R)/(1 - r̂)."""
    from megatron_nft.algorithms import clamp_correct_rate

    rhat = torch.tensor([0.0, 1 / 64, 0.5, 63 / 64, 1.0], dtype=torch.float64)
    close(clamp_correct_rate(rhat, 0.02), torch.tensor([0.0, 0.02, 0.5, 0.98, 1.0], dtype=torch.float64))
    close(clamp_correct_rate(rhat, 0.0), rhat)
    r = mixed_groups(64, [1], seed=2)
    rh = group_correct_rate(r, 64)
    logp = torch.zeros(64, 1, dtype=torch.float64, requires_grad=True)
    log_ratio = torch.linspace(-1, 2, 64, dtype=torch.float64)[:, None]
    mask = torch.ones(64, 1, dtype=torch.bool)
    loss, _ = policy_loss("nft", logp, logp.detach() - log_ratio, r, rh, mask)
    R, c = torch.exp(log_ratio), 0.02
    x = (1 - c * R) / (1 - c)  # x < 1 = ε for R > 1: floored there, straight-through gradient
    per = (1 - c) * torch.where(r[:, None] > 0.5, -log_ratio, -torch.log(x.clamp(min=1.0)))
    close(loss, per.sum() / 1000)
    want_g = (1 - c) * torch.where(r[:, None] > 0.5, -torch.ones_like(R), c * R / ((1 - c) * x.clamp(min=1.0))) / 1000
    close(torch.autograd.grad(loss, logp)[0], want_g)
    # all-right / all-wrong groups (which the official code never sees) keep r̂ = 1 / 0: RFT's ω = 1 - r̂ = 0
    ones = torch.ones(4, dtype=torch.float64)
    lp = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss("rft", lp, lp.detach() - 0.3, ones, ones, torch.ones(4, 1, dtype=torch.bool), prompt_weight="one_minus_r")
    assert loss.item() == 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "dr_grpo"])
def test_grpo_family_advantage_equals_verl(k, algorithm):
    """verl's compute_grpo_outcome_advantage (torch.std, K - 1; K = 1: mean 0, std 1) is the default;
    the population std is the option. At K = 8 the population advantage is sqrt(8/7) = 6.9% larger."""
    from megatron_nft.algorithms import advantages, group_reward_std

    g = torch.Generator().manual_seed(k)
    scores = (torch.rand(6 * k, generator=g, dtype=torch.float64) < 0.5).double()
    scores[:k] = 1.0  # one all-right group
    scores = scores - 0.25 * (torch.rand(6 * k, generator=g, dtype=torch.float64) < 0.2).double()  # over-long penalties
    rhat, std = group_correct_rate(scores, k), group_reward_std(scores, k)
    want = verl_grpo_advantage(scores, k, norm_by_std=algorithm != "dr_grpo")
    close(advantages(algorithm, scores, rhat, std, group_size=k), want, rtol=1e-9, atol=1e-12)
    population = advantages(algorithm, scores, rhat, std, std="population", group_size=k)
    if k > 1 and algorithm != "dr_grpo":
        live = std > 0
        close(population[live] / want[live], torch.full_like(want[live], (k / (k - 1)) ** 0.5), rtol=1e-5, atol=0)
    if algorithm != "dr_grpo":  # Bessel's correction needs K
        with pytest.raises(ValueError, match="group_size"):
            advantages(algorithm, scores, rhat, std)


def official_nft_seq_loss(logp, old, r, rhat, mask, *, eps=1.0, normalize=1):
    """The official NFT loss with ratio_type=sequence (neg_weight=1, clamp_positive=0) of one micro-batch:
    R = exp(min(Σ_t mask·log R_t, 10)) per answer, the answers' losses summed, no divisor. ω per answer:
    the official line multiplies the [B] losses by its [B, T]-tiled 1 - r̂, which broadcasts only when
    B == T (docs/fidelity.md); this is the per-answer weight it means."""
    ratio = torch.exp(((logp - old) * mask).sum(dim=-1).clamp(max=10.0))
    rate = rhat.clamp(0.02, 0.98)

    def floor(x, low):  # the official clamp_preserve_grad
        return x + (x.clamp(min=low) - x).detach()

    negative = -torch.log(floor((1.0 - rate * ratio) / (1.0 - rate), eps))
    positive = -torch.log(floor(ratio, 0.0))
    losses = negative * (1.0 - r) + r * positive
    weight = {0: torch.ones_like(rate), 1: 1.0 - rate, 2: ((1.0 - rate) / rate) ** 0.5}[normalize]
    return (losses * weight).sum()


def seq_batch(k, positives, seed):
    """Answers whose summed log-ratio spans -3..+18: some past the cap of 10, negatives past the ε floor."""
    r = mixed_groups(k, positives, seed=seed)
    g = torch.Generator().manual_seed(seed)
    rows = len(r)
    logp = torch.log(torch.rand(rows, T, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    log_ratio = 3.5 * torch.rand(rows, T, generator=g, dtype=torch.float64) - 0.5
    log_ratio[: rows // 2] -= 1.0  # and some below 1
    mask = torch.rand(rows, T, generator=g) < 0.8
    mask[:, 0] = True
    return logp, logp.detach() - log_ratio, r, group_correct_rate(r, k), mask, (log_ratio * mask).sum(dim=1)


@pytest.mark.parametrize("k, positives", [(4, [1, 2, 3]), (64, [1, 13, 63])])  # K = 64: r̂ = 1/64 < 0.02 clamps
@pytest.mark.parametrize("normalize, prompt_weight", [(0, "uniform"), (1, "one_minus_r"), (2, "grpo")])
@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_nft_seq_loss_and_gradient_equal_the_official_sequence_ratio(k, positives, normalize, prompt_weight, eps):
    logp, old, r, rhat, mask, delta = seq_batch(k, positives, seed=k + 1)
    want = official_nft_seq_loss(logp, old, r, rhat, mask.double(), eps=eps, normalize=normalize)
    want_g = torch.autograd.grad(want, logp)[0]
    loss, stats = policy_loss("nft_seq", logp, old, r, rhat, mask, prompt_weight=prompt_weight, neg_clip=eps, agg_norm=1.0)
    close(loss, want, rtol=1e-9, atol=1e-12)
    close(torch.autograd.grad(loss, logp)[0], want_g, rtol=1e-9, atol=1e-12)
    assert (delta > 10).any() and (delta < 1).any()
    assert stats["neg_floor_tokens"].item() > 0  # some negatives sit at the floor
    token, _ = policy_loss("nft", logp, old, r, rhat, mask, prompt_weight=prompt_weight, neg_clip=eps, agg_norm=1.0)
    assert not torch.allclose(token, loss)  # off-policy, one ratio per answer is another loss


def test_nft_seq_per_token_gradient_closed_form():
    """dL/d log π_t = m_t·(-ω)[r - (1-r)·r̂R / ((1-r̂)·max(x, ε))] / agg_norm with x = (1 - r̂R)/(1 - r̂)
    and R = exp(Σ_t m_t log R_t) (straight-through floor: the gradient is scaled, never zeroed); 0 for
    answers past the cap."""
    logp, old, r, rhat, mask, delta = seq_batch(4, [1, 2, 3, 2], seed=7)
    eps, norm = 0.3, 50.0
    loss, _ = policy_loss("nft_seq", logp, old, r, rhat, mask, prompt_weight="one_minus_r", neg_clip=eps, agg_norm=norm)
    grad = torch.autograd.grad(loss, logp)[0]
    R = torch.exp(delta)
    x = (1 - rhat * R) / (1 - rhat)
    per_answer = -(1 - rhat) * (r - (1 - r) * rhat * R / ((1 - rhat) * torch.clamp(x, min=eps))) / norm
    per_answer = torch.where(delta < 10, per_answer, 0.0)
    close(grad, per_answer[:, None] * mask.double())
    assert ((r == 0) & (x < eps) & (delta < 10)).any() and ((r == 0) & (x > eps)).any()


def test_nft_seq_on_policy_is_zero_with_the_token_level_gradient():
    logp, _, r, rhat, mask, _ = seq_batch(4, [1, 2, 3], seed=3)
    seq, _ = policy_loss("nft_seq", logp, logp.detach(), r, rhat, mask)
    token, _ = policy_loss("nft", logp, logp.detach(), r, rhat, mask)
    assert seq.item() == 0.0
    close(torch.autograd.grad(seq, logp)[0], torch.autograd.grad(token, logp)[0])


def test_nft_seq_is_one_module_and_one_recipe_fragment():
    """Everything the trainer needs about nft_seq comes from its module: defaults, and the combinations
    it refuses (a per-answer loss takes no token weights, no token mean, no group mean, no shaped rewards)."""
    import megatron_nft.algorithms.nft_seq as module
    from megatron_nft.algorithms import algorithm

    assert algorithm("nft_seq") is module.ALGORITHM and algorithm("nft_seq").sequence_level
    cfg = load_config(DEMO, ["algo.name=nft_seq"])
    assert (cfg.algo.agg, cfg.algo.dynamic_sampling, cfg.algo.prompt_weight, cfg.reward.overlong_buffer) == (
        "token_sum_norm", True, "one_minus_r", 0)
    fragment = load_config("recipes/algo/nft_seq.yaml")
    assert (fragment.algo.name, fragment.algo.agg_norm, fragment.algo.eps, fragment.algo.max_log_ratio) == ("nft_seq", 1.0, 1.0, 10.0)
    for override, words in [("algo.agg=token_mean", ["token_mean", "nft_seq"]), ("algo.agg=group_mean", ["group_mean", "infonca"]),
                            ("algo.tis_cap=2", ["tis_cap", "nft_seq"]), ("reward.overlong_buffer=2", ["overlong_buffer=2", "nft_seq"])]:
        with pytest.raises(ConfigError) as err:
            load_config(DEMO, ["algo.name=nft_seq", override])
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_official_rft_is_nft_without_negatives_and_the_recipes_use_it():
    """The official RFT: neg_weight 0 with normalize=1 (ω = 1 - r̂, clamped) and the cap; the recipes
    recipes/algo/rft.yaml and recipes/paper/*-rft.yaml run it with dynamic sampling, as its scripts do."""
    r = mixed_groups(4, [1, 2, 3], seed=5)
    rhat = group_correct_rate(r, 4)
    g = torch.Generator().manual_seed(6)
    logp = torch.log(torch.rand(12, T, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    old = logp.detach() - (12.0 * torch.rand(12, T, generator=g, dtype=torch.float64) - 1.0)
    mask = torch.rand(12, T, generator=g) < 0.8
    want = official_nft_loss(logp, old, r, rhat, mask.double(), neg_weight=0.0, normalize=1)
    loss, _ = policy_loss("rft", logp, old, r, rhat, mask, prompt_weight="one_minus_r")
    close(loss, want)
    close(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(want, logp)[0])
    for recipe in ("recipes/algo/rft.yaml", "recipes/paper/qwen2.5-math-7b-rft.yaml", "recipes/paper/qwen2.5-32b-rft.yaml"):
        cfg = load_config(recipe, [])
        assert (cfg.algo.prompt_weight, cfg.algo.dynamic_sampling) == ("one_minus_r", True), recipe
    from megatron_nft.config import AlgoConfig

    assert AlgoConfig(name="rft").resolved().prompt_weight == "uniform"  # the paper's RFT (ω = 1) stays its default
    assert AlgoConfig(name="nft").resolved().prompt_weight == "one_minus_r"


def test_official_dp_gradient_average_is_reference_dp_world():
    """The official FSDP trainer: each of W ranks sums its micro-batch losses (Σ / 1000 each) and the
    gradients are averaged over ranks, so its gradient is that of Σ / (1000 W): agg_norm x
    reference_dp_world, which the paper recipes set to their official data-parallel worlds."""
    w = 4
    r = mixed_groups(4, [1, 2, 3, 1, 2, 3, 2, 2], seed=7)
    rhat = group_correct_rate(r, 4)
    g = torch.Generator().manual_seed(8)
    logp = torch.log(torch.rand(32, T, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    old = logp.detach() - 0.5 * torch.randn(32, T, generator=g, dtype=torch.float64)
    mask = torch.rand(32, T, generator=g) < 0.8
    rank_grads = []
    for rank in range(w):
        rows = slice(rank * 8, (rank + 1) * 8)
        micro = [slice(rows.start + i, rows.start + i + 2) for i in range(0, 8, 2)]
        loss = sum(official_nft_loss(logp[s], old[s], r[s], rhat[s], mask[s].double()) for s in micro)
        rank_grads.append(torch.autograd.grad(loss, logp)[0])
    official = sum(rank_grads) / w
    ours, _ = policy_loss("nft", logp, old, r, rhat, mask, agg_norm=1000.0 * w)
    close(torch.autograd.grad(ours, logp)[0], official)
    for recipe, world in (("qwen2.5-math-7b", 32), ("qwen2.5-32b", 16)):
        for algo in ("nft", "rft", "grpo", "dr_grpo"):
            assert load_config(f"recipes/paper/{recipe}-{algo}.yaml", []).algo.reference_dp_world == world
        for algo in ("dapo", "infonca"):
            assert load_config(f"recipes/paper/{recipe}-{algo}.yaml", []).algo.reference_dp_world == 1
    with pytest.raises(ConfigError, match="reference_dp_world"):
        load_config(DEMO, ["algo.name=dapo", "algo.reference_dp_world=8"])


def test_dapo_token_mean_is_the_official_with_one_micro_batch():
    """The official DAPO (verl compute_policy_loss, use_token_level_loss) takes a token mean per
    micro-batch and adds the micro-batch means; the project takes the minibatch token mean (DAPO's
    definition). Per-token losses agree: with one micro-batch the two are equal; with M equal micro-
    batches the official is M times the mean."""
    k = 4
    r = mixed_groups(k, [1, 2, 3, 2], seed=9)
    rhat = group_correct_rate(r, k)
    g = torch.Generator().manual_seed(10)
    logp = torch.log(torch.rand(16, T, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    old = logp.detach() - 0.4 * torch.randn(16, T, generator=g, dtype=torch.float64)
    mask = torch.ones(16, T, dtype=torch.bool)  # equal token counts per micro-batch

    def official(s):
        ratio = torch.exp(logp[s] - old[s])
        adv = verl_grpo_advantage(r, k)[s][:, None]
        losses = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 0.2, 1 + 0.28))
        return losses.mean()

    ours, _ = policy_loss("dapo", logp, old, r, rhat, mask, agg="token_mean", group_size=k)
    close(ours, official(slice(0, 16)))
    split = sum(official(slice(i, i + 4)) for i in range(0, 16, 4))
    close(split, 4 * ours)


def test_dapo_overlong_penalty_in_the_official_reward_units():
    """The official DAPO reward is ±1 plus the over-long penalty; the project's is {0, 1} plus it. The
    advantage is invariant to r -> 2r - 1 once the penalty is halved: reward.overlong_penalty = 0.5
    reproduces the official factor 1.0 (the 32B recipe, with its 4096-token buffer; its 7B script has
    none)."""
    k = 8
    right = mixed_groups(k, [3, 5], seed=11)
    lengths = [100, 520, 900, 1024, 300, 700, 1000, 10, 50, 1024, 800, 600, 650, 1, 2, 1000]
    official = torch.tensor(shape_overlong((2 * right - 1).tolist(), lengths, max_len=1024, buffer=512, factor=1.0))
    ours = torch.tensor(shape_overlong(right.tolist(), lengths, max_len=1024, buffer=512, factor=0.5), dtype=torch.float64)
    close(verl_grpo_advantage(ours, k), verl_grpo_advantage(official.double(), k), rtol=1e-5, atol=1e-6)
    c32 = load_config("recipes/paper/qwen2.5-32b-dapo.yaml", [])
    assert (c32.reward.overlong_buffer, c32.reward.overlong_penalty) == (4096, 0.5)
    assert load_config("recipes/paper/qwen2.5-math-7b-dapo.yaml", []).reward.overlong_buffer == 0


@pytest.mark.parametrize(
    "override, word",
    [("algo.adv_std=sample", "adv_std"), ("algo.max_log_ratio=0", "max_log_ratio"), ("algo.rhat_clamp=0.5", "rhat_clamp"),
     ("algo.reference_dp_world=0", "reference_dp_world"), ("algo.prompt_weight=half", "prompt_weight")],
)
def test_fidelity_options_bad_values_are_one_line_errors(override, word):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert "\n" not in str(err.value) and word in str(err.value)


def test_actor_passes_the_fidelity_options_to_the_loss():
    """The actor's train step on one tiny model: reference_dp_world divides the gradient, adv_std scales
    GRPO's by sqrt((K-1)/K), max_log_ratio zeroes the gradient of tokens past the cap. The learning rate
    is 0 for the first of 10 warm-up steps and tiny after, so every step sees the same weights."""
    import dataclasses

    from helpers import random_qwen2
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import shape_from_hf

    config, model = random_qwen2()
    state = model.state_dict()
    actor = Actor(shape_from_hf(config), micro_batch_size=4, optim=OptimConfig(lr=1e-12, warmup_steps=10),
                  algo=AlgoConfig(name="grpo"), total_steps=20)
    actor.load_hf(lambda n: state[n])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, 8), generator=g)
    mask = torch.zeros(4, 8)
    mask[:, 2:7] = 1
    rewards = torch.tensor([1.0, 0, 1, 0])
    batch = {"tokens": tokens, "loss_mask": mask, "rewards": rewards, "correct_rate": torch.full((4,), 0.5)}
    old, _ = actor.compute_logprobs({"tokens": tokens})

    def grad_norm(algo, old_logprobs):
        actor.algo = algo
        return actor.train_step({**batch, "old_logprobs": old_logprobs}, group_size=4)["grad_norm"]

    grpo = AlgoConfig(name="grpo", agg="token_sum_norm")
    sample = grad_norm(grpo, old)
    population = grad_norm(dataclasses.replace(grpo, adv_std="population"), old)
    assert sample == pytest.approx(population * math.sqrt(3 / 4), rel=1e-4)
    assert grad_norm(dataclasses.replace(grpo, reference_dp_world=8), old) == pytest.approx(sample / 8, rel=1e-4)
    nft = AlgoConfig(name="nft", agg="token_sum_norm")
    far = old - 11.0  # log R = 11 on every token: past the official cap
    assert grad_norm(nft, far) == 0.0
    assert grad_norm(dataclasses.replace(nft, max_log_ratio=None), far) > 0.0
    # the loss the step reports is the configured algorithm's on the minibatch (nft_seq: one ratio per answer)
    current, _ = actor.compute_logprobs({"tokens": tokens})
    shifted = old + 0.2 * torch.rand(4, 8, generator=g)  # R < 1: above the ε floor, where the two differ
    for name in ("nft_seq", "nft"):
        actor.algo = AlgoConfig(name=name, agg_norm=10.0)
        reported = actor.train_step({**batch, "old_logprobs": shifted}, group_size=4)["loss"]
        want, _ = policy_loss(name, current.double(), shifted.double(), rewards.double(), batch["correct_rate"].double(), mask, agg_norm=10.0)
        assert reported == pytest.approx(want.item(), rel=1e-5)
    assert want.item() != pytest.approx(policy_loss("nft_seq", current.double(), shifted.double(), rewards.double(),
                                                    batch["correct_rate"].double(), mask, agg_norm=10.0)[0].item(), rel=1e-3)
    actor.close()
