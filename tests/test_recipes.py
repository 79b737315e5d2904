"""The shipped recipes: every one loads and validates, the paper recipes carry the paper's settings
(the NFT paper's training settings), and `base:` layering behaves (order, relative paths, errors that name the file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_nft.algorithms import ALGORITHMS
from megatron_nft.config import load_config
from megatron_nft.errors import ConfigError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PAPER = {  # model: (prompt tokens, response tokens, eval temperature)
    "qwen2.5-math-7b": (512, 3584, 0.6),
    "qwen2.5-32b": (2048, 14336, 1.0),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_loads(recipe):
    load_config(recipe)


@pytest.mark.parametrize("model", PAPER)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_paper_recipes_carry_the_paper_settings(model, algorithm):
    cfg = load_config(RECIPES / "paper" / f"{model}-{algorithm}.yaml")
    prompt, response, eval_temperature = PAPER[model]
    assert cfg.algo.name == algorithm
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.algo.num_minibatches) == (512, 16, 16)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr) == (1e-6, 10, None)  # constant after warm-up
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.1, 1.0)
    assert (cfg.data.max_prompt_len, cfg.rollout.max_new_tokens) == (prompt, response)
    assert (cfg.rollout.temperature, cfg.eval.temperature, cfg.eval.top_p) == (1.0, eval_temperature, 0.7)
    assert cfg.run.dir == f"runs/{model}-{algorithm}"
    if algorithm == "nft":
        assert (cfg.algo.eps, cfg.algo.prompt_weight, cfg.algo.agg, cfg.algo.agg_norm) == (1.0, "one_minus_r", "token_sum_norm", 1000.0)
    if algorithm == "dapo":
        assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.agg) == (0.2, 0.28, "token_mean")
        # the official scripts' over-long shaping: none at 7B, 4096 tokens x 1.0 on ±1 rewards at 32B
        official = {"qwen2.5-math-7b": (0, 1.0), "qwen2.5-32b": (4096, 0.5)}[model]
        assert cfg.algo.dynamic_sampling and (cfg.reward.overlong_buffer, cfg.reward.overlong_penalty) == official
    if algorithm in ("grpo", "dr_grpo"):
        assert cfg.algo.clip_low == 0.2 and not cfg.algo.dynamic_sampling
    if algorithm in ("grpo", "dapo"):
        assert cfg.algo.adv_std == "unbiased"  # verl's torch.std
    if algorithm in ("nft", "rft"):  # the official code's cap, clamp and data-parallel gradient average
        world = {"qwen2.5-math-7b": 32, "qwen2.5-32b": 16}[model]
        assert (cfg.algo.max_log_ratio, cfg.algo.rhat_clamp, cfg.algo.reference_dp_world) == (10.0, 0.02, world)
        assert cfg.algo.prompt_weight == "one_minus_r" and cfg.algo.dynamic_sampling


def test_base_layering_order_and_relative_paths(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.yaml").write_text("optim:\n  lr: 0.1\n  warmup_steps: 3\n")
    (tmp_path / "lib" / "b.yaml").write_text("base: a.yaml\noptim:\n  lr: 0.2\n")
    (tmp_path / "c.yaml").write_text("optim:\n  weight_decay: 0.5\n  lr: 0.3\n")
    top = tmp_path / "top.yaml"
    top.write_text("base: [lib/b.yaml, c.yaml]\noptim:\n  warmup_steps: 7\n")
    cfg = load_config(top)
    # c overrides b overrides a; the recipe overrides its bases; overrides override the recipe
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (0.3, 7, 0.5)
    assert load_config(top, ["optim.lr=0.4"]).optim.lr == 0.4


@pytest.mark.parametrize(
    "text, words",
    [
        ("base: missing.yaml\n", ["missing.yaml", "no such file", "base of"]),
        ("base: top.yaml\n", ["includes itself"]),
        ("base: {a: 1}\n", ["base must be"]),
    ],
)
def test_bad_base_is_one_line_naming_the_file(tmp_path, text, words):
    top = tmp_path / "top.yaml"
    top.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(top)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
