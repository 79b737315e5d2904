"""Steps 1-2 of a training step: generate K answers per prompt, verify them, keep the mixed groups.

    collector = RolloutCollector(cfg, engine, scorer, cursor.next_batch, sampling)
    rollout = collector.collect(step)          # rank 0; every rank gets it through broadcast_object

Dynamic sampling (DAPO): rounds of `rollout.gen_prompts` prompts until `rollout.prompts_per_step`
mixed groups (0 < r̂ < 1) are kept or `rollout.max_num_gen_batches` rounds are spent; without it, one
round of exactly the train batch. What happened on the way is tallied for the step's metrics.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field

import torch

from megatron_nft.algorithms import dynamic_sampling_keep
from megatron_nft.config import TrainConfig
from megatron_nft.reward import apply_truncation
from megatron_nft.rollout import Completion, RolloutEngine, SamplingParams


@dataclass
class Prompt:
    ids: list[int]
    answer: str


@dataclass
class StepRollout:
    """The kept groups of one step, and what happened while collecting them."""

    prompts: list[Prompt] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)  # K per prompt, grouped
    rewards: list[float] = field(default_factory=list)  # correctness r in {0, 1}; truncated = 0
    metrics: dict = field(default_factory=dict)


class Scorer:
    """Decodes completions and grades them; a truncated answer scores 0 (the paper's rule)."""

    def __init__(self, tokenizer, grader):
        self.tokenizer, self.grader = tokenizer, grader

    def __call__(self, completions: list[Completion], golds: list[str]) -> list[float]:
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        return apply_truncation(self.grader.score(texts, golds), [c.finish_reason == "length" for c in completions])

    @property
    def last_stats(self) -> dict:
        """The grading pool's counts for the last call (answers without an answer, refused, timed out...)."""
        return self.grader.last_stats


def step_seed(run_seed: int, step: int, purpose: str) -> int:
    """The sampling seed of one generation call, fixed by (run seed, step, purpose): a run resumed from a
    checkpoint draws the same answers as one that never stopped."""
    return zlib.crc32(f"{run_seed}:{step}:{purpose}".encode())


GRADING_COUNTS = ("no_answer", "refused", "timeouts", "errors", "seconds")


@dataclass
class RolloutTally:
    """What one step's rounds generated, graded and dropped: the step's rollout/ and reward/ metrics."""

    rounds: int = 0
    generated: int = 0
    reward_sum: float = 0.0
    length_sum: float = 0.0
    truncated: int = 0
    all_right: int = 0
    all_wrong: int = 0
    grading: dict = field(default_factory=lambda: dict.fromkeys(GRADING_COUNTS, 0.0))

    def add_round(self, completions: list[Completion], rewards: list[float], grading: dict, right: int, wrong: int) -> None:
        self.rounds += 1
        self.generated += len(completions)
        self.reward_sum += sum(rewards)
        self.length_sum += sum(len(c.token_ids) for c in completions)
        self.truncated += sum(c.finish_reason == "length" for c in completions)
        self.all_right, self.all_wrong = self.all_right + right, self.all_wrong + wrong
        for key in GRADING_COUNTS:
            self.grading[key] += grading.get(key, 0)

    def metrics(self, kept: int) -> dict:
        n = max(self.generated, 1)
        return {
            "rollout/reward": self.reward_sum / n,  # correctness over every generated answer
            "rollout/response_length": self.length_sum / n,
            "rollout/truncated_frac": self.truncated / n,
            "rollout/gen_rounds": self.rounds,
            "rollout/groups_kept": kept,
            "rollout/groups_all_right": self.all_right,
            "rollout/groups_all_wrong": self.all_wrong,
            # answers the grader never saw or could not finish (all score 0): a rising count means the
            # model stopped writing final answers, or writes ones that stall sympy
            "reward/no_answer_frac": self.grading["no_answer"] / n,
            "reward/refused": self.grading["refused"],
            "reward/timeouts": self.grading["timeouts"],
            "reward/errors": self.grading["errors"],
            "time/grade_s": self.grading["seconds"],
        }


class RolloutCollector:
    """Rank 0's half of a step: prompts from `next_prompts(n)`, answers from the engine, rewards from
    the scorer, groups kept by dynamic sampling."""

    def __init__(self, cfg: TrainConfig, engine: RolloutEngine, scorer: Scorer, next_prompts, sampling: SamplingParams):
        self.cfg, self.engine, self.scorer, self.next_prompts, self.sampling = cfg, engine, scorer, next_prompts, sampling

    def collect(self, step: int) -> StepRollout:
        r, k, filtered = self.cfg.rollout, self.cfg.rollout.samples_per_prompt, self.cfg.algo.dynamic_sampling
        out, tally = StepRollout(), RolloutTally()
        # Without the filter nothing is dropped: one round of exactly the train batch.
        round_size = r.gen_prompts if filtered else r.prompts_per_step
        while len(out.prompts) < r.prompts_per_step and tally.rounds < r.max_num_gen_batches:
            prompts: list[Prompt] = self.next_prompts(round_size)
            params = dataclasses.replace(self.sampling, seed=step_seed(self.cfg.run.seed, step, f"rollout-{tally.rounds + 1}"))
            completions = self.engine.generate([p.ids for p in prompts], params)
            rewards = self.scorer(completions, [p.answer for p in prompts for _ in range(k)])
            keep, right, wrong = dynamic_sampling_keep(torch.tensor(rewards), k)
            tally.add_round(completions, rewards, self.scorer.last_stats, right, wrong)
            for g, prompt in enumerate(prompts):
                if filtered and not keep[g]:
                    continue
                out.prompts.append(prompt)
                out.completions.extend(completions[g * k : (g + 1) * k])
                out.rewards.extend(rewards[g * k : (g + 1) * k])
        n = min(len(out.prompts), r.prompts_per_step)
        out.prompts, out.completions, out.rewards = out.prompts[:n], out.completions[: n * k], out.rewards[: n * k]
        out.metrics = tally.metrics(kept=n)
        return out
