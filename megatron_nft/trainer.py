"""The training loop, one step at a time:

    sample prompts -> generate K answers each -> verify -> keep mixed groups (dynamic sampling)
    -> old log-probs from the actor -> num_minibatches optimizer steps -> weight sync -> metrics

Rank 0 owns the rollout engine and the grading pool; every rank runs the actor. The batch is built on
rank 0 and broadcast over the control group (gloo, no device watchdog: the other ranks wait there for
as long as the rollout takes), so all ranks feed Megatron the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_nft import checkpointing
from megatron_nft.actor import DTYPES, Actor
from megatron_nft.algorithms import dynamic_sampling_keep, group_correct_rate, group_reward_std, truncated_is_weights
from megatron_nft.config import TrainConfig, model_options
from megatron_nft.data.batching import pack_rows, select_rows
from megatron_nft.reward import apply_truncation, shape_overlong
from megatron_nft.checkpointing import step_dirs
from megatron_nft.errors import CheckpointError, ConfigError
from megatron_nft.runtime import any_rank, barrier, broadcast_object, is_main_rank
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
    """Decodes completions and grades them; truncated answers score 0 (DESIGN.md)."""

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


def collect_rollouts(
    cfg: TrainConfig, engine: RolloutEngine, scorer: Scorer, next_prompts, sampling: SamplingParams, step: int = 0
) -> StepRollout:
    """DAPO dynamic sampling: generate rounds of `gen_prompts` prompts until `prompts_per_step` mixed
    groups are kept or `max_num_gen_batches` rounds are spent, then truncate to the train batch."""
    r, k = cfg.rollout, cfg.rollout.samples_per_prompt
    out = StepRollout()
    generated = all_right = all_wrong = truncated = 0
    reward_sum = length_sum = 0.0
    rounds = 0
    grading = dict.fromkeys(("no_answer", "refused", "timeouts", "errors", "seconds"), 0.0)
    # Without the filter nothing is dropped: one round of exactly the train batch.
    round_size = r.gen_prompts if cfg.algo.dynamic_sampling else r.prompts_per_step
    while len(out.prompts) < r.prompts_per_step and rounds < r.max_num_gen_batches:
        rounds += 1
        prompts: list[Prompt] = next_prompts(round_size)
        params = dataclasses.replace(sampling, seed=step_seed(cfg.run.seed, step, f"rollout-{rounds}"))
        completions = engine.generate([p.ids for p in prompts], params)
        golds = [p.answer for p in prompts for _ in range(k)]
        rewards = scorer(completions, golds)
        for key in grading:
            grading[key] += scorer.last_stats.get(key, 0)
        generated += len(completions)
        reward_sum += sum(rewards)
        length_sum += sum(len(c.token_ids) for c in completions)
        truncated += sum(c.finish_reason == "length" for c in completions)
        keep, right, wrong = dynamic_sampling_keep(torch.tensor(rewards), k)
        all_right, all_wrong = all_right + right, all_wrong + wrong
        for g, prompt in enumerate(prompts):
            if cfg.algo.dynamic_sampling and not keep[g]:
                continue
            out.prompts.append(prompt)
            out.completions.extend(completions[g * k : (g + 1) * k])
            out.rewards.extend(rewards[g * k : (g + 1) * k])
    n = min(len(out.prompts), r.prompts_per_step)
    out.prompts, out.completions, out.rewards = out.prompts[:n], out.completions[: n * k], out.rewards[: n * k]
    out.metrics = {
        "rollout/reward": reward_sum / max(generated, 1),  # correctness over every generated answer
        "rollout/response_length": length_sum / max(generated, 1),
        "rollout/truncated_frac": truncated / max(generated, 1),
        "rollout/gen_rounds": rounds,
        "rollout/groups_kept": n,
        "rollout/groups_all_right": all_right,
        "rollout/groups_all_wrong": all_wrong,
        # answers the grader never saw or could not finish (all score 0): a rising count means the model
        # stopped writing final answers, or writes ones that stall sympy
        "reward/no_answer_frac": grading["no_answer"] / max(generated, 1),
        "reward/refused": grading["refused"],
        "reward/timeouts": grading["timeouts"],
        "reward/errors": grading["errors"],
        "time/grade_s": grading["seconds"],
    }
    return out


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


def train_on_rollout(actor: Actor, cfg: TrainConfig, rollout: StepRollout) -> tuple[dict, list[bool]]:
    """Old log-probs, then `num_minibatches` optimizer steps over whole groups. Returns the step's
    metrics and, per minibatch, whether its loss or gradient was non-finite (its update skipped)."""
    k = cfg.rollout.samples_per_prompt
    rewards = training_rewards(cfg, rollout)
    batch = rollout_batch(rollout, k, rewards)
    # the loss mask tells the packed path how much of each row it needs
    old_logprobs, _ = actor.compute_logprobs({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]})
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
        "actor/rollout_logprob_abs_diff": (old_logprobs - batch["rollout_logprobs"]).abs()[mask].mean().item(),
        "train/reward": sum(rewards) / max(len(rewards), 1),
        "train/accuracy": sum(rollout.rewards) / max(len(rollout.rewards), 1),
    }
    groups = len(rollout.prompts)
    num_mb = min(cfg.algo.num_minibatches, groups)
    per_mb = math.ceil(groups / num_mb)
    step_metrics = []
    for start in range(0, groups, per_mb):
        rows = slice(start * k, min(groups, start + per_mb) * k)
        step_metrics.append(actor.train_step(select_rows(batch, rows), group_size=k))
    for key in ("loss", "entropy", "grad_norm", "ratio_mean", "neg_floor_frac", "clip_frac", "lr"):
        values = [m[key] for m in step_metrics]
        metrics[f"actor/{key}"] = sum(values) / len(values)
    metrics["actor/ratio_min"] = min(m["ratio_min"] for m in step_metrics)
    metrics["actor/ratio_max"] = max(m["ratio_max"] for m in step_metrics)
    metrics["actor/loss_first_minibatch"] = step_metrics[0]["loss"]
    metrics["actor/minibatches"] = len(step_metrics)
    metrics["actor/skipped_updates"] = sum(not m["update_ok"] for m in step_metrics)
    metrics["actor/nonfinite_updates"] = sum(m["nonfinite"] for m in step_metrics)
    return metrics, [m["nonfinite"] for m in step_metrics]


def sync_weights(actor: Actor, engine: RolloutEngine | None, version: int) -> float:
    """Actor -> rollout engine through the HF mapping; every rank takes part in the gather."""
    start = time.perf_counter()
    tensors = actor.hf_tensors()
    if engine is not None:
        engine.update_weights(tensors, version)
    else:
        for _ in tensors:  # non-zero ranks still take part in the collectives
            pass
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# the run: set-up, loop, checkpoints
# ----------------------------------------------------------------------------------------------------


def check_machine(cfg: TrainConfig) -> None:
    """What the config asks of this machine (Transformer Engine for model.impl=te or FP8): a
    ConfigError now, before a run directory exists, rather than from the actor later."""
    from megatron_nft.model.qwen2 import te_available

    layers = cfg.model.num_layers
    if cfg.model.hf_path is not None:
        from megatron_nft.model.hf_io import load_hf_config

        layers = load_hf_config(cfg.model.hf_path).num_hidden_layers
    model_options(cfg).resolved(cuda=torch.cuda.is_available(), te=te_available(), dtype=DTYPES[cfg.model.dtype],
                                num_layers=layers, pp=cfg.parallel.pp)


def run_inputs(cfg: TrainConfig) -> dict[str, Path]:
    """The paths a run reads (field name -> path): what nothing of the run may delete or write into."""
    fields = {"model.hf_path": cfg.model.hf_path, "model.megatron_ckpt": cfg.model.megatron_ckpt,
              "data.train_path": cfg.data.train_path, "data.eval_path": cfg.data.eval_path}
    return {name: Path(value) for name, value in fields.items() if value}


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def check_run_dir_against_inputs(cfg: TrainConfig) -> None:
    """A run directory must not be an input, nor lie inside one (the run writes into it); with
    run.overwrite it must not hold one either (it is deleted). One ConfigError names the pair."""
    run_dir = Path(cfg.run.dir)
    for name, path in run_inputs(cfg).items():
        if _inside(run_dir, path):
            raise ConfigError(f"run.dir={run_dir} lies inside {name}={path}: the run would write into its input; "
                              f"choose a run.dir outside it")
        if cfg.run.overwrite and _inside(path, run_dir):
            raise ConfigError(f"{name}={path} lies inside run.dir={run_dir}, which run.overwrite=true deletes; "
                              f"move the input out of the run directory or choose another run.dir")


# What may change when a run is resumed: how long it runs and how it is watched, not what it trains.
RESUMABLE_CHANGES = ("run.", "eval.every", "reward.workers", "reward.timeout_s", "rollout.urls",
                     "rollout.server_start_timeout_s", "rollout.request_timeout_s")


def check_resumed_config(cfg: TrainConfig, stored_path: Path) -> list[str]:
    """Compares a resumed run's config with the one it was started with. A changed model or layout is
    a CheckpointError (the checkpoint holds the other one); returns the other changed fields."""
    from omegaconf import OmegaConf

    from megatron_nft.config import load_config

    try:
        stored = load_config(stored_path)
    except Exception as e:  # noqa: BLE001 - an unreadable stored config: say which file
        raise CheckpointError(f"{stored_path}: cannot read the run's stored config ({' '.join(str(e).split())[:200]})") from None
    old = _flat(OmegaConf.to_container(OmegaConf.structured(stored)))
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fixed = [k for k in changed if k.startswith(("model.", "parallel.")) and not _same_model_dir(k, old, new)]
    if fixed:
        what = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fixed)
        raise CheckpointError(f"run.resume=true with another model or layout than the run's ({what}; stored in "
                              f"{stored_path}); nothing was changed. Resume with the stored values, or start a new run.dir")
    return [k for k in changed if k != "model.hf_path" and not k.startswith(RESUMABLE_CHANGES)]


def _same_model_dir(key: str, old: dict, new: dict) -> bool:
    """model.hf_path may move (the weights come from the checkpoint) if it holds the same model shape."""
    if key != "model.hf_path" or not old.get(key) or not new.get(key) or not Path(old[key]).is_dir():
        return False
    from megatron_nft.model.hf_io import load_hf_config
    from megatron_nft.model.qwen2 import shape_from_hf

    try:
        return shape_from_hf(load_hf_config(old[key])) == shape_from_hf(load_hf_config(new[key]))
    except Exception:  # noqa: BLE001 - an unreadable model is not the same model
        return False


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def prepare_run_dir(cfg: TrainConfig, *, resumes_as: TrainConfig | None = None) -> tuple[Path, bool]:
    """A new run gets a new directory; an existing one is only continued (run.resume) or replaced
    (run.overwrite) when asked. Everything is checked before anything is created or deleted. Returns
    the directory and whether this start created it (so that a failed start can remove it again).
    `resumes_as`: the config the trainer will run, when it is not `cfg` (the demo sets the model path
    after building it)."""
    import shutil

    check_machine(cfg)
    check_run_dir_against_inputs(cfg)
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run.dir={run_dir} is a file, not a directory")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not (cfg.run.resume or cfg.run.overwrite):
        raise CheckpointError(
            f"run directory {run_dir} already holds a run; pass run.resume=true to continue it "
            f"or run.overwrite=true to replace it (or choose another run.dir)"
        )
    if cfg.run.resume:
        if not exists:
            raise CheckpointError(f"run.resume=true but {run_dir} holds no run to resume")
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"run.resume=true but {run_dir} has no config.yaml: its first start never began "
                                  f"training; start it again with run.overwrite=true")
        changed = check_resumed_config(resumes_as or cfg, run_dir / "config.yaml")
        if changed and is_main_rank():
            print(f"megatron-nft: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
        if not step_dirs(run_dir):
            raise CheckpointError(f"run.resume=true but {run_dir / 'checkpoints'} holds no checkpoint to resume from; "
                                  f"nothing was changed (start again with run.overwrite=true, or choose another run.dir)")
    if exists and cfg.run.overwrite and is_main_rank():
        shutil.rmtree(run_dir)
    barrier()
    fresh = not exists or cfg.run.overwrite
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, fresh


def load_megatron_weights(actor: Actor, directory: str) -> None:
    """model.megatron_ckpt: weights only, from a converted checkpoint; garbage or another model's
    checkpoint is one CheckpointError, not torch's exception (which is not even an Exception)."""
    from torch.distributed.checkpoint import CheckpointException

    if not (Path(directory) / "metadata.json").is_file():
        raise CheckpointError(f"model.megatron_ckpt={directory}: not a megatron-core checkpoint (no metadata.json)")
    try:
        actor.load_checkpoint(directory, with_optimizer=False)
    except CheckpointError as e:
        raise CheckpointError(f"model.megatron_ckpt={directory}: {e}") from None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a shard of another shape, a damaged file
        raise CheckpointError(f"model.megatron_ckpt={directory}: cannot be loaded into the model of model.hf_path "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    actor.steps = 0


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def remove_failed_start(run_dir: Path) -> None:
    """After a start that failed before training began (no config.yaml yet): remove what it created,
    so that the corrected command can run. Only called for a directory this start created, which
    check_run_dir_against_inputs keeps free of inputs."""
    import shutil

    if is_main_rank() and run_dir.is_dir() and not (run_dir / "config.yaml").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


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


class TimedSaves:
    """run.save_every_minutes: a checkpoint is due once that much wall time has passed since the last
    one (or the start). Every rank reads its own clock; one all-reduce makes the earliest rank's
    verdict every rank's, so all of them save at the same step."""

    def __init__(self, minutes: float, clock=time.monotonic):
        self.interval_s = minutes * 60.0
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        if not self.interval_s:  # the same config on every rank: all skip the all-reduce together
            return False
        return any_rank(self.clock() - self.last >= self.interval_s)

    def saved(self) -> None:
        self.last = self.clock()


def train(cfg: TrainConfig, *, quiet: bool = False) -> dict:
    """Runs (or resumes) a training run described by `cfg`; returns the final metrics."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from megatron_nft import runtime
    from megatron_nft.config import to_yaml
    from megatron_nft.data.prompts import PromptCursor
    from megatron_nft.errors import TrainingDiverged
    from megatron_nft.metrics import MetricsLogger, plot_run, truncate_metrics
    from megatron_nft.model.hf_io import hf_tensor_reader, load_hf_config, save_hf_checkpoint
    from megatron_nft.model.qwen2 import shape_from_hf
    from megatron_nft.reward import GradingPool
    from megatron_nft.rollout import make_engine

    runtime.init_process_group()
    run_dir = Path(cfg.run.dir)  # prepared by the caller (prepare_run_dir)
    main = is_main_rank()
    hf_config = load_hf_config(cfg.model.hf_path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    shape = shape_from_hf(hf_config)
    train_prompts, eval_prompts = load_prompts(cfg, tokenizer, shape.max_position_embeddings)

    actor = Actor(
        shape,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        dtype=cfg.model.dtype,
        micro_batch_size=cfg.parallel.micro_batch_size,
        optim=cfg.optim,
        algo=cfg.algo,
        total_steps=max(cfg.run.steps * cfg.algo.num_minibatches, 1),
        temperature=cfg.rollout.temperature,
        seed=cfg.run.seed,
        cp=cfg.parallel.cp,
        max_tokens_per_micro_batch=cfg.parallel.max_tokens_per_micro_batch,
        options=model_options(cfg),
    )
    cursor = PromptCursor(train_prompts, seed=cfg.run.seed)
    start_step = 0
    resumed = checkpointing.load_latest(run_dir, actor) if cfg.run.resume else None
    if resumed is not None:
        _, state = resumed
        start_step = state["step"]
        cursor.load_state_dict(state["cursor"])
        if main:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
    elif cfg.model.megatron_ckpt:
        load_megatron_weights(actor, cfg.model.megatron_ckpt)
    else:
        actor.load_hf(hf_tensor_reader(cfg.model.hf_path))
    # The run has begun: its config is stored (a resume compares against it; a start that failed
    # before this point left nothing that blocks the corrected command: see remove_failed_start).
    if main:
        write_atomically(run_dir / "config.yaml", to_yaml(cfg))

    stop_ids = tuple(t for t in [tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)] if t is not None)
    sampling = SamplingParams(
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
        stop_token_ids=tuple(sorted(set(stop_ids))), n=cfg.rollout.samples_per_prompt,
    )
    eval_sampling = SamplingParams(
        temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
        stop_token_ids=sampling.stop_token_ids, n=cfg.eval.samples,
    )
    engine = (
        make_engine(cfg.rollout, hf_config=hf_config, model_path=cfg.model.hf_path, run_dir=run_dir,
                    seed=cfg.run.seed + start_step, progress=not quiet)
        if main else None
    )
    grader = GradingPool(answer_format=cfg.reward.answer_format, timeout_s=cfg.reward.timeout_s, workers=cfg.reward.workers) if main else None
    scorer = Scorer(tokenizer, grader) if main else None
    logger = MetricsLogger(run_dir, enabled=main, wandb_project=cfg.run.wandb_project, append=start_step > 0)
    sync_weights(actor, engine, version=start_step)

    def run_eval(step: int) -> float | None:
        if not eval_prompts:
            return None
        params = dataclasses.replace(eval_sampling, seed=step_seed(cfg.run.seed, step, "eval"))
        acc = evaluate(engine, scorer, eval_prompts, cfg.eval.samples, params) if main else None
        return broadcast_object(acc)

    final: dict = {}
    last_accuracy = float("nan")
    nonfinite_streak = 0
    stop = StopRequested().install()
    timed_saves = TimedSaves(cfg.run.save_every_minutes)
    try:
        if start_step == 0:
            acc = run_eval(0)
            final["eval/accuracy_before"] = acc
            last_accuracy = acc if acc is not None else float("nan")
            logger.log(0, {"eval/accuracy": acc})
        elif main:
            from megatron_nft.metrics import read_metrics

            first = next((r for r in read_metrics(logger.path) if r["step"] == 0), {})
            final["eval/accuracy_before"] = first.get("eval/accuracy")
        bar = tqdm(range(start_step, cfg.run.steps), desc=cfg.algo.name.upper(), disable=quiet or not main, initial=start_step, total=cfg.run.steps)
        for step in bar:
            t0 = time.perf_counter()
            rollout = collect_rollouts(cfg, engine, scorer, cursor.next_batch, sampling, step) if main else None
            rollout = broadcast_object(rollout)
            t_rollout = time.perf_counter() - t0
            metrics = dict(rollout.metrics)
            if rollout.prompts:
                step_metrics, nonfinite = train_on_rollout(actor, cfg, rollout)
                metrics.update(step_metrics)
                for flag in nonfinite:
                    nonfinite_streak = nonfinite_streak + 1 if flag else 0
                    if nonfinite_streak >= cfg.run.max_nonfinite_updates:
                        saved = run_dir / f"nonfinite_step_{step + 1:06d}.json"
                        if main:  # JSON, like everything the project writes for people to read back
                            write_atomically(saved, json.dumps({
                                "prompts": [dataclasses.asdict(p) for p in rollout.prompts],
                                "completions": [dataclasses.asdict(c) for c in rollout.completions],
                                "rewards": rollout.rewards}))
                        logger.log(step + 1, metrics)
                        raise TrainingDiverged(
                            f"step {step + 1}: {nonfinite_streak} minibatch updates in a row had a non-finite loss or "
                            f"gradient (updates skipped); the last step's batch is saved in {saved}"
                        )
            else:
                metrics["actor/skipped_step_no_mixed_groups"] = 1
            metrics["time/sync_s"] = sync_weights(actor, engine, version=step + 1)
            metrics["time/rollout_s"] = t_rollout
            metrics["time/step_s"] = time.perf_counter() - t0
            last = step + 1 == cfg.run.steps
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or last):
                metrics["eval/accuracy"] = run_eval(step + 1)
            elif last:
                metrics["eval/accuracy"] = run_eval(step + 1)
            logger.log(step + 1, metrics)
            if metrics.get("eval/accuracy") is not None:
                last_accuracy = metrics["eval/accuracy"]
            bar.set_postfix(reward=f"{metrics['rollout/reward']:.2f}", heldout_acc=f"{last_accuracy:.2f}")
            stopping = stop.agreed()
            timed_save = timed_saves.due()
            if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or last or stopping or timed_save:
                checkpointing.save(run_dir, actor, step + 1, {"step": step + 1, "cursor": cursor.state_dict()})
                timed_saves.saved()
            final = {**final, **metrics}
            if stopping and not last:
                if main:
                    print(f"megatron-nft: SIGTERM: stopped after step {step + 1} with a checkpoint; "
                          f"continue with run.resume=true", file=sys.stderr)
                final["stopped_at"] = step + 1
                return final
        if cfg.run.steps == start_step and start_step == 0:
            final["eval/accuracy"] = final.get("eval/accuracy_before")
        # an HF export of the final policy, loadable by transformers and SGLang
        tensors = actor.hf_tensors()
        if main:
            # one dtype throughout: on CPU megatron-core keeps RMSNorm weights in fp32 in bf16 models
            save_hf_checkpoint(run_dir / "hf", tensors, hf_config, tokenizer, dtype=actor.dtype, overwrite=True)
        else:
            for _ in tensors:
                pass
        if main:
            plot_run(logger.path, run_dir / "curves.png")
    finally:
        stop.uninstall()
        if engine is not None:
            engine.close()  # stops the servers it launched
        logger.close()
        if grader is not None:
            grader.close()
    return final
