"""Run checkpoints: written atomically, verified before use, the newest good one resumed.

A checkpoint is `RUN/checkpoints/step_NNNNNN/` holding the actor (megatron-core torch_dist: model,
optimizer, scheduler), `trainer_state.json` (step, data cursor), one `rng_rank<R>.json` per rank (python
and torch generator states) and `manifest.json`, written last, listing every file with its size and
CRC-32. It is assembled under `step_NNNNNN.tmp/` and renamed, so a crash leaves either a complete
checkpoint or a `.tmp` directory that is ignored. On resume the newest checkpoint whose files match
their manifest (sizes, then checksums, the files shared out between the ranks) and that loads is used;
every one that does not is reported with its reason and the one before it tried.

Nothing here unpickles: the run state is JSON, the torch_dist index is checked by checkpoint_trust
before torch reads it.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nft.errors import CheckpointError
from megatron_nft.runtime import any_rank, barrier, broadcast_object, gather_objects, is_main_rank

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_CHUNK = 16 * 1024**2


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def step_dirs(run_dir: Path) -> list[Path]:
    """Every `step_N` directory (complete or not; `.tmp` ones excluded), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints with a manifest (i.e. whose writing finished), oldest first."""
    return [p for p in step_dirs(run_dir) if (p / MANIFEST).is_file()]


def crc32(path: Path) -> int:
    value = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _my_share(names: list[str]) -> list[str]:
    """This rank's files to checksum: every rank reads a slice of the checkpoint, not rank 0 all of it."""
    return [n for i, n in enumerate(sorted(names)) if i % _world() == _rank()]


def _rng_state() -> dict:
    return {
        "python": json.loads(json.dumps(random.getstate())),  # (version, 625 ints, gauss) as lists
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def save(run_dir: Path, actor, step: int, trainer_state: dict, main_rank_files: dict[str, bytes] | None = None) -> Path:
    """Every rank calls this; returns the checkpoint directory. `main_rank_files` (name -> bytes, rank 0's)
    are written beside the trainer state and checksummed with the rest."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if is_main_rank():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "actor").mkdir(parents=True)
    barrier()
    actor.save_checkpoint(tmp / "actor")
    (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(_rng_state()))
    if is_main_rank():
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
        for name, data in (main_rank_files or {}).items():
            (tmp / name).write_bytes(data)
    barrier()
    names = broadcast_object(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) if is_main_rank() else None)
    sums = {}
    for part in gather_objects({n: crc32(tmp / n) for n in _my_share(names)}):
        sums.update(part)
    if is_main_rank():
        files = {n: {"bytes": (tmp / n).stat().st_size, "crc32": sums[n]} for n in names}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():
            # a checkpoint of this step from before a fall-back: replaced only once the new one is whole
            old = final.with_name(final.name + ".replaced.tmp")
            final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old)
        else:
            tmp.replace(final)
    barrier()
    return final


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be trusted (no manifest, a missing or resized file), or None when every
    file has its manifest size. Checksums are `checksum_problem`'s (shared out between the ranks)."""
    if not (checkpoint / MANIFEST).is_file():
        return f"no {MANIFEST} (its writing never finished, or the file was deleted)"
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    if not isinstance(files, dict):
        return f"{MANIFEST} lists no file sizes (written by an older version)"
    for name, entry in files.items():
        size = entry["bytes"] if isinstance(entry, dict) else entry  # older manifests: sizes only
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    if not any(name.startswith("rng_rank") and name.endswith(".json") for name in files):
        return "no rng_rank*.json (written by an older version, whose pickled RNG files are not loaded)"
    return None


def checksum_problem(checkpoint: Path) -> str | None:
    """This rank's share of the checksum check (call `problem` first: it vouches for the manifest)."""
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    for name in _my_share([n for n, e in files.items() if isinstance(e, dict) and "crc32" in e]):
        if crc32(checkpoint / name) != files[name]["crc32"]:
            return f"{name} does not match its checksum (a changed or damaged byte)"
    return None


def _first(reasons: list) -> str | None:
    return next((r for r in reasons if r is not None), None)


def load_latest(run_dir: Path, actor) -> tuple[Path, dict]:
    """Loads the newest good checkpoint into `actor` and this rank's RNG states; returns (its
    directory, its trainer state). Raises CheckpointError when there is none to use, naming what was
    found. Every rank calls this and they agree on the checkpoint: rank 0 checks the manifest, every
    rank a share of the checksums, and a load that fails on any rank moves all to the previous one."""
    candidates = step_dirs(run_dir)
    reasons: list[str] = []
    for checkpoint in reversed(candidates):
        reason = broadcast_object(problem(checkpoint) if is_main_rank() else None)
        if reason is None:
            reason = _first(gather_objects(checksum_problem(checkpoint)))
        if reason is None:
            try:
                actor.load_checkpoint(checkpoint / "actor")
                state = json.loads((checkpoint / TRAINER_STATE).read_text())
                rng = json.loads((checkpoint / f"rng_rank{_rank()}.json").read_text())
            except CheckpointError as e:
                reason = str(e)
            # torch's CheckpointException (a corrupt shard) derives from BaseException, not Exception
            except (Exception, _checkpoint_exception()) as e:  # noqa: BLE001 - fall back, saying why
                reason = f"cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            reason = _first(gather_objects(reason))
        if reason is None:
            _set_rng_state(rng)
            return checkpoint, state
        reasons.append(f"{checkpoint.name}: {reason}")
        if is_main_rank():
            print(f"megatron-nft: skipping checkpoint {checkpoint}: {reason}", file=sys.stderr)
    root = Path(run_dir) / "checkpoints"
    if not candidates:
        raise CheckpointError(f"run.resume=true but {root} holds no checkpoint to resume from; nothing was changed "
                              f"(start again with run.overwrite=true, or choose another run.dir)")
    raise CheckpointError(f"run.resume=true but none of the {len(candidates)} checkpoints in {root} can be used "
                          f"({'; '.join(reasons)}); nothing was changed")


def _checkpoint_exception():
    from torch.distributed.checkpoint import CheckpointException

    return CheckpointException


def _as_tuple(state):
    """random.setstate wants tuples where JSON hands back lists."""
    return tuple(_as_tuple(x) for x in state) if isinstance(state, (list, tuple)) else state


# --------------------------------------------------------------------------------------------------
# the run's checkpointer: what a start restores, when a step is saved
# --------------------------------------------------------------------------------------------------


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


def load_megatron_weights(actor, directory: str) -> None:
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


class Checkpointer:
    """Owns the run's state on disk: the actor's checkpoint (model, optimizer, scheduler), the data
    cursor, the RNG states and the step. `restore` starts a run (the newest checkpoint on resume, else
    the initial weights); `due` decides when a step is saved (every run.save_every steps, every
    run.save_every_minutes of wall time, the last step, a stop); `save` writes one."""

    def __init__(self, run_cfg, run_dir: Path, actor, cursor, *, clock=time.monotonic):
        self.run_cfg, self.run_dir, self.actor, self.cursor = run_cfg, Path(run_dir), actor, cursor
        self.timed = TimedSaves(run_cfg.save_every_minutes, clock=clock)
        self.restored_from: Path | None = None  # the checkpoint a resumed run started from

    def restore(self, load_initial_weights) -> int:
        """The step to start from: the resumed checkpoint's, or 0 after `load_initial_weights()`."""
        if not self.run_cfg.resume:
            load_initial_weights()
            return 0
        self.restored_from, state = load_latest(self.run_dir, self.actor)
        self.cursor.load_state_dict(state["cursor"])
        return state["step"]

    def due(self, step: int, *, last: bool, stopping: bool) -> bool:
        """Whether to save after `step` (1-based). Every rank calls it: the timed rule all-reduces."""
        every = self.run_cfg.save_every
        timed = self.timed.due()
        return bool((every and step % every == 0) or last or stopping or timed)

    def save(self, step: int, main_rank_files: dict[str, bytes] | None = None) -> Path:
        path = save(self.run_dir, self.actor, step, {"step": step, "cursor": self.cursor.state_dict()}, main_rank_files)
        self.timed.saved()
        return path
