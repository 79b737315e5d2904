"""A run's directory: checked against the run's inputs and its stored config before anything is
created or deleted; prepared for a new run, a resume or an overwrite; removed again when a start fails
before training begins.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_nft.checkpointing import step_dirs
from megatron_nft.config import TrainConfig, model_options
from megatron_nft.errors import CheckpointError, ConfigError
from megatron_nft.runtime import barrier, is_main_rank

def check_machine(cfg: TrainConfig) -> None:
    """What the config asks of this machine (Transformer Engine for model.impl=te or FP8): a
    ConfigError now, before a run directory exists, rather than from the actor later."""
    from megatron_nft.actor import DTYPES
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


def is_within(path: Path, root: Path) -> bool:
    """path is `root` or lies inside it (both resolved, so links and `..` do not hide it)."""
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def check_run_dir_against_inputs(cfg: TrainConfig) -> None:
    """A run directory must not be an input, nor lie inside one (the run writes into it); with
    run.overwrite it must not hold one either (it is deleted). One ConfigError names the pair."""
    run_dir = Path(cfg.run.dir)
    for name, path in run_inputs(cfg).items():
        if is_within(run_dir, path):
            raise ConfigError(f"run.dir={run_dir} lies inside {name}={path}: the run would write into its input; "
                              f"choose a run.dir outside it")
        if cfg.run.overwrite and is_within(path, run_dir):
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


def prepare_run_dir(cfg: TrainConfig, *, resumes_as: TrainConfig | None = None) -> tuple[Path, str | None]:
    """A new run gets a new directory; an existing one is only continued (run.resume) or replaced
    (run.overwrite) when asked. Everything is checked before anything is created or deleted. Returns
    the directory and what this start made of it (for remove_failed_start).
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
    # A start that fails may clean up only what it made: the directory when it created it (or
    # replaced it, with run.overwrite), only the contents when the user had made it empty beforehand
    # (a mount point, say); nothing in a resumed run.
    made = "directory" if (not run_dir.exists() or (cfg.run.overwrite and exists)) else None if exists else "contents"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, made


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def remove_failed_start(run_dir: Path, made: str | None) -> None:
    """After a start that failed before training began (no config.yaml yet): remove what it made (see
    prepare_run_dir), so that the corrected command can run. check_run_dir_against_inputs keeps every
    input out of such a directory."""
    import shutil

    if made is None or not is_main_rank() or not run_dir.is_dir() or (run_dir / "config.yaml").exists():
        return
    if made == "directory":
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for child in list(run_dir.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()
