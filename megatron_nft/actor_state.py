"""The actor's state that megatron-core's torch_dist checkpoint does not hold: `actor_state.json`
beside it, with the update count, torch Adam's step count and the learning-rate scheduler.

Written by Actor.save_checkpoint (a training checkpoint) and by checkpoints_tools.hf_to_megatron (an
imported model: no update taken, no optimizer state); read back before any tensor is loaded, so a
damaged file is reported before megatron-core reads the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_nft import megatron_workarounds
from megatron_nft.errors import CheckpointError

FILE = "actor_state.json"


@dataclass(frozen=True)
class ActorState:
    steps: int = 0  # optimizer updates taken (skipped non-finite updates not counted)
    adam_step: int | None = None  # torch Adam's step count; None: weights only, no optimizer state
    scheduler: dict | None = None  # OptimizerParamScheduler.state_dict(); None with adam_step

    @property
    def has_optimizer(self) -> bool:
        return self.adam_step is not None

    @classmethod
    def capture(cls, *, steps: int, optimizer, scheduler) -> ActorState:
        """The state of a training actor, for a checkpoint written after its optimizer state exists."""
        return cls(steps=steps, adam_step=megatron_workarounds.adam_step(optimizer), scheduler=scheduler.state_dict())

    def restore_optimizer(self, optimizer, scheduler) -> None:
        """After megatron-core loaded the optimizer: Adam's per-parameter step counts and the scheduler."""
        megatron_workarounds.restore_adam_steps(optimizer, self.adam_step)
        scheduler.load_state_dict(self.scheduler)

    def write(self, directory: str | Path) -> None:
        fields = {"steps": self.steps}
        if self.has_optimizer:
            fields.update(adam_step=self.adam_step, scheduler=self.scheduler)
        (Path(directory) / FILE).write_text(json.dumps(fields))

    @classmethod
    def read(cls, directory: str | Path, *, with_optimizer: bool) -> ActorState:
        """The state saved in `directory`; a CheckpointError naming the file and the field when it is
        missing, unreadable, or lacks the optimizer's part that `with_optimizer` needs."""
        path = Path(directory) / FILE
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (not a checkpoint written by megatron-nft)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(fields, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(fields).__name__}")
        steps = fields.get("steps")
        if not _count(steps):
            raise CheckpointError(f"{path}: steps={steps!r}, expected a non-negative integer")
        if not with_optimizer:
            return cls(steps=steps)
        adam, scheduler = fields.get("adam_step"), fields.get("scheduler")
        if adam is None and scheduler is None:
            raise CheckpointError(f"{path}: no optimizer state (weights only, e.g. from hf_to_megatron): "
                                  f"load it without the optimizer (model.megatron_ckpt)")
        if not _count(adam):
            raise CheckpointError(f"{path}: adam_step={adam!r}, expected a non-negative integer")
        if not isinstance(scheduler, dict):
            raise CheckpointError(f"{path}: scheduler={scheduler!r}, expected the scheduler's state (an object)")
        return cls(steps=steps, adam_step=adam, scheduler=scheduler)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
