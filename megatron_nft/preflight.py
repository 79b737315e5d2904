"""Checks of a command's inputs against the machine and the files they name, before anything is created.

config.validate checks a config on its own; what needs the environment (the torchrun world) or the
files a config points at (an HF checkpoint's config, weights and tokenizer, data files, where the run
directory lies) is checked here, so that `train`, `demo` and `eval` refuse bad input in one line
before a run directory, an output folder or a worker process exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_nft.config import ModelConfig, TrainConfig
from megatron_nft.errors import CheckpointError, ConfigError, DataError

# What AutoTokenizer needs to build the checkpoint's tokenizer; without any of these transformers
# silently builds a tokenizer of one token and every prompt encodes to nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_world(cfg: TrainConfig) -> None:
    """The torchrun world must hold whole model copies (tp * pp * cp ranks each)."""
    p = cfg.parallel
    raw = os.environ.get("WORLD_SIZE")
    try:
        world = int(raw) if raw is not None else 1
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r}: expected a positive integer (torchrun sets it)") from None
    started = "1 rank (WORLD_SIZE unset: a plain process)" if raw is None else f"WORLD_SIZE={world}"
    p.check_world(world, started, f"; start it with torchrun --nproc-per-node {p.model_parallel_size} -m megatron_nft.cli ...")


def check_hf_model(hf_dir: str | os.PathLike, flag: str):
    """(transformers config, Qwen2Shape, tokenizer) of an HF checkpoint, after checking that its
    config, weights and tokenizer describe the same model. Every refusal names the file and the field."""
    from checkpoints_tools.common import check_hf_tensors, read_hf_config

    path = Path(hf_dir)
    config, shape = read_hf_config(path, flag)
    check_hf_tensors(path, shape)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{flag} {path}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)} beside config.json)"
        )
    tokenizer = load_tokenizer(path, flag)
    if len(tokenizer) > shape.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size={shape.vocab_size}: "
            f"token ids {shape.vocab_size}..{len(tokenizer) - 1} have no embedding row"
        )
    return config, shape, tokenizer


def load_tokenizer(path: Path, flag: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt tokenizer file surfaces as many exception types
        raise CheckpointError(f"{flag} {path}: transformers cannot load its tokenizer ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None


def check_context(max_new_tokens: int, context: int, setting: str, where: str) -> None:
    """A prompt needs at least one position besides the generated tokens; `setting` names the key or
    flag ("rollout.max_new_tokens=" or "--max-new-tokens ")."""
    if max_new_tokens >= context:
        raise ConfigError(
            f"{setting}{max_new_tokens} leaves no room for a prompt in the model's {context}-token context "
            f"({where}); expected at most {context - 1}"
        )


# model.* keys that shape the random model built without model.hf_path; with it, config.json does.
# Not model.vocab_size: it is the size the demo's tokenizer is trained towards, which the trained one
# may not reach (371 of 384 for recipes/demo.yaml), so a demo's own base would contradict its config.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "max_position_embeddings", "tie_word_embeddings")


def check_shape_keys(model, shape) -> None:
    """With model.hf_path the checkpoint's config.json is the model's shape and the model.* shape keys
    are not used: a key stated (set away from its default, by a recipe or an override) that the
    checkpoint contradicts would be silently ignored, so it is refused. A key equal to the checkpoint's
    value is accepted: a demo's saved config.yaml states its shape and trains on from its own base."""
    defaults = ModelConfig()
    for key in SHAPE_KEYS:
        stated, actual = getattr(model, key), getattr(shape, key)
        if stated != getattr(defaults, key) and stated != actual:
            raise ConfigError(
                f"model.{key}={stated}: not used with model.hf_path, whose {model.hf_path}/config.json gives "
                f"{key} {actual}; drop model.{key} (the checkpoint's shape is the model's) or give {actual}"
            )


def check_train(cfg: TrainConfig, *, demo: bool = False) -> None:
    """Everything `megatron-nft train` (or `demo`) can know to be wrong before prepare_run_dir."""
    check_world(cfg)
    from megatron_nft.run_dir import check_run_dir_against_inputs

    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir}: exists and is not a directory")
    if demo:  # the demo builds its model from the model.* shape
        m = cfg.model
        check_context(cfg.rollout.max_new_tokens, m.max_position_embeddings, "rollout.max_new_tokens=",
                      "model.max_position_embeddings")
        m.random_shape().check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    else:
        if cfg.model.hf_path is None:
            raise ConfigError("train needs model.hf_path (a Hugging Face Qwen2 checkpoint directory)")
        _, shape, _ = check_hf_model(cfg.model.hf_path, "model.hf_path")
        check_shape_keys(cfg.model, shape)
        check_context(cfg.rollout.max_new_tokens, shape.max_position_embeddings, "rollout.max_new_tokens=",
                      f"{cfg.model.hf_path}/config.json max_position_embeddings")
        shape.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    if cfg.model.megatron_ckpt is not None:
        if not (Path(cfg.model.megatron_ckpt) / "metadata.json").is_file():
            raise CheckpointError(f"model.megatron_ckpt={cfg.model.megatron_ckpt}: not a megatron-core checkpoint "
                                  "(no metadata.json)")
    if cfg.data.task == "jsonl":
        for key in ("train_path", "eval_path"):
            value = getattr(cfg.data, key)
            if value is not None and not Path(value).is_file():
                raise DataError(f"data.{key}={value}: no such file; expected a .jsonl or .parquet prompt file")
    check_run_dir_against_inputs(cfg)  # the rule prepare_run_dir applies, before anything is created
