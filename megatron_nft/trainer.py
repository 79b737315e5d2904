"""The training loop. One step (`Trainer.step`) is README's algorithm:

    1-2. sample prompts, generate K answers each, verify them, keep the mixed groups   (collect.py)
    3.   old per-token log-probs from the actor
    4.   num_minibatches optimizer steps with the algorithm's loss                    (actor, algorithms)
    5.   the new weights to the rollout engine

and `Trainer.train` is the loop around it: evaluate when due, log, checkpoint when due, stop on
SIGTERM. A Trainer is built once (`Trainer.build`) from typed parts, each of which owns one thing:
the rollout collector (generation, grading, dynamic sampling, its tally), the actor, the evaluator
(held-out accuracy, and when to measure it), the checkpointer (all run state on disk, and when to
save), the metrics logger. Every resource is closed by one exit stack.

Rank 0 owns the rollout engine and the grading pool; every rank runs the actor. The other ranks wait
for rank 0 on the control group (gloo, no device watchdog: they wait there for as long as the rollout
takes). Rank 0 turns the batch into tensors and each data-parallel rank receives only its rows
(sharded_train.py). train_on_rollout, every rank on the whole batch, is the reference the sharded step
is tested against (tests/test_batch_shards.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_nft.actor import Actor
from megatron_nft.async_rollouts import AsyncRollouts, ReadyRollout, load_pending
from megatron_nft.algorithms import group_correct_rate, group_reward_std, truncated_is_weights
from megatron_nft.checkpointing import Checkpointer, load_megatron_weights
from megatron_nft.collect import Prompt, RolloutCollector, Scorer, StepRollout, step_seed
from megatron_nft.config import TrainConfig, model_options
from megatron_nft.data.batching import pack_rows, select_rows
from megatron_nft.errors import TrainingDiverged
from megatron_nft.reward import shape_overlong
from megatron_nft.rollout import RolloutEngine, SamplingParams
from megatron_nft.run_dir import write_atomically
from megatron_nft.runtime import any_rank, broadcast_object, gather_objects, is_main_rank
from megatron_nft.sharded_train import ahead_old_logprobs, minibatch_metrics, share_rollout, train_on_shards


def training_rewards(cfg: TrainConfig, rollout: StepRollout) -> list[float]:
    """The rewards the loss sees: correctness, plus DAPO's over-long penalty when configured."""
    if not cfg.reward.overlong_buffer:
        return list(rollout.rewards)
    lengths = [len(c.token_ids) for c in rollout.completions]
    return shape_overlong(
        rollout.rewards, lengths, max_len=cfg.rollout.max_new_tokens,
        buffer=cfg.reward.overlong_buffer, factor=cfg.reward.overlong_penalty,
    )


def rollout_batch(rollout: StepRollout, k: int, rewards: list[float]) -> dict:
    """The actor's batch: tokens and masks, the engine's log-probs, and per-row reward statistics of
    each row's group (mean r̂ and population std, over the rewards the loss sees)."""
    prompts = [p.ids for p in rollout.prompts for _ in range(k)]
    reward_tensor = torch.tensor(rewards)
    return pack_rows(
        prompts,
        [c.token_ids for c in rollout.completions],
        extra={
            "rollout_logprobs": [c.logprobs for c in rollout.completions],
            "rewards": rewards,
            "correct_rate": group_correct_rate(reward_tensor, k).tolist(),
            "reward_std": group_reward_std(reward_tensor, k).tolist(),
        },
    )


def evaluate(engine: RolloutEngine, scorer: Scorer, prompts: list[Prompt], samples: int, sampling: SamplingParams) -> float:
    """avg@k accuracy: the mean score over `samples` answers per held-out prompt."""
    params = dataclasses.replace(sampling, n=samples)
    completions = engine.generate([p.ids for p in prompts], params)
    scores = scorer(completions, [p.answer for p in prompts for _ in range(samples)])
    return sum(scores) / max(len(scores), 1)


def old_logprobs_of(actor: Actor, batch: dict) -> torch.Tensor:
    """log π_old [B, S] of a rollout batch under the actor's current weights; the loss mask tells the
    packed path how much of each row it needs."""
    return actor.compute_logprobs({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]})[0]


def rollout_old_logprobs(actor: Actor, cfg: TrainConfig, rollout: StepRollout) -> torch.Tensor:
    """log π_old [B, S] of a whole rollout, as train_on_rollout would compute it now (the whole-batch
    reference of sharded_train.ahead_old_logprobs)."""
    return old_logprobs_of(actor, rollout_batch(rollout, cfg.rollout.samples_per_prompt, training_rewards(cfg, rollout)))


def train_on_rollout(actor: Actor, cfg: TrainConfig, rollout: StepRollout,
                     old_logprobs: torch.Tensor | None = None) -> tuple[dict, list[bool]]:
    """Old log-probs (unless given: computed earlier under the weights that sampled the rollout), then
    `num_minibatches` optimizer steps over whole groups. Returns the step's metrics and, per minibatch,
    whether its loss or gradient was non-finite (its update skipped)."""
    k = cfg.rollout.samples_per_prompt
    rewards = training_rewards(cfg, rollout)
    batch = rollout_batch(rollout, k, rewards)
    started = time.perf_counter()
    if old_logprobs is None:
        old_logprobs = old_logprobs_of(actor, batch)
    old_logprobs_s = time.perf_counter() - started
    batch["old_logprobs"] = old_logprobs
    mask = batch["loss_mask"].bool()
    metrics = {}
    if cfg.algo.tis_cap is not None:
        # token-level truncated importance sampling: the answers were sampled from the rollout engine's
        # π, the loss is written for the actor's π_old; weight each token by their ratio, capped.
        weight = truncated_is_weights(old_logprobs, batch["rollout_logprobs"], mask, cfg.algo.tis_cap)
        batch["loss_mask"] = batch["loss_mask"] * weight
        metrics["actor/tis_weight_mean"] = weight[mask].mean().item()
        metrics["actor/tis_capped_frac"] = (weight[mask] >= cfg.algo.tis_cap).float().mean().item()
    metrics |= {
        "time/old_logprobs_s": old_logprobs_s,
        "actor/rollout_logprob_abs_diff": (old_logprobs - batch["rollout_logprobs"]).abs()[mask].mean().item(),
        "train/reward": sum(rewards) / max(len(rewards), 1),
        "train/accuracy": sum(rollout.rewards) / max(len(rollout.rewards), 1),
    }
    groups = len(rollout.prompts)
    num_mb = min(cfg.algo.num_minibatches, groups)
    per_mb = math.ceil(groups / num_mb)
    step_metrics = []
    started = time.perf_counter()
    for start in range(0, groups, per_mb):
        rows = slice(start * k, min(groups, start + per_mb) * k)
        step_metrics.append(actor.train_step(select_rows(batch, rows), group_size=k))
    metrics["time/train_s"] = time.perf_counter() - started
    return metrics | minibatch_metrics(step_metrics), [m["nonfinite"] for m in step_metrics]


def sync_weights(actor: Actor, engine: RolloutEngine | None, version: int) -> float:
    """Actor -> rollout engine through the HF mapping; every rank takes part. SGLang servers take
    each pipeline stage's tensors from that stage's own source rank (disk, CUDA IPC: all stages at
    once; NCCL: stage after stage, each over its own group); the in-process engine takes one stream
    gathered on rank 0."""
    from megatron_nft.rollout.weight_sync import sync_from_stages

    start = time.perf_counter()
    bundle = actor.bundle
    if sync_from_stages(engine, bundle.stage_tensors, stage=bundle.pp_rank, source=bundle.stage_source,
                        version=version, num_stages=bundle.pp) is None:
        tensors = actor.hf_tensors()  # the other ranks' part of the gather is done within this call
        if engine is not None:
            engine.update_weights(tensors, version)
    return time.perf_counter() - start


def load_prompts(cfg: TrainConfig, tokenizer, context_len: int) -> tuple[list[Prompt], list[Prompt]]:
    """Encodes train and held-out prompts; a prompt that leaves no room for `rollout.max_new_tokens`
    in the model's context (or exceeds data.max_prompt_len) is an error naming the row."""
    from megatron_nft.data.prompts import encode_prompts, load_prompt_rows

    d = cfg.data
    max_prompt_len = min(d.max_prompt_len, context_len - cfg.rollout.max_new_tokens)
    if d.task == "arithmetic":
        from megatron_nft.data.arithmetic import arithmetic_splits

        train_rows, eval_rows = arithmetic_splits(d.n_train, d.n_eval, seed=d.seed, max_operand=d.max_operand)
        answers = lambda rows: [r["answer"] for r in rows]  # noqa: E731
    else:
        train_rows = load_prompt_rows(d.train_path, prompt_field=d.prompt_field, answer_field=d.answer_field)
        eval_rows = (
            load_prompt_rows(d.eval_path, prompt_field=d.prompt_field, answer_field=d.answer_field) if d.eval_path else []
        )
        answers = lambda rows: [r.answer for r in rows]  # noqa: E731

    def encode(rows):
        if not rows:
            return []
        ids = encode_prompts(tokenizer, rows, template=d.template, chat=d.chat, max_prompt_len=max_prompt_len)
        return [Prompt(i, a) for i, a in zip(ids, answers(rows))]

    return encode(train_rows), encode(eval_rows)


class StopRequested:
    """SIGTERM (Slurm's pre-emption, a scheduler's time limit) sets a flag; the loop finishes its step,
    writes a checkpoint and returns. Ranks agree on the flag with one all-reduce per step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> "StopRequested":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, never requested
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return any_rank(self.requested)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Evaluator:
    """Held-out accuracy (avg@k over `eval.samples` answers per problem) and when to measure it: before
    the first step, every `eval.every` steps and after the last one. Rank 0 generates; every rank
    gets the number."""

    def __init__(self, cfg: TrainConfig, engine: RolloutEngine | None, scorer: Scorer | None, prompts: list[Prompt],
                 sampling: SamplingParams):
        self.cfg, self.engine, self.scorer, self.prompts, self.sampling = cfg, engine, scorer, prompts, sampling

    def due(self, step: int) -> bool:
        """After `step` (1-based)."""
        every, last = self.cfg.eval.every, step == self.cfg.run.steps
        return last or bool(every and step % every == 0)

    def run(self, step: int) -> float | None:
        if not self.prompts:
            return None
        params = dataclasses.replace(self.sampling, seed=step_seed(self.cfg.run.seed, step, "eval"))
        acc = evaluate(self.engine, self.scorer, self.prompts, self.cfg.eval.samples, params) if is_main_rank() else None
        return broadcast_object(acc)


class DivergenceGuard:
    """run.max_nonfinite_updates minibatch updates in a row with a non-finite loss or gradient stop the
    run, with the step's batch dumped (JSON) for its owner to inspect."""

    def __init__(self, limit: int, run_dir: Path):
        self.limit, self.run_dir, self.streak = limit, run_dir, 0

    def check(self, step: int, nonfinite: list[bool], rollout: StepRollout, before_raising) -> None:
        for flag in nonfinite:
            self.streak = self.streak + 1 if flag else 0
            if self.streak >= self.limit:
                saved = self.run_dir / f"nonfinite_step_{step:06d}.json"
                if is_main_rank():
                    write_atomically(saved, json.dumps({
                        "prompts": [dataclasses.asdict(p) for p in rollout.prompts],
                        "completions": [dataclasses.asdict(c) for c in rollout.completions],
                        "rewards": rollout.rewards}))
                before_raising()
                raise TrainingDiverged(
                    f"step {step}: {self.streak} minibatch updates in a row had a non-finite loss or "
                    f"gradient (updates skipped); the last step's batch is saved in {saved}"
                )


@dataclass
class Trainer:
    cfg: TrainConfig
    actor: Actor
    collector: RolloutCollector | None  # rank 0 only, like the engine and the scorer
    engine: RolloutEngine | None
    evaluator: Evaluator
    checkpointer: Checkpointer
    logger: object  # metrics.MetricsLogger
    stop: StopRequested
    guard: DivergenceGuard
    start_step: int
    export: callable  # writes the final policy as an HF checkpoint (rank 0; every rank gathers)
    exits: contextlib.ExitStack
    quiet: bool = False
    peak_tflops: float | None = None  # this rank's accelerator's dense BF16 peak (MFU); None on CPU
    rollouts: AsyncRollouts | None = None  # rollout.mode=async: the rollouts ahead of training (every rank)

    @classmethod
    def build(cls, cfg: TrainConfig, *, quiet: bool = False) -> "Trainer":
        """Everything a run needs, for a run directory that prepare_run_dir has checked and made."""
        from transformers import AutoTokenizer

        from megatron_nft import runtime
        from megatron_nft.config import to_yaml
        from megatron_nft.data.prompts import PromptCursor
        from megatron_nft.metrics import MetricsLogger, device_peak_tflops, truncate_metrics
        from megatron_nft.model.hf_io import hf_tensor_reader, load_hf_config, save_hf_checkpoint
        from megatron_nft.model.qwen2 import shape_from_hf
        from megatron_nft.reward import GradingPool
        from megatron_nft.rollout import make_engine

        runtime.init_process_group()
        run_dir, main = Path(cfg.run.dir), is_main_rank()
        exits = contextlib.ExitStack()
        try:
            hf_config = load_hf_config(cfg.model.hf_path)
            tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
            shape = shape_from_hf(hf_config)
            train_prompts, eval_prompts = load_prompts(cfg, tokenizer, shape.max_position_embeddings)
            actor = Actor(
                shape, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dtype=cfg.model.dtype,
                micro_batch_size=cfg.parallel.micro_batch_size, optim=cfg.optim, algo=cfg.algo,
                total_steps=max(cfg.run.steps * cfg.algo.num_minibatches, 1), temperature=cfg.rollout.temperature,
                seed=cfg.run.seed, cp=cfg.parallel.cp, max_tokens_per_micro_batch=cfg.parallel.max_tokens_per_micro_batch,
                options=model_options(cfg),
            )
            exits.callback(actor.close)
            cursor = PromptCursor(train_prompts, seed=cfg.run.seed)
            checkpointer = Checkpointer(cfg.run, run_dir, actor, cursor)

            def initial_weights():
                if cfg.model.megatron_ckpt:
                    load_megatron_weights(actor, cfg.model.megatron_ckpt)
                else:
                    actor.load_hf(hf_tensor_reader(cfg.model.hf_path))

            start_step = checkpointer.restore(initial_weights)
            if main and start_step:
                truncate_metrics(run_dir / "metrics.jsonl", start_step)
            # The run has begun: its config is stored (a resume compares against it; a start that failed
            # before this point left nothing that blocks the corrected command: see remove_failed_start).
            if main:
                write_atomically(run_dir / "config.yaml", to_yaml(cfg))

            stop_ids = tuple(sorted({t for t in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)) if t is not None}))
            sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                      max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stop_ids,
                                      n=cfg.rollout.samples_per_prompt)
            eval_sampling = SamplingParams(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                                           max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stop_ids,
                                           n=cfg.eval.samples)
            engine = scorer = collector = None
            if main:
                engine = make_engine(cfg.rollout, hf_config=hf_config, model_path=cfg.model.hf_path, run_dir=run_dir,
                                     seed=cfg.run.seed + start_step, progress=not quiet)
                exits.callback(engine.close)  # stops the servers it launched
                grader = GradingPool(answer_format=cfg.reward.answer_format, timeout_s=cfg.reward.timeout_s,
                                     workers=cfg.reward.workers)
                exits.callback(grader.close)
                scorer = Scorer(tokenizer, grader)
                collector = RolloutCollector(cfg, engine, scorer, cursor.next_batch, sampling)
            rollouts = None
            if cfg.rollout.mode == "async":
                pending = load_pending(checkpointer.restored_from) if main else {}
                rollouts = AsyncRollouts(collector, max_staleness=cfg.rollout.max_staleness, last_step=cfg.run.steps - 1,
                                         start_step=start_step, ready=pending, ready_count=broadcast_object(len(pending)))
            logger = MetricsLogger(run_dir, enabled=main, wandb_project=cfg.run.wandb_project, append=start_step > 0)
            exits.callback(logger.close)
            stop = StopRequested().install()
            exits.callback(stop.uninstall)

            def export():
                # one dtype throughout: on CPU megatron-core keeps RMSNorm weights in fp32 in bf16 models
                tensors = actor.hf_tensors()  # the other ranks' part of the gather is done within this call
                if main:
                    save_hf_checkpoint(run_dir / "hf", tensors, hf_config, tokenizer, dtype=actor.dtype, overwrite=True)

            return cls(cfg=cfg, actor=actor, collector=collector, engine=engine,
                       evaluator=Evaluator(cfg, engine, scorer, eval_prompts, eval_sampling), checkpointer=checkpointer,
                       logger=logger, stop=stop, guard=DivergenceGuard(cfg.run.max_nonfinite_updates, run_dir),
                       start_step=start_step, export=export, exits=exits, quiet=quiet,
                       peak_tflops=device_peak_tflops(), rollouts=rollouts)
        except BaseException:
            exits.close()
            raise

    def close(self) -> None:
        self.exits.close()

    def step(self, step: int) -> dict:
        """Step `step` (0-based) of README's algorithm; returns its metrics."""
        if self.rollouts is not None:
            return self.step_overlapped(step)
        from megatron_nft.metrics import reset_peak_memory

        t0 = time.perf_counter()
        reset_peak_memory()
        if hasattr(self.engine, "take_request_seconds"):
            self.engine.take_request_seconds()  # evaluation's requests are not this step's stragglers
        # 1-2. generate, verify, keep the mixed groups (rank 0), shared with every rank
        collected, collect_s = None, None
        if self.collector is not None:
            collected = self.collector.collect(step)
            collect_s = time.perf_counter() - t0
        # rank 0 keeps the rollout; each data-parallel rank gets only its rows (sharded_train.py)
        shared = share_rollout(self.actor, self.cfg, collected)
        rollout = shared.rollout
        t_rollout = time.perf_counter() - t0
        metrics = dict(rollout.metrics)
        self.train_on(step, shared, metrics)  # 3-4. old log-probs, then the minibatch updates
        # 5. the new weights to the rollout engine
        metrics["time/sync_s"] = sync_weights(self.actor, self.engine, version=step + 1)
        metrics["time/rollout_s"] = t_rollout
        metrics["time/step_s"] = time.perf_counter() - t0
        metrics |= self.performance(rollout, metrics, collect_s)
        return metrics

    def train_on(self, step: int, shared, metrics: dict) -> None:
        """Old log-probs (unless scored ahead) and the minibatch updates on this rank's shard, into
        `metrics`; a step without mixed groups is recorded as skipped."""
        if not shared.groups:
            metrics["actor/skipped_step_no_mixed_groups"] = 1
            return
        step_metrics, nonfinite = train_on_shards(self.actor, self.cfg, shared)
        metrics.update(step_metrics)
        self.guard.check(step + 1, nonfinite, shared.rollout, before_raising=lambda: self.logger.log(step + 1, metrics))

    def step_overlapped(self, step: int) -> dict:
        """Step `step` with rollout.mode=async: the coming steps' answers are generated while this one
        trains (the order and the weight versions: async_rollouts.py)."""
        from megatron_nft.metrics import reset_peak_memory

        t0 = time.perf_counter()
        reset_peak_memory()
        if hasattr(self.engine, "take_request_seconds"):
            self.engine.take_request_seconds()
        launched = self.rollouts.launch(step, version=step)  # the engine holds version `step`
        ready: ReadyRollout | None = self.rollouts.take(step) if self.collector is not None else None
        version, scored = broadcast_object((ready.version, ready.old_logprobs is not None) if ready is not None else None)
        # rank 0 keeps the rollout; each data-parallel rank gets only its rows (sharded_train.py)
        shared = share_rollout(self.actor, self.cfg, ready.rollout if ready is not None else None,
                               old_logprobs=ready.old_logprobs if ready is not None else None)
        rollout = shared.rollout
        t_rollout = time.perf_counter() - t0
        metrics = dict(rollout.metrics)
        metrics["rollout/staleness"] = step - version
        if shared.groups and not scored and version != step:
            raise RuntimeError(f"step {step + 1}: a rollout of weight version {version} without its old log-probs")
        # the weights that sample what is generating now, kept for those rollouts' old log-probs
        snapshot = self.actor.weights_snapshot() if any(s > step for s in launched) else None
        self.train_on(step, shared, metrics)
        finished: list[ReadyRollout] | None = self.rollouts.finish() if self.collector is not None else None
        ahead_count = broadcast_object(len(finished) if finished is not None else None)
        if ahead_count:
            started = time.perf_counter()
            with self.actor.weights_swapped(snapshot):
                for i in range(ahead_count):
                    # cut and scored like a step's batch; rank 0 keeps the old log-probs, every rank's rows'
                    old = ahead_old_logprobs(self.actor, self.cfg, finished[i].rollout if finished is not None else None)
                    if finished is not None:
                        finished[i].old_logprobs = old
            metrics["time/old_logprobs_ahead_s"] = time.perf_counter() - started
            if self.collector is not None:
                self.rollouts.keep(finished)
        del snapshot
        metrics["time/sync_s"] = sync_weights(self.actor, self.engine, version=step + 1)
        metrics["time/rollout_s"] = t_rollout
        metrics["time/step_s"] = time.perf_counter() - t0
        if self.collector is not None:
            # the collection (generation + grading) seconds that ran during this step, and the share of
            # them the actor did not wait for
            collecting = sum(r.collect_s for r in finished) + (ready.collect_s if ready.step in launched else 0.0)
            metrics["time/rollout_wait_s"] = self.rollouts.waited_s
            if collecting > 0:
                metrics["perf/rollout_overlap"] = min(max(1.0 - self.rollouts.waited_s / collecting, 0.0), 1.0)
        metrics |= self.performance(rollout, metrics, ready.collect_s if self.collector is not None else None)
        return metrics

    def performance(self, rollout: StepRollout, metrics: dict, collect_s: float | None) -> dict:
        """The step's telemetry beyond its phase times (README "Telemetry"): generated and trained
        tokens/s, the actor's TFLOP/s and MFU, peak memory (max over ranks: every rank takes part),
        weight-sync bandwidth, response-length percentiles and the slowest request."""
        from megatron_nft import metrics as perf

        cfg, k = self.cfg, self.cfg.rollout.samples_per_prompt
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        out = {"perf/peak_mem_gib": max(gather_objects(perf.peak_memory_bytes())) / perf.GIB, "perf/ranks": world}
        if collect_s is not None:  # rank 0, which generated and graded
            out["time/generate_s"] = generate_s = max(collect_s - metrics.get("time/grade_s", 0.0), 0.0)
            round_prompts = cfg.rollout.gen_prompts if cfg.algo.dynamic_sampling else cfg.rollout.prompts_per_step
            generated = metrics["rollout/response_length"] * metrics["rollout/gen_rounds"] * round_prompts * k
            if generate_s > 0:
                out["perf/gen_tokens_per_s"] = generated / generate_s
        lengths = [len(c.token_ids) for c in rollout.completions]
        out |= perf.length_figures(lengths)
        if "time/train_s" in metrics:
            seq_lens = [len(p.ids) + n for p, n in zip((p for p in rollout.prompts for _ in range(k)), lengths)]
            actor_s = metrics["time/old_logprobs_s"] + metrics["time/train_s"]
            out["perf/train_tokens_per_s"] = sum(seq_lens) / actor_s
            out |= perf.actor_performance(self.actor.shape, seq_lens, actor_s, world, self.peak_tflops)
        sync = getattr(self.engine, "last_sync", None)  # SGLang engines report what a sync moved
        if sync is not None and sync.seconds > 0:
            out["perf/sync_gib"] = sync.total_bytes / perf.GIB
            out["perf/sync_gb_per_s"] = sync.total_bytes / sync.seconds / 1e9
        take_request_seconds = getattr(self.engine, "take_request_seconds", None)
        seconds = take_request_seconds() if take_request_seconds is not None else []
        if seconds:
            out["time/slowest_request_s"] = max(seconds)
        return out

    def train(self) -> dict:
        """The loop: steps until run.steps or a stop; returns the final metrics."""
        from tqdm import tqdm

        from megatron_nft.metrics import plot_run, progress_fields, read_metrics

        cfg, main = self.cfg, is_main_rank()
        final: dict = {}
        sync_weights(self.actor, self.engine, version=self.start_step)
        if self.start_step == 0:
            final["eval/accuracy_before"] = acc = self.evaluator.run(0)
            self.logger.log(0, {"eval/accuracy": acc})
        elif main:
            first = next((r for r in read_metrics(self.logger.path) if r["step"] == 0), {})
            final["eval/accuracy_before"] = first.get("eval/accuracy")
        last_accuracy = final["eval/accuracy_before"] if final.get("eval/accuracy_before") is not None else float("nan")
        bar = tqdm(range(self.start_step, cfg.run.steps), desc=cfg.algo.name.upper(), disable=self.quiet or not main,
                   initial=self.start_step, total=cfg.run.steps)
        checkpoint_s = 0.0  # the checkpoint after a step is timed in the next step's row (see README)
        for step in bar:
            metrics = self.step(step)
            done = step + 1
            if self.evaluator.due(done):
                started = time.perf_counter()
                metrics["eval/accuracy"] = self.evaluator.run(done)
                metrics["time/eval_s"] = time.perf_counter() - started
            metrics["time/checkpoint_s"] = checkpoint_s
            self.logger.log(done, metrics)
            if metrics.get("eval/accuracy") is not None:
                last_accuracy = metrics["eval/accuracy"]
            bar.set_postfix(progress_fields(metrics, last_accuracy))
            last, stopping = done == cfg.run.steps, self.stop.agreed()
            checkpoint_s = 0.0
            if self.checkpointer.due(done, last=last, stopping=stopping):
                started = time.perf_counter()
                self.checkpointer.save(done, self.rollouts.checkpoint_files() if self.rollouts and main else None)
                checkpoint_s = time.perf_counter() - started
            final = {**final, **metrics}
            if stopping and not last:
                if main:
                    print(f"megatron-nft: SIGTERM: stopped after step {done} with a checkpoint; "
                          f"continue with run.resume=true", file=sys.stderr)
                final["stopped_at"] = done
                return final
        if cfg.run.steps == self.start_step == 0:
            final["eval/accuracy"] = final.get("eval/accuracy_before")
        self.export()  # the final policy, loadable by transformers and SGLang
        if main:
            plot_run(self.logger.path, Path(cfg.run.dir) / "curves.png")
        return final


def train(cfg: TrainConfig, *, quiet: bool = False) -> dict:
    """Runs (or resumes) the run described by `cfg` in its prepared directory; returns the final metrics."""
    trainer = Trainer.build(cfg, quiet=quiet)
    try:
        return trainer.train()
    finally:
        trainer.close()
