"""Run checkpoints: written atomically, verified before use, the newest good one resumed.

A checkpoint is `RUN/checkpoints/step_NNNNNN/` holding the actor (megatron-core torch_dist: model,
optimizer, scheduler), `trainer_state.json` (step, data cursor), one `rng_rank<R>.pt` per rank (python
and torch generator states) and `manifest.json`, written last, listing every file with its size. It
is assembled under `step_NNNNNN.tmp/` and renamed, so a crash leaves either a complete checkpoint or a
`.tmp` directory that is ignored. On resume the newest checkpoint whose files match its manifest and
that loads is used; one that does not is reported and the one before it tried.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nft.runtime import any_rank, barrier, broadcast_object, is_main_rank

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints with a manifest (i.e. whose writing finished), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / MANIFEST).is_file())


def save(run_dir: Path, actor, step: int, trainer_state: dict) -> Path:
    """Every rank calls this; returns the checkpoint directory."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if is_main_rank():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "actor").mkdir(parents=True)
    barrier()
    actor.save_checkpoint(tmp / "actor")
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, tmp / f"rng_rank{_rank()}.pt")
    barrier()
    if is_main_rank():
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
    barrier()
    return final


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be trusted (a missing or truncated file), or None when it matches its manifest."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if not isinstance(files, dict):
        return f"{MANIFEST} lists no file sizes (written by an older version)"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def load_latest(run_dir: Path, actor) -> tuple[Path, dict] | None:
    """Loads the newest good checkpoint into `actor` and this rank's RNG states; returns (its
    directory, its trainer state), None when there is none, and raises CheckpointError when there are
    some but none is usable. Every rank calls this; they agree on
    the checkpoint (rank 0 checks the manifests; a load that fails on any rank moves all to the previous)."""
    candidates = checkpoint_dirs(run_dir)
    for checkpoint in reversed(candidates):
        reason = broadcast_object(problem(checkpoint) if is_main_rank() else None)
        if reason is None:
            try:
                actor.load_checkpoint(checkpoint / "actor")
                state = json.loads((checkpoint / TRAINER_STATE).read_text())
                rng = torch.load(checkpoint / f"rng_rank{_rank()}.pt", weights_only=False)
            except Exception as e:  # a corrupt shard, a truncated JSON: fall back, saying why
                reason = f"cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        if not any_rank(reason is not None):
            random.setstate(_as_tuple(rng["python"]))
            torch.set_rng_state(rng["torch"])
            return checkpoint, state
        if is_main_rank():
            print(f"megatron-nft: skipping checkpoint {checkpoint}: {reason or 'failed on another rank'}", file=sys.stderr)
    if candidates:
        from megatron_nft.errors import CheckpointError

        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: none of the {len(candidates)} checkpoints can be used (reasons above)")
    return None


def _as_tuple(state):
    """random.setstate wants tuples where torch.load may hand back lists."""
    return tuple(_as_tuple(x) for x in state) if isinstance(state, (list, tuple)) else state
