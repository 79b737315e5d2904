"""The policy losses against their closed forms, by autograd on random data (CPU, float64, seconds).

Log-probs are log_softmax(logits) of random token ids, with `logits` a leaf tensor, so every gradient
below flows from a real parameter. Per-token gradients d loss / d logprob_t are compared with the
closed forms derived from the paper's eq. 10 (NFT) and the PPO-clip surrogate (GRPO family).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_nft.algorithms import (
    LossStats,
    algorithm,
    dynamic_sampling_keep,
    group_correct_rate,
    names,
    policy_loss,
    prompt_weights,
)

# The per-token losses; the sequence-level ones (InfoNCA, nft_seq) have their own tests.
TOKEN_ALGORITHMS = tuple(a for a in names() if not algorithm(a).sequence_level)
REDUCTIONS = LossStats.reductions()  # how each stat reduces over micro-batches, as declared
STATS_KEYS = tuple(REDUCTIONS)
K = 4
POSITIVES = [1, 2, 3, 0, 4, 2]  # per group: r̂ = .25, .5, .75, 0 (all wrong), 1 (all right), .5
B, T, V = K * len(POSITIVES), 7, 9
GARBAGE = -1e4  # old log-prob at masked positions: R would be inf there if masks were not honoured


def make_batch(seed: int = 0, dtype=torch.float64) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.zeros(B, dtype=dtype)
    for group, n_pos in enumerate(POSITIVES):
        rewards[group * K + torch.randperm(K, generator=g)[:n_pos]] = 1.0
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    return SimpleNamespace(
        logits=torch.randn(B, T, V, generator=g, dtype=dtype).requires_grad_(),
        ids=torch.randint(V, (B, T), generator=g),
        rewards=rewards,
        correct_rate=group_correct_rate(rewards, K),
        mask=mask,
        gen=g,
    )


def logprobs_of(b: SimpleNamespace) -> torch.Tensor:
    return torch.log_softmax(b.logits, dim=-1).gather(-1, b.ids[..., None]).squeeze(-1)


def old_at(b: SimpleNamespace, logp: torch.Tensor, log_ratio: torch.Tensor | None) -> torch.Tensor:
    """Old log-probs giving R = exp(log_ratio) on valid tokens (R = 1 if None) and garbage elsewhere.

    They stay attached to the graph of `logp`: policy_loss must detach them itself (if it did not, the
    gradient would cancel)."""
    old = logp if log_ratio is None else logp - log_ratio
    return torch.where(b.mask, old, GARBAGE)


def run(algorithm, b, log_ratio=None, **kw):
    """(loss, stats, d loss/d logprobs, d loss/d logits, R as the loss sees it)."""
    logp = logprobs_of(b)
    old = old_at(b, logp, log_ratio)
    kw.setdefault("group_size", K)  # GRPO/DAPO's sample std needs K
    loss, stats = policy_loss(algorithm, logp, old, b.rewards, b.correct_rate, b.mask, **kw)
    g_logp, g_logits = torch.autograd.grad(loss, [logp, b.logits])
    ratio = torch.where(b.mask, torch.exp(logp.detach() - old.detach()), 1.0)
    return loss.detach(), stats, g_logp, g_logits, ratio


def norm_of(b, agg, agg_norm=1000.0):
    return agg_norm if agg == "token_sum_norm" else float(b.mask.sum())


def uniform(b, low, high):
    return low + (high - low) * torch.rand(B, T, generator=b.gen, dtype=b.rewards.dtype)


def close(a, b, rtol=1e-10, atol=1e-14):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def grpo_adv(b, std_normalised=True):
    """verl's advantage: (r - mean) / (torch.std + 1e-6) per group, torch.std Bessel-corrected."""
    r = b.rewards.view(-1, K)
    centred = r - r.mean(dim=1, keepdim=True)
    adv = centred / (r.std(dim=1, keepdim=True) + 1e-6) if std_normalised else centred
    return adv.reshape(-1, 1)


# ---------------------------------------------------------------------------------------------------
# 1-2. On-policy theory: NFT's gradient equals GRPO's / Dr.GRPO's, and its loss is exactly 0.


@pytest.mark.parametrize("agg", ["token_sum_norm", "token_mean"])
def test_nft_on_policy_gradient_equals_grpo_and_dr_grpo(agg):
    b = make_batch(1)
    m = b.mask.to(b.rewards.dtype)
    norm = norm_of(b, agg)
    r, rh = b.rewards[:, None], b.correct_rate[:, None]
    std = torch.sqrt(rh * (1 - rh))
    # d loss / d logprob_t at R = 1: -(r - r̂)/σ (GRPO without its 1e-6) and -(r - r̂) (Dr.GRPO).
    grpo_exact = torch.where(std > 0, -(r - rh) / std.clamp_min(1e-300), 0.0) * m / norm
    dr_exact = -(r - rh) * m / norm

    # The equivalence holds with the population std; verl's sample std (the default) scales GRPO's
    # gradient by sqrt((K-1)/K).
    _, _, nft_g, nft_logits, _ = run("nft", b, prompt_weight="grpo", agg=agg)
    _, _, grpo_g, grpo_logits, _ = run("grpo", b, agg=agg, adv_std="population")
    close(nft_g, grpo_exact)
    close(grpo_g, grpo_exact, rtol=1e-5)  # GRPO's σ + 1e-6 with σ >= 0.43 here
    close(nft_logits, grpo_logits, rtol=1e-5, atol=1e-12)
    _, _, sample_g, _, _ = run("grpo", b, agg=agg)
    close(sample_g, grpo_exact * math.sqrt((K - 1) / K), rtol=1e-5, atol=1e-14)
    assert (grpo_exact != 0).any() and (grpo_exact[b.mask] == 0).any()  # mixed and all-same groups

    _, _, nft_g, nft_logits, _ = run("nft", b, prompt_weight="one_minus_r", agg=agg)
    _, _, dr_g, dr_logits, _ = run("dr_grpo", b, agg=agg)
    close(nft_g, dr_exact)
    close(dr_g, dr_exact)
    close(nft_logits, dr_logits)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prompt_weight", ["uniform", "one_minus_r", "grpo"])
@pytest.mark.parametrize("neg_clip", [1.0, 0.5])
def test_nft_loss_is_exactly_zero_on_policy(dtype, prompt_weight, neg_clip):
    b = make_batch(2, dtype)
    for agg in ("token_sum_norm", "token_mean"):
        loss, stats, g, _, _ = run("nft", b, prompt_weight=prompt_weight, neg_clip=neg_clip, agg=agg)
        assert loss.item() == 0.0
        assert stats["loss"].item() == 0.0
        assert stats["neg_floor_tokens"].item() == 0
        assert g.abs().sum() > 0  # zero loss, nonzero gradient
    # and off-policy it is not zero
    loss, *_ = run("nft", b, uniform(b, -0.3, 0.3), prompt_weight=prompt_weight, neg_clip=neg_clip)
    assert loss.abs().item() > 1e-6


# ---------------------------------------------------------------------------------------------------
# 3. The strongest one: every token's NFT gradient against the closed form, both branches.


@pytest.mark.parametrize("prompt_weight", ["uniform", "one_minus_r", "grpo"])
@pytest.mark.parametrize("neg_clip", [1.0, 0.3])
def test_nft_per_token_gradient_closed_form_straight_through(prompt_weight, neg_clip):
    b = make_batch(3)
    log_ratio = uniform(b, -1.0, 1.6)  # R in [0.37, 5]: floored negatives, some with x < 0
    loss, stats, g, _, R = run("nft", b, log_ratio, prompt_weight=prompt_weight, neg_clip=neg_clip)
    m = b.mask.to(R.dtype)
    r, rh = b.rewards[:, None], b.correct_rate[:, None]
    rh_b = rh.expand(B, T)
    omega = {"uniform": torch.ones_like(rh), "one_minus_r": 1 - rh,
             "grpo": torch.where(rh > 0, torch.sqrt((1 - rh) / rh.clamp_min(1e-300)), 0.0)}[prompt_weight]
    safe = torch.where(rh < 1, 1 - rh, 1.0)
    x = (1 - rh * R) / safe
    x_floor = torch.clamp(x, min=neg_clip)
    lr = torch.log(R)
    norm = 1000.0
    # ℓ = ω[-r log R - (1-r) log max(x, ε)];  dℓ/dlogπ = ω[-r + (1-r) r̂ R / ((1-r̂) max(x, ε))]
    want_g = omega * (-r + (1 - r) * rh * R / (safe * x_floor)) * m / norm
    want_loss = (omega * (-r * lr - (1 - r) * torch.log(x_floor)) * m).sum() / norm
    close(g, want_g)
    close(loss, want_loss)

    neg = b.mask & (r < 0.5)
    floored = neg & (x < neg_clip)
    live = neg & (rh_b > 0)  # r̂ = 0: x = 1 whatever R, no gradient
    assert floored.sum() >= 5 and (neg & (x >= neg_clip) & (rh_b > 0)).sum() >= 5
    assert (floored & (x < 0)).any()  # even x < 0 keeps a (scaled) gradient
    # straight-through: scaled by 1/max(x, ε), never zeroed (a hard clamp would give exactly 0 here)
    assert (g[floored & live & (omega.expand(B, T) > 0)].abs() > 0).all()
    assert stats["neg_floor_tokens"].item() == floored.sum().item()
    close(stats["neg_floor_frac"], floored.sum().to(R.dtype) / neg.sum())
    assert live.any()


def test_nft_negative_gradient_is_scaled_by_one_over_eps():
    # Where floored, the two ε give gradients in the ratio ε2/ε1 (same data, same R).
    b = make_batch(4)
    log_ratio = uniform(b, 1.0, 1.6)  # R >= e: every negative with r̂ >= 0.5 has x < 0.3 and < 1
    _, _, g1, _, R = run("nft", b, log_ratio, neg_clip=1.0)
    _, _, g2, _, _ = run("nft", b, log_ratio, neg_clip=0.3)
    rh = b.correct_rate[:, None].expand(B, T)
    sel = b.mask & (b.rewards[:, None] < 0.5) & (rh >= 0.5)
    assert sel.sum() >= 5
    close(g2[sel], g1[sel] * (1.0 / 0.3))


# ---------------------------------------------------------------------------------------------------
# 4. RFT: positives' log-likelihood only.


@pytest.mark.parametrize("agg", ["token_sum_norm", "token_mean"])
def test_rft_gradient_is_positive_log_likelihood_only(agg):
    b = make_batch(5)
    log_ratio = uniform(b, -0.5, 0.5)
    norm = norm_of(b, agg)
    r, rh = b.rewards[:, None], b.correct_rate[:, None]
    # ω: 1 by default (the paper's RFT), or NFT's prompt weights (the official scripts: 1 - r̂)
    weights = {None: torch.ones_like(rh), "uniform": torch.ones_like(rh), "one_minus_r": 1 - rh,
               "grpo": torch.where(rh > 0, torch.sqrt((1 - rh) / rh.clamp_min(1e-300)), 0.0)}
    for prompt_weight, omega in weights.items():
        loss, stats, g, _, R = run("rft", b, log_ratio, prompt_weight=prompt_weight, agg=agg)
        m = b.mask.to(R.dtype)
        close(g, -omega * r * m / norm)
        close(loss, -(omega * r * torch.log(R) * m).sum() / norm)
        assert (g[(r < 0.5).expand(B, T)] == 0).all()
        assert stats["neg_floor_frac"].item() == 0 and stats["clip_frac"].item() == 0


# ---------------------------------------------------------------------------------------------------
# 5. GRPO family: the PPO-min clip indicators, per token.


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("agg", ["token_sum_norm", "token_mean"])
def test_grpo_family_per_token_gradient_with_clip_indicators(algorithm, agg):
    b = make_batch(6)
    log_ratio = uniform(b, -0.5, 0.5)  # R in [0.61, 1.65]
    clip_low, clip_high = 0.2, 0.28
    loss, stats, g, _, R = run(algorithm, b, log_ratio, clip_low=clip_low, clip_high=clip_high, agg=agg)
    m = b.mask.to(R.dtype)
    norm = norm_of(b, agg)
    A = grpo_adv(b, std_normalised=algorithm != "dr_grpo").expand(B, T)
    high = clip_high if algorithm == "dapo" else clip_low
    active = ((A > 0) & (R > 1 + high)) | ((A < 0) & (R < 1 - clip_low))
    close(g, -A * R * (~active) * m / norm)
    surrogate = torch.minimum(R * A, R.clamp(1 - clip_low, 1 + high) * A)
    close(loss, -(surrogate * m).sum() / norm)

    v = b.mask
    # the data exercise every case: clipped either side, unclipped on the other side of the range,
    # and (for dapo vs grpo) the band between 1+clip_low and 1+clip_high.
    assert (v & (A > 0) & (R > 1 + clip_high)).any() and (v & (A < 0) & (R < 1 - clip_low)).any()
    assert (v & (A > 0) & (R < 1 - clip_low)).any() and (v & (A < 0) & (R > 1 + clip_high)).any()
    band = v & (A > 0) & (R > 1 + clip_low) & (R < 1 + clip_high)
    assert band.any()
    if algorithm == "dapo":
        assert (g[band] != 0).all()
    else:
        assert (g[band] == 0).all()
    # groups with r̂ in {0, 1}: A = 0, no gradient
    same = v & ((b.correct_rate == 0) | (b.correct_rate == 1))[:, None]
    assert same.any() and (g[same] == 0).all()
    assert stats["clip_tokens"].item() == (active & v).sum().item()
    close(stats["clip_frac"], (active & v).sum().to(R.dtype) / v.sum())
    close(stats["adv_mean"], (A * m).sum() / m.sum())
    assert stats["neg_floor_frac"].item() == 0


# ---------------------------------------------------------------------------------------------------
# 6. Aggregation, masks and stats.


@pytest.mark.parametrize("algorithm", TOKEN_ALGORITHMS)
def test_aggregation_token_mean_and_row_additivity(algorithm):
    b = make_batch(7)
    log_ratio = uniform(b, -0.7, 0.9)
    loss_mean, _, g_mean, _, _ = run(algorithm, b, log_ratio, agg="token_mean")
    n = float(b.mask.sum())
    loss_sum, _, g_sum, _, _ = run(algorithm, b, log_ratio, agg="token_sum_norm", agg_norm=n)
    close(loss_mean, loss_sum)
    close(g_mean, g_sum)

    # token_sum_norm is additive over row splits (micro-batches), values and gradients
    logp = logprobs_of(b)
    old = old_at(b, logp, log_ratio)
    args = (b.rewards, b.correct_rate, b.mask)
    full, _ = policy_loss(algorithm, logp, old, *args, group_size=K)
    parts = [
        policy_loss(algorithm, logp[s], old[s], *(a[s] for a in args), group_size=K)[0]
        for s in (slice(0, 5), slice(5, 13), slice(13, B))
    ]
    split = sum(parts)
    close(split, full)
    close(torch.autograd.grad(split, b.logits, retain_graph=True)[0], torch.autograd.grad(full, b.logits)[0])
    assert full.abs().item() > 1e-6


@pytest.mark.parametrize("algorithm", TOKEN_ALGORITHMS)
def test_masked_positions_are_ignored_and_float_mask_equals_bool(algorithm):
    b = make_batch(8)
    log_ratio = uniform(b, -0.5, 0.5)
    loss, stats, g, _, _ = run(algorithm, b, log_ratio)  # masked old log-probs are -1e4
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert (g[~b.mask] == 0).all()
    assert all(torch.isfinite(stats[k]) for k in STATS_KEYS)
    logp = logprobs_of(b)
    old = old_at(b, logp, log_ratio)
    lf, sf = policy_loss(algorithm, logp, old, b.rewards, b.correct_rate, b.mask.double(), group_size=K)
    close(lf.detach(), loss)
    for k in STATS_KEYS:
        close(sf[k], stats[k])


@pytest.mark.parametrize("algorithm", TOKEN_ALGORITHMS)
def test_stats_are_detached_scalars_reducible_over_micro_batches(algorithm):
    b = make_batch(9)
    log_ratio = uniform(b, -0.8, 1.2)
    logp = logprobs_of(b)
    old = old_at(b, logp, log_ratio)
    args = (b.rewards, b.correct_rate, b.mask)
    _, full = policy_loss(algorithm, logp, old, *args, group_size=K)
    assert set(full) == set(STATS_KEYS)
    for k, v in full.items():
        assert v.dim() == 0 and v.is_floating_point() and not v.requires_grad, k
    R = torch.exp(log_ratio)[b.mask]
    assert full["num_tokens"].item() == b.mask.sum().item()
    pos_rows = (b.rewards > 0.5)[:, None]
    assert full["pos_tokens"].item() == (b.mask & pos_rows).sum().item()
    assert full["neg_tokens"].item() == (b.mask & ~pos_rows).sum().item()
    close(full["ratio_mean"], R.mean())
    close(full["ratio_min"], R.min())
    close(full["ratio_max"], R.max())

    parts = [
        policy_loss(algorithm, logp[s], old[s], *(a[s] for a in args), group_size=K)[1]
        for s in (slice(0, 6), slice(6, 11), slice(11, B))
    ]
    for k, r in REDUCTIONS.items():
        if r.how == "sum":
            close(sum(p[k] for p in parts), full[k])
        elif r.how == "mean":
            close(sum(p[k] * p[r.over] for p in parts) / sum(p[r.over] for p in parts), full[k])
            if r.of is not None:  # the mean of a carried sum
                close(full[r.of] / full[r.over].clamp_min(1.0), full[k])
        else:
            close((min if r.how == "min" else max)(p[k] for p in parts), full[k])


def test_empty_mask_gives_zero_loss_and_reduction_identities():
    b = make_batch(10)
    logp = logprobs_of(b)
    empty = torch.zeros(B, T, dtype=torch.bool)
    for algorithm in TOKEN_ALGORITHMS:
        for agg in ("token_sum_norm", "token_mean"):
            loss, stats = policy_loss(algorithm, logp, logp.detach() + 5, b.rewards, b.correct_rate, empty, agg=agg,
                                      group_size=K)
            assert loss.item() == 0.0
            assert stats["num_tokens"].item() == 0 and stats["ratio_mean"].item() == 0
            assert stats["ratio_min"].item() == math.inf and stats["ratio_max"].item() == -math.inf


# ---------------------------------------------------------------------------------------------------
# groups.py


def test_group_correct_rate_and_dynamic_sampling():
    rewards = torch.tensor([1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0])
    rate = group_correct_rate(rewards, 3)
    assert rate.dtype == torch.float32
    close(rate, torch.tensor([1 / 3] * 3 + [1.0] * 3 + [0.0] * 3 + [1 / 3] * 3))
    keep, all_right, all_wrong = dynamic_sampling_keep(rewards, 3)
    assert keep.dtype == torch.bool and keep.tolist() == [True, False, False, True]
    assert (all_right, all_wrong) == (1, 1)
    with pytest.raises(ValueError, match="group_size"):
        group_correct_rate(rewards, 5)
    with pytest.raises(ValueError, match="group_size"):
        dynamic_sampling_keep(rewards, 0)


def test_prompt_weights_closed_forms():
    rh = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    close(prompt_weights(rh, "uniform"), torch.ones(5, dtype=torch.float64))
    close(prompt_weights(rh, "one_minus_r"), 1 - rh)
    close(prompt_weights(rh, "grpo"), torch.tensor([0.0, math.sqrt(3), 1.0, math.sqrt(1 / 3), 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="prompt_weight"):
        prompt_weights(rh, "sqrt")


# ---------------------------------------------------------------------------------------------------
# 7. Bad arguments.


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"algorithm": "ppo"}, "algorithm"),
        ({"prompt_weight": "one-minus-r"}, "prompt_weight"),
        ({"agg": "seq_mean"}, "agg"),
        ({"neg_clip": 0.0}, "neg_clip"),
        ({"agg_norm": 0.0}, "agg_norm"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    b = make_batch(11)
    logp = logprobs_of(b).detach()
    algorithm = kwargs.pop("algorithm", "nft")
    with pytest.raises(ValueError, match=name) as err:
        policy_loss(algorithm, logp, logp, b.rewards, b.correct_rate, b.mask, **kwargs)
    if name in ("algorithm", "prompt_weight", "agg"):
        allowed = {"algorithm": names(), "prompt_weight": ("uniform", "one_minus_r", "grpo"),
                   "agg": ("token_sum_norm", "token_mean", "group_mean")}[name]
        assert all(a in str(err.value) for a in allowed)


def test_bad_shapes_raise_value_error_naming_them():
    b = make_batch(12)
    logp = logprobs_of(b).detach()
    with pytest.raises(ValueError, match="mask"):
        policy_loss("nft", logp, logp, b.rewards, b.correct_rate, b.mask[:, :-1])
    with pytest.raises(ValueError, match="correct_rate"):
        policy_loss("nft", logp, logp, b.rewards, b.correct_rate[:-1], b.mask)


# ---------------------------------------------------------------------------------------------------
# the registry and the statistics declarations


def test_every_algorithm_module_is_registered_with_consistent_settings():
    import importlib
    import pkgutil

    import megatron_nft.algorithms as package
    from megatron_nft.algorithms import AGGREGATIONS, PROMPT_WEIGHTS, Algorithm

    defined = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"megatron_nft.algorithms.{info.name}")
        defined |= {v.name for v in vars(module).values() if isinstance(v, Algorithm)}
    assert defined == set(names()) and {"nft", "rft", "grpo", "dr_grpo", "dapo", "infonca", "nft_seq"} <= defined
    for name in names():
        a = algorithm(name)
        assert a.name == name and a.aggregations and set(a.aggregations) <= set(AGGREGATIONS)
        assert a.default_prompt_weight in (None, *PROMPT_WEIGHTS)
        assert not a.couples_group or a.sequence_level  # a loss over a group is not a per-token loss
        assert ("token_mean" in a.aggregations) == (not a.sequence_level)
    with pytest.raises(ValueError, match="algorithm must be one of nft, rft"):
        algorithm("ppo")


def _name_comparisons(path):
    """(line, text) of comparisons of an algo/name expression with a registered name, and of tables
    (tuple / list / set / dict keys) holding two or more registered names."""
    import ast

    registered = set(names())
    source = path.read_text()
    found = []

    def is_name(node):
        return isinstance(node, ast.Constant) and node.value in registered

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            others = " ".join(ast.get_source_segment(source, o) or "" for o in operands if not is_name(o))
            if any(is_name(o) for o in operands) and ("algo" in others or "name" in others):
                found.append((node.lineno, ast.get_source_segment(source, node)))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            if sum(is_name(i) for i in items if i is not None) >= 2:
                found.append((node.lineno, ast.get_source_segment(source, node)[:80]))
    return found


def test_no_module_outside_the_algorithms_compares_algorithm_names(tmp_path):
    """Settings, checks and the actor's branches come from the algorithm objects (issue #17)."""
    from pathlib import Path

    import megatron_nft

    root = Path(megatron_nft.__file__).parent
    offenders = {
        str(p.relative_to(root)): hits
        for p in sorted(root.rglob("*.py"))
        if "algorithms" not in p.relative_to(root).parts and (hits := _name_comparisons(p))
    }
    assert not offenders, offenders
    # the scan does see what it looks for
    probe = tmp_path / "probe.py"
    probe.write_text('if cfg.algo.name == "infonca":\n    pass\nFAMILY = ("grpo", "dapo")\nif fmt == "dapo":\n    pass\n')
    assert [line for line, _ in _name_comparisons(probe)] == [1, 3]


@pytest.mark.parametrize("name", names())
def test_micro_batch_reduction_of_the_declared_stats_equals_the_whole_batch(name):
    """Splitting a batch (whole groups), reducing the parts' stats with MicroBatchReduction (the
    actor's reduction) gives the whole batch's stats: sums, means over their counts, min and max."""
    from megatron_nft.algorithms import MicroBatchReduction

    b = make_batch(13)
    log_ratio = uniform(b, -0.8, 1.2)
    logp = logprobs_of(b).detach()
    old = old_at(b, logp, log_ratio)
    args = (b.rewards, b.correct_rate, b.mask)
    kw = {"group_size": K, "agg": "token_sum_norm", "agg_norm": 7.0, "neg_clip": 0.4}
    _, full = policy_loss(name, logp, old, *args, **kw)
    splits = (slice(0, 8), slice(8, 12), slice(12, B))
    parts = [policy_loss(name, logp[s], old[s], *(a[s] for a in args), **kw)[1] for s in splits]
    reduction = MicroBatchReduction(LossStats)
    reduced = reduction.finish(*reduction.local(parts))
    assert set(reduced) == set(STATS_KEYS)
    for k, v in full.items():
        assert reduced[k] == pytest.approx(v.item(), rel=1e-12, abs=1e-12), k
    assert full["num_tokens"].item() > 0 and full["ratio_max"].item() > full["ratio_min"].item()


def test_steps_average_by_declaration_and_keep_the_logged_metric_names():
    from megatron_nft.algorithms import StepStats, average_steps

    steps = [
        {k: float(i + j) for j, k in enumerate(StepStats.reductions())} for i in (1.0, 4.0, 2.0)
    ]
    averaged = average_steps(StepStats, steps)
    # the metric names the trainer has always logged (actor/<name>): a rename breaks every dashboard
    assert set(averaged) == {"loss", "entropy", "grad_norm", "ratio_mean", "neg_floor_frac", "clip_frac", "lr",
                             "ratio_min", "ratio_max"}
    for k, v in averaged.items():
        values = [s[k] for s in steps]
        want = {"ratio_min": min(values), "ratio_max": max(values)}.get(k, sum(values) / 3)
        assert v == want, k
