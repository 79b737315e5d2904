"""Typed configuration: one dataclass per concern, YAML recipes, dotted command-line overrides.

OmegaConf structured configs do the merging and the type checks (an int where a float is expected,
an unknown key); this module adds the allowed-value checks and the cross-field checks, and turns every
failure into one line naming the key. A config is built once, validated, and never mutated afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_nft.algorithms import ADV_STDS, AGGREGATIONS, MAX_LOG_RATIO, PROMPT_WEIGHTS, RHAT_CLAMP
from megatron_nft.algorithms import DEFAULT as DEFAULT_ALGORITHM
from megatron_nft.algorithms import algorithm, algorithms, is_algorithm, names
from megatron_nft.errors import ConfigError
from megatron_nft.model.qwen2 import FP8_FORMATS, FP8_RECIPES, IMPLEMENTATIONS, PACKED_ATTENTION, RECOMPUTE, ModelOptions
from megatron_nft.reward import ANSWER_FORMATS

TEMPLATES = ("dapo", "boxed", "raw")
DTYPES = ("fp32", "bf16", "fp16")
# local: the CPU engine in the trainer process; local_http: that engine behind SGLang's HTTP API in
# server processes; sglang: SGLang servers (GPU). See megatron_nft.rollout.make_engine.
ENGINES = ("local", "local_http", "sglang")
WEIGHT_TRANSPORTS = ("disk", "nccl", "cuda_ipc")
# sync: generate, then train (the engine idles while the actor trains); async: the next steps' answers
# are generated while this step trains (megatron_nft/async_rollouts.py)
ROLLOUT_MODES = ("sync", "async")
TASKS = ("arithmetic", "jsonl")


def choice(default, allowed):
    return field(default=default, metadata={"choices": allowed})


@dataclass
class ModelConfig:
    """The policy. `hf_path` is a Hugging Face Qwen2 checkpoint directory; without one the run builds a
    small random Qwen2 of the shape below (the embedded CPU default) with its own trained tokenizer."""

    hf_path: str | None = None
    # A megatron-core checkpoint converted from hf_path (python -m checkpoints_tools.hf_to_megatron):
    # the weights are loaded from it, the config and tokenizer from hf_path.
    megatron_ckpt: str | None = None
    dtype: str = choice("fp32", DTYPES)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    vocab_size: int = 384  # size of the BPE tokenizer trained for the embedded task
    # How the Megatron model executes (megatron_nft.model.qwen2.ModelOptions): "te" = Transformer Engine
    # layers (CUDA + TE), "local" = megatron-core's own; "auto": te where it can run
    impl: str = choice("auto", IMPLEMENTATIONS)
    packed_attention: str = choice("auto", PACKED_ATTENTION)  # local impl: flex (GPU) | dense (CPU) | auto
    fp8: str | None = choice(None, (None, *FP8_FORMATS))  # null | hybrid | e4m3 (needs impl te, dtype bf16)
    fp8_recipe: str = choice("delayed", FP8_RECIPES)
    fp8_bf16_layers: int = 0  # under fp8: this many layers at each end of the model stay bf16

    def random_shape(self):
        """The Qwen2Shape of the random model built from the fields above when hf_path is unset (the
        demo; the planner too). Rope and norm constants are the demo's (transformers' Qwen2 defaults)."""
        from megatron_nft.model.qwen2 import Qwen2Shape

        return Qwen2Shape(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                          num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                          head_dim=self.hidden_size // self.num_heads, rope_theta=1e6, rms_norm_eps=1e-6,
                          max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel (zigzag over 2*cp chunks per sequence); needs max_tokens_per_micro_batch
    micro_batch_size: int = 64  # rows per micro-batch on the right-padded path
    # Packed (THD) micro-batches of at most this many tokens, balanced over DP ranks; None: padded rows
    max_tokens_per_micro_batch: int | None = None
    # activation recompute: none | core_attn | mlp (Megatron's selective) | full (every layer, uniform)
    recompute: str = choice("none", RECOMPUTE)

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model: tp * pp * cp."""
        return self.tp * self.pp * self.cp

    def check_world(self, world: int, world_name: str, hint: str = "") -> None:
        """A world of `world` ranks (`world_name` says whose: WORLD_SIZE, --gpus, a launch's nodes x
        GPUs) holds whole model copies; the one home of this rule (preflight, launch and plan ask here)."""
        n = self.model_parallel_size
        if world < 1 or world % n:
            raise ConfigError(f"{world_name} is not a multiple of parallel.tp={self.tp} x parallel.pp={self.pp} x "
                              f"parallel.cp={self.cp} = {n} (the ranks of one model copy){hint}")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float | None = None  # None: constant after warm-up (the paper); else cosine to min_lr
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class AlgoConfig:
    """The policy loss (see algorithms.policy_loss) and the batch it sees. Switching algorithm is
    `algo.name`; fields left at None take that algorithm's own setting (its default_agg,
    dynamic_sampling, default_prompt_weight: megatron_nft/algorithms/<name>.py) when the config is
    loaded. docs/fidelity.md: how each option compares with the official NFT code and verl."""

    name: str = choice(DEFAULT_ALGORITHM, names())
    # ω(q) of the NFT losses; None: the algorithm's own (nft 1 - r̂; rft 1, the official scripts' is 1 - r̂)
    prompt_weight: str | None = choice(None, (None, *PROMPT_WEIGHTS))
    eps: float = 1.0  # NFT's floor on the negative ratio term (the straight-through max_v)
    clip_low: float = 0.2  # GRPO family: PPO clip [1 - clip_low, 1 + clip_low]
    clip_high: float = 0.28  # DAPO's clip-higher: [1 - clip_low, 1 + clip_high]
    agg: str | None = choice(None, AGGREGATIONS)
    agg_norm: float = 1000.0
    num_minibatches: int = 16
    dynamic_sampling: bool | None = None  # keep only groups with 0 < mean reward < 1 (DAPO)
    beta: float = 0.1  # InfoNCA / DPO: β on the sequence log-ratio to the iteration's start policy
    sft_coef: float = 1.0  # InfoNCA: λ on the length-normalised NLL of the right answers
    target_temperature: float = 0.0  # InfoNCA: targets softmax(r / α); 0 = uniform over the right answers
    # Token-level truncated importance sampling for rollout / actor mismatch: each token's loss weighted
    # by min(π_actor_old / π_rollout, tis_cap); None = off (identical engines need none).
    tis_cap: float | None = None
    adv_std: str = choice("unbiased", ADV_STDS)  # GRPO/DAPO's group std: verl's torch.std (K-1) or population (K)
    max_log_ratio: float | None = MAX_LOG_RATIO  # NFT losses: log R capped, no gradient beyond (official: 10); null: off
    rhat_clamp: float = RHAT_CLAMP  # NFT losses: r̂ of mixed groups clamped to [c, 1 - c] (official: 0.02); 0: off
    # The official FSDP trainer averages gradients over its W data-parallel ranks: its loss is
    # Σ / (agg_norm · W). token_sum_norm divides by agg_norm · reference_dp_world to reproduce it.
    reference_dp_world: int = 1

    def resolved(self) -> "AlgoConfig":
        """This config with the algorithm's own settings in the fields left at None."""
        own = algorithm(self.name)
        return dataclasses.replace(
            self,
            agg=own.default_agg if self.agg is None else self.agg,
            dynamic_sampling=own.dynamic_sampling if self.dynamic_sampling is None else self.dynamic_sampling,
            prompt_weight=own.default_prompt_weight if self.prompt_weight is None else self.prompt_weight,
        )


@dataclass
class RolloutConfig:
    engine: str = choice("local", ENGINES)
    mode: str = choice("sync", ROLLOUT_MODES)
    # async: at most this many weight versions between the policy that sampled an answer and the one
    # that trains on it (0: none, i.e. no overlap: the sync path's numbers through the async machinery)
    max_staleness: int = 1
    prompts_per_step: int = 512  # N: prompts in one training batch
    samples_per_prompt: int = 16  # K: answers per prompt
    gen_prompts: int = 768  # prompts sampled per generation round (>= prompts_per_step)
    max_num_gen_batches: int = 4  # generation rounds before training on what was kept
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 3584
    # HTTP engines (local_http, sglang): attach to `urls`, or launch `num_servers` when it is empty
    urls: list[str] = field(default_factory=list)
    num_servers: int = 1
    server_tp_size: int = 1  # sglang --tp-size (GPUs per server)
    server_dp_size: int = 1  # sglang --dp-size (replicas per server); nccl / cuda_ipc transports need 1
    server_gpus: list[int] = field(default_factory=list)  # launched sglang servers' GPUs; []: those after the trainer's
    server_deterministic: bool = True  # --enable-deterministic-inference: SGLang honours sampling seeds only with it
    server_mem_fraction: float = 0.8  # sglang --mem-fraction-static
    server_base_port: int = 0  # 0: free ports
    server_args: list[str] = field(default_factory=list)  # extra launch flags, passed through
    sglang_python: str | None = None  # interpreter with sglang (the image's /opt/sglang/bin/python); None: this one
    server_start_timeout_s: float = 1800.0
    max_concurrency: int = 64  # /generate requests in flight per server
    request_timeout_s: float = 3600.0  # per-request deadline; then retried, then the server dropped
    max_retries: int = 3
    weight_transport: str = choice("disk", WEIGHT_TRANSPORTS)
    weight_sync_dir: str | None = None  # disk transport; None: <run.dir>/weight_sync (must be shared)
    weight_bucket_mb: int = 512
    nccl_master_address: str = "127.0.0.1"  # nccl transport: this trainer's address as servers see it
    nccl_master_port: int = 0  # 0: a free port


@dataclass
class DataConfig:
    task: str = choice("arithmetic", TASKS)
    train_path: str | None = None
    eval_path: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    template: str = choice("dapo", TEMPLATES)
    chat: bool = False
    max_prompt_len: int = 512
    # the embedded arithmetic task
    seed: int | None = None  # the train / held-out split; None: run.seed (fix it to compare RL seeds on one split)
    n_train: int = 4000
    n_eval: int = 200
    max_operand: int = 30


@dataclass
class RewardConfig:
    answer_format: str = choice("auto", ANSWER_FORMATS)
    timeout_s: float = 5.0
    workers: int | None = None
    # DAPO's over-long shaping (reward/shaping.py): a penalty rising to `overlong_penalty` over the last
    # `overlong_buffer` tokens of rollout.max_new_tokens; 0 = off; None = on for dapo (a fifth of the
    # budget, DAPO's 4096 of 20480), off otherwise.
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0


@dataclass
class EvalConfig:
    every: int = 5  # evaluate held-out accuracy every N steps (0: only before and after training)
    samples: int = 4  # answers per held-out problem (avg@k)
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class WarmupConfig:
    """Supervised warm-up on reference answers before RL (the embedded task only): it gives the random
    model a nonzero pass rate, which NFT needs (all-wrong groups carry no signal)."""

    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 64


@dataclass
class RunConfig:
    dir: str = "runs/nft"
    seed: int = 1234
    steps: int = 100
    save_every: int = 0  # 0: a checkpoint at the end only
    # also a checkpoint once this much wall time has passed since the last one (0: off): a step can
    # take hours, and a job's time limit or a node failure should not cost more than this much work
    save_every_minutes: float = 0.0
    wandb_project: str | None = None  # log metrics to this Weights & Biases project too (needs wandb)
    resume: bool = False
    overwrite: bool = False
    max_nonfinite_updates: int = 3  # this many NaN/Inf minibatch losses in a row stop the run


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- YAML recipe <- `section.key=value` overrides, then validation."""
    layers = _recipe_layers(Path(recipe), ()) if recipe is not None else []
    layers += [override_layer(item) for item in overrides]
    cfg: TrainConfig = resolve_defaults(merge_layers(TrainConfig, layers))
    validate(cfg)
    return cfg


def override_layer(item: str, expected: str = "section.key=value, e.g. algo.eps=0.5") -> tuple[str, Any]:
    """(origin, layer) of one dotted `key=value` override; its value is parsed as YAML."""
    from omegaconf import OmegaConf

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected {expected}")
    try:  # `algo.eps=[0.5` is a yaml.YAMLError, not an OmegaConf one
        return f"override {item!r}", OmegaConf.from_dotlist([item])
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError and friends: bad input, not a crash
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None


def read_yaml(path: Path, origin: str):
    """A YAML file as an OmegaConf node; one line naming `origin` when it is missing or not YAML."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ConfigError(f"{origin}: no such file")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends, with their own line/column
        raise ConfigError(f"{origin}: not valid YAML: {' '.join(str(e).split())}") from None


def merge_layers(schema: type, layers: list[tuple[str, Any]]) -> Any:
    """schema's defaults <- each (origin, layer) in order, as a schema instance: the one merge loop of
    the training config and the launch settings. OmegaConf type-checks every value; a failure is one
    ConfigError naming the layer and the key (an unknown key with the keys its section allows)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(schema)
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{origin}: {_explain(e, schema)}") from None
    try:  # interpolations (`${...}`) resolve here, not at merge
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{_explain(e, schema)} (an interpolation in the recipe or an override)") from None


def stated_value(recipe: str | Path | None, overrides: list[str], key: str) -> Any:
    """The value a recipe (with its bases) and overrides give the dotted `key`, or None where none of
    them sets it (the dataclass default applies): what a run states, as opposed to what it defaults to."""
    from omegaconf import OmegaConf

    layers = _recipe_layers(Path(recipe), ()) if recipe is not None else []
    layers += [override_layer(item) for item in overrides if item.split("=", 1)[0] == key]
    merged = OmegaConf.merge(OmegaConf.create(), *[layer for _, layer in layers]) if layers else OmegaConf.create()
    return OmegaConf.select(merged, key, default=None)


def _recipe_layers(path: Path, seen: tuple[Path, ...]) -> list:
    """A recipe's layers, its `base:` recipes first (a path or a list of paths, relative to the recipe;
    later ones override earlier ones, the recipe itself overrides them all)."""
    from omegaconf import DictConfig, ListConfig

    if path.resolve() in seen:
        raise ConfigError(f"recipe {path}: `base:` includes itself ({' -> '.join(map(str, seen))})")
    loaded = read_yaml(path, f"recipe {path}" + (f" (base of {seen[-1]})" if seen else ""))
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"recipe {path}: expected a mapping of sections (model:, algo:, ...)")
    bases = loaded.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, ListConfig) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"recipe {path}: base must be a recipe path or a list of them")
    layers = []
    for base in bases:
        layers += _recipe_layers(path.parent / base, (*seen, path.resolve()))
    return layers + [(f"recipe {path}", loaded)]


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fills the fields whose default depends on the algorithm (left at None); done once, at load."""
    if not is_algorithm(cfg.algo.name):
        return cfg  # validate() names the bad value
    algo = cfg.algo.resolved()
    buffer = cfg.reward.overlong_buffer
    if buffer is None:
        buffer = int(algorithm(algo.name).overlong_buffer_fraction * cfg.rollout.max_new_tokens)
    data = dataclasses.replace(cfg.data, seed=cfg.run.seed if cfg.data.seed is None else cfg.data.seed)
    return dataclasses.replace(cfg, algo=algo, data=data, reward=dataclasses.replace(cfg.reward, overlong_buffer=buffer))


def _explain(e, schema: type) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).split("\n")[0]
    if type(e).__name__ == "ConfigKeyError":
        section = key.rsplit(".", 1)[0] if "." in key else None
        allowed = _field_names(schema, section)
        return f"unknown key '{key}'" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    return f"{key}: {msg}"


def _field_names(schema: type, section: str | None) -> list[str]:
    obj: Any = schema()
    for part in section.split(".") if section else []:
        obj = getattr(obj, part, None)
    return [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []


def _check_choices(obj, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name}={value!r}: allowed values are {', '.join('null' if c is None else str(c) for c in f.metadata['choices'])}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_finite(obj, prefix: str) -> None:
    """No float setting has a meaning at inf or nan (YAML reads `.inf`, `inf` and `nan` as floats), and
    no string setting when empty."""
    import math

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}={value}: expected a finite number")
        elif isinstance(value, str) and not value.strip():  # a path '' would silently mean the working directory
            raise ConfigError(f"{prefix}{f.name} is empty: expected a value (or null where that is allowed)")


def _check_list_items(obj, prefix: str) -> None:
    """OmegaConf lets `rollout.urls=[[1]]` through to the object; every item must have the list's type."""
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_list_items(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is list and isinstance(value, list):
            (item_type,) = typing.get_args(hints[f.name])
            for item in value:
                if not isinstance(item, item_type) or isinstance(item, bool):
                    raise ConfigError(f"{prefix}{f.name}: item {item!r} is not a {item_type.__name__}")


def _validate_ranges(cfg: TrainConfig) -> None:
    """Single-field ranges that the cross-field checks below do not cover: each would otherwise be
    accepted and fail (or silently mean something else) deep inside a run."""
    o, r, d, rw, ev, w, run, m = cfg.optim, cfg.rollout, cfg.data, cfg.reward, cfg.eval, cfg.warmup, cfg.run, cfg.model
    _require(o.min_lr is None or 0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr}: must be in [0, optim.lr={o.lr}] or null")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(o, key)
        _require(0 <= value < 1, f"optim.{key}={value}: must be in [0, 1)")
    _require(o.adam_eps > 0, f"optim.adam_eps={o.adam_eps}: must be > 0")
    _require(o.grad_clip > 0, f"optim.grad_clip={o.grad_clip}: must be > 0 (gradient clipping is always on)")
    _require(run.save_every >= 0, f"run.save_every={run.save_every}: must be >= 0 (0: a checkpoint at the end only)")
    _require(run.save_every_minutes >= 0, f"run.save_every_minutes={run.save_every_minutes}: must be >= 0 (0: off)")
    _require(run.seed >= 0, f"run.seed={run.seed}: must be >= 0")
    _require(ev.every >= 0, f"eval.every={ev.every}: must be >= 0 (0: only before and after training)")
    _require(ev.temperature > 0, f"eval.temperature={ev.temperature}: must be > 0")
    _require(0 < ev.top_p <= 1, f"eval.top_p={ev.top_p}: must be in (0, 1]")
    _require(rw.timeout_s > 0, f"reward.timeout_s={rw.timeout_s}: must be > 0 (seconds per answer)")
    _require(rw.workers is None or rw.workers >= 1, f"reward.workers={rw.workers}: must be >= 1 or null (all cores)")
    _require(d.max_prompt_len >= 1, f"data.max_prompt_len={d.max_prompt_len}: must be >= 1")
    _require(d.seed is None or d.seed >= 0, f"data.seed={d.seed}: must be >= 0 or null (run.seed)")
    _require(d.n_train >= 1, f"data.n_train={d.n_train}: must be >= 1")
    _require(d.n_eval >= 0, f"data.n_eval={d.n_eval}: must be >= 0")
    _require(d.max_operand >= 1, f"data.max_operand={d.max_operand}: must be >= 1")
    _require(w.steps >= 0, f"warmup.steps={w.steps}: must be >= 0")
    _require(w.lr > 0, f"warmup.lr={w.lr}: must be > 0")
    _require(w.batch_size >= 1, f"warmup.batch_size={w.batch_size}: must be >= 1")
    _require(r.server_start_timeout_s > 0, f"rollout.server_start_timeout_s={r.server_start_timeout_s}: must be > 0")
    for key in ("server_base_port", "nccl_master_port"):
        port = getattr(r, key)
        _require(0 <= port <= 65535, f"rollout.{key}={port}: must be a TCP port in [0, 65535] (0: a free one)")
    _require(all(g >= 0 for g in r.server_gpus) and len(set(r.server_gpus)) == len(r.server_gpus),
             f"rollout.server_gpus={r.server_gpus}: expected distinct GPU indices >= 0")
    _require(m.fp8_bf16_layers >= 0, f"model.fp8_bf16_layers={m.fp8_bf16_layers}: must be >= 0")
    if m.hf_path is None:  # the shape of the random model built without a checkpoint (the demo)
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "max_position_embeddings"):
            _require(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)}: must be >= 1")
        _require(m.num_heads % m.num_kv_heads == 0, f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
        _require(m.hidden_size % m.num_heads == 0, f"model.hidden_size={m.hidden_size} is not a multiple of model.num_heads={m.num_heads}")


def validate(cfg: TrainConfig) -> None:
    _check_choices(cfg, "")
    _check_finite(cfg, "")
    _check_list_items(cfg, "")
    _validate_ranges(cfg)
    r, a, p, o = cfg.rollout, cfg.algo, cfg.parallel, cfg.optim
    _require(p.tp >= 1 and p.pp >= 1, "parallel.tp and parallel.pp must be >= 1")
    _require(p.micro_batch_size >= 1, "parallel.micro_batch_size must be >= 1")
    _require(p.cp >= 1, f"parallel.cp={p.cp}: must be >= 1")
    _require(
        p.max_tokens_per_micro_batch is None or p.max_tokens_per_micro_batch >= 1,
        f"parallel.max_tokens_per_micro_batch={p.max_tokens_per_micro_batch}: must be >= 1 or null",
    )
    _require(
        p.cp == 1 or p.max_tokens_per_micro_batch is not None,
        f"parallel.cp={p.cp} needs parallel.max_tokens_per_micro_batch: context parallel runs on packed sequences",
    )
    for message in algorithm(a.name).config_errors(cfg):  # the algorithm's own needs, before the generic checks below
        raise ConfigError(message)
    _require(r.samples_per_prompt >= 2, f"rollout.samples_per_prompt={r.samples_per_prompt}: group statistics need at least 2 answers per prompt")
    _require(r.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    _require(r.gen_prompts >= r.prompts_per_step, f"rollout.gen_prompts={r.gen_prompts} must be >= rollout.prompts_per_step={r.prompts_per_step}")
    _require(r.max_num_gen_batches >= 1, "rollout.max_num_gen_batches must be >= 1")
    _require(r.max_staleness >= 0, f"rollout.max_staleness={r.max_staleness}: must be >= 0 (weight versions)")
    _require(r.temperature > 0, f"rollout.temperature={r.temperature}: must be > 0")
    _require(0 < r.top_p <= 1, f"rollout.top_p={r.top_p}: must be in (0, 1]")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    _require(r.num_servers >= 1, f"rollout.num_servers={r.num_servers}: must be >= 1")
    _require(r.server_tp_size >= 1, f"rollout.server_tp_size={r.server_tp_size}: must be >= 1")
    _require(r.server_dp_size >= 1, f"rollout.server_dp_size={r.server_dp_size}: must be >= 1")
    _require(r.server_dp_size == 1 or r.weight_transport == "disk",
             f"rollout.weight_transport={r.weight_transport}: SGLang takes tensor and broadcast weight updates only from "
             f"--dp-size 1 servers, and rollout.server_dp_size={r.server_dp_size}; use rollout.weight_transport=disk")
    _require(0 < r.server_mem_fraction < 1, f"rollout.server_mem_fraction={r.server_mem_fraction}: must be in (0, 1)")
    _require(r.max_concurrency >= 1, f"rollout.max_concurrency={r.max_concurrency}: must be >= 1")
    _require(r.request_timeout_s > 0, f"rollout.request_timeout_s={r.request_timeout_s}: must be > 0")
    _require(r.max_retries >= 0, f"rollout.max_retries={r.max_retries}: must be >= 0")
    _require(r.weight_bucket_mb >= 1, f"rollout.weight_bucket_mb={r.weight_bucket_mb}: must be >= 1")
    for url in r.urls:
        _require(url.startswith(("http://", "https://")), f"rollout.urls: {url!r} is not an http(s):// URL")
    _require(not (r.urls and r.engine == "local"), "rollout.urls needs rollout.engine=local_http or sglang")
    _require(r.weight_transport == "disk" or r.engine == "sglang",
             f"rollout.weight_transport={r.weight_transport}: only rollout.engine=sglang (GPU servers) takes it; use disk")
    _require(a.num_minibatches >= 1, "algo.num_minibatches must be >= 1")
    _require(r.prompts_per_step % a.num_minibatches == 0, f"algo.num_minibatches={a.num_minibatches} must divide rollout.prompts_per_step={r.prompts_per_step}")
    _require(a.eps > 0, f"algo.eps={a.eps}: must be > 0")
    _require(0 <= a.clip_low < 1 and a.clip_high >= 0, "algo.clip_low must be in [0, 1) and algo.clip_high >= 0")
    _require(a.agg_norm > 0, "algo.agg_norm must be > 0")
    _validate_algorithm_combination(cfg)
    _require(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(cfg.run.steps >= 0, "run.steps must be >= 0")
    _require(cfg.run.max_nonfinite_updates >= 1, "run.max_nonfinite_updates must be >= 1")
    _require(cfg.eval.samples >= 1, "eval.samples must be >= 1")
    _require(not (cfg.run.resume and cfg.run.overwrite), "run.resume and run.overwrite exclude each other")
    _require(cfg.model.megatron_ckpt is None or cfg.model.hf_path is not None, "model.megatron_ckpt needs model.hf_path (its config and tokenizer)")
    model_options(cfg).check(bf16=cfg.model.dtype == "bf16")  # what the machine decides waits for the actor
    if cfg.data.task == "jsonl":
        _require(cfg.data.train_path is not None, "data.task=jsonl needs data.train_path")
        _require(cfg.model.hf_path is not None, "data.task=jsonl needs model.hf_path (a checkpoint with its tokenizer)")


def _validate_algorithm_combination(cfg: TrainConfig) -> None:
    """Settings that mean nothing (or something else) for the chosen algorithm are errors, before any
    work starts."""
    a, r, rw = cfg.algo, cfg.rollout, cfg.reward
    own = algorithm(a.name)
    _require(
        a.agg in own.aggregations,
        f"algo.agg={a.agg} does not apply to algo.name={a.name}: it takes {' or '.join(own.aggregations)} "
        f"({a.agg} is for {', '.join(x.name for x in algorithms() if a.agg in x.aggregations)})",
    )
    if a.tis_cap is not None:
        _require(a.tis_cap > 0, f"algo.tis_cap={a.tis_cap}: must be > 0 (or null to turn it off)")
        _require(not own.sequence_level,
                 f"algo.tis_cap weights per-token losses; algo.name={a.name} has a sequence-level loss (set algo.tis_cap=null)")
    buffer = rw.overlong_buffer or 0
    _require(buffer >= 0, f"reward.overlong_buffer={buffer}: must be >= 0")
    _require(rw.overlong_penalty >= 0, f"reward.overlong_penalty={rw.overlong_penalty}: must be >= 0")
    _require(a.max_log_ratio is None or a.max_log_ratio > 0, f"algo.max_log_ratio={a.max_log_ratio}: must be > 0 (or null: no cap)")
    _require(0 <= a.rhat_clamp < 0.5, f"algo.rhat_clamp={a.rhat_clamp}: must be in [0, 0.5) (0: off)")
    _require(a.reference_dp_world >= 1, f"algo.reference_dp_world={a.reference_dp_world}: must be >= 1")
    _require(
        a.reference_dp_world == 1 or a.agg == "token_sum_norm",
        f"algo.reference_dp_world={a.reference_dp_world} divides token_sum_norm's constant; algo.agg={a.agg} has none (set it to 1)",
    )
    if buffer:
        _require(
            own.shaped_rewards,
            f"reward.overlong_buffer={buffer}: over-long shaping makes rewards non-binary, which only "
            f"{', '.join(x.name for x in algorithms() if x.shaped_rewards)} accept; algo.name={a.name} needs r in {{0, 1}} "
            f"(set reward.overlong_buffer=0)",
        )
        _require(
            buffer < r.max_new_tokens,
            f"reward.overlong_buffer={buffer} must be smaller than rollout.max_new_tokens={r.max_new_tokens}",
        )


def model_options(cfg: TrainConfig) -> ModelOptions:
    """The actor's execution options ("auto" is decided by the Actor, for the machine it runs on)."""
    m = cfg.model
    return ModelOptions(impl=m.impl, packed_attention=m.packed_attention, fp8=m.fp8, fp8_recipe=m.fp8_recipe,
                        fp8_bf16_layers=m.fp8_bf16_layers, recompute=cfg.parallel.recompute)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
