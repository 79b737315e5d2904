"""Overlapped rollouts (rollout.mode=async): the answers of the next steps are generated while this
step trains, so the rollout servers and the actor work at the same time.

Weight versions: the actor holds version s while step s has not trained yet (version 0: the initial
weights), and the engine gets version s+1 at the end of step s. With `max_staleness` N, step s

    1. launches, on rank 0's generation thread, every step up to s+N not launched yet, all sampled by
       version s (the engine's weights do not change while they run);
    2. takes its own rollout, sampled by version s-N (or later, near the start);
    3. trains on it, while the thread generates;
    4. waits for what it launched, and computes those rollouts' old log-probs under version s,
       which the actor no longer holds: it kept a copy of its weights (`Actor.weights_snapshot`)
       before training and runs the forward with it swapped in;
    5. sends version s+1 to the engine (nothing is generating then).

π_old is therefore the policy that sampled the answers, computed by the actor itself with that
version's weights: the paper's implicit negative policy is defined on it, and the actor's own
forward keeps the train-time numerics (the engine's log-probs, from other kernels, are used as in
sync mode: only for `algo.tis_cap`). The price is one copy of each rank's weights during a step.
A rollout the actor can still score with its current weights (launched in the step that trains on
it: every step when N = 0, the first step otherwise) gets its old log-probs as in sync mode, so N = 0
runs the sync path's computation exactly, only through this machinery.

Between steps nothing is in flight: evaluation, checkpoints and SIGTERM see an idle engine. A
checkpoint holds the rollouts already generated for the coming steps, with their old log-probs
(`pending_rollouts.json` and `pending_old_logprobs.safetensors`, written by rank 0), so a resumed
run trains on exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_nft.collect import Prompt, RolloutCollector, StepRollout
from megatron_nft.rollout import Completion

PENDING_JSON = "pending_rollouts.json"
PENDING_TENSORS = "pending_old_logprobs.safetensors"


@dataclass
class ReadyRollout:
    """A step's rollout as the loop trains on it: which weight version sampled it, how long its
    collection took (generation and grading, on the thread), and its old log-probs once the actor has
    computed them under that version (None: the actor still holds that version): on rank 0, one per
    response token with rows end to end, gathered from the ranks that hold the rows (sharded_train);
    [B, S] in checkpoints written before that layout (still read)."""

    step: int
    rollout: StepRollout
    version: int
    collect_s: float
    old_logprobs: torch.Tensor | None = None


class _Generation:
    """One background thread that collects a list of steps in order; `result(step)` waits for one."""

    def __init__(self, collector: RolloutCollector, steps: list[int], version: int):
        self.results: dict[int, ReadyRollout] = {}
        self.error: BaseException | None = None
        self.done = {s: threading.Event() for s in steps}
        self.untaken = list(steps)
        # A daemon: a failing trainer exits without waiting for generation it will never use.
        self.thread = threading.Thread(target=self._run, args=(collector, steps, version), daemon=True,
                                       name="megatron-nft-rollouts")
        self.thread.start()

    def _run(self, collector, steps, version):
        try:
            for step in steps:
                started = time.perf_counter()
                rollout = collector.collect(step)
                self.results[step] = ReadyRollout(step, rollout, version, time.perf_counter() - started)
                self.done[step].set()
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by result()
            self.error = e
            for event in self.done.values():
                event.set()

    def result(self, step: int) -> ReadyRollout:
        self.done[step].wait()
        self.untaken.remove(step)
        if step not in self.results:
            raise RuntimeError(f"generating the rollout of step {step + 1} failed") from self.error
        return self.results.pop(step)


class AsyncRollouts:
    """The queue of rollouts ahead of training. Every rank holds one and calls `launch` with the same
    arguments, so all agree on which steps are in flight (and so on whether a weights snapshot is
    needed); only rank 0 has a collector, runs the thread and holds the rollouts themselves."""

    def __init__(self, collector: RolloutCollector | None, *, max_staleness: int, last_step: int, start_step: int,
                 ready: dict[int, ReadyRollout], ready_count: int):
        self.collector, self.max_staleness, self.last_step = collector, max_staleness, last_step
        self.ready = ready  # rank 0: step -> ReadyRollout, generated and scored
        self.launched = start_step + ready_count  # the first step not launched yet (every rank)
        self.generation: _Generation | None = None
        self.waited_s = 0.0  # this step's seconds of the training thread blocked on generation

    def launch(self, step: int, version: int) -> list[int]:
        """Launches the steps from the first not launched through step + max_staleness (never past the
        run's last) on the engine's current weights, `version`; returns them (every rank)."""
        steps = list(range(self.launched, min(step + self.max_staleness, self.last_step) + 1))
        self.launched += len(steps)
        self.waited_s = 0.0
        if steps and self.collector is not None:
            self.generation = _Generation(self.collector, steps, version)
        return steps

    def take(self, step: int) -> ReadyRollout:
        """Rank 0: step `step`'s rollout, waiting for it if it is still being generated."""
        if step in self.ready:
            return self.ready.pop(step)
        started = time.perf_counter()
        ready = self.generation.result(step)
        self.waited_s += time.perf_counter() - started
        return ready

    def finish(self) -> list[ReadyRollout]:
        """Rank 0: waits for every step launched in this step and not taken yet, in step order."""
        if self.generation is None:
            return []
        started = time.perf_counter()
        finished = [self.generation.result(s) for s in list(self.generation.untaken)]
        self.generation.thread.join()
        self.generation = None
        self.waited_s += time.perf_counter() - started
        return finished

    def keep(self, rollouts: list[ReadyRollout]) -> None:
        """Rank 0: rollouts scored by the actor, for the steps that will train on them."""
        for ready in rollouts:
            self.ready[ready.step] = ready

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint_files(self) -> dict[str, bytes]:
        """Rank 0: the rollouts generated for the coming steps, as files of a checkpoint (JSON and
        safetensors: nothing in them is code)."""
        from safetensors.torch import save

        if not self.ready:
            return {}
        rows = [{"step": r.step, "version": r.version, "collect_s": r.collect_s,
                 "prompts": [dataclasses.asdict(p) for p in r.rollout.prompts],
                 "completions": [dataclasses.asdict(c) for c in r.rollout.completions],
                 "rewards": r.rollout.rewards, "metrics": r.rollout.metrics}
                for r in sorted(self.ready.values(), key=lambda r: r.step)]
        tensors = {str(r.step): r.old_logprobs.contiguous() for r in self.ready.values() if r.old_logprobs is not None}
        return {PENDING_JSON: json.dumps(rows).encode(), PENDING_TENSORS: save(tensors)}


def load_pending(checkpoint: Path | None) -> dict[int, ReadyRollout]:
    """The rollouts a checkpoint holds for the steps after it ({} for none, or a sync run's)."""
    from safetensors.torch import load_file

    if checkpoint is None or not (Path(checkpoint) / PENDING_JSON).is_file():
        return {}
    rows = json.loads((Path(checkpoint) / PENDING_JSON).read_text())
    tensors = load_file(Path(checkpoint) / PENDING_TENSORS) if (Path(checkpoint) / PENDING_TENSORS).is_file() else {}
    ready = {}
    for row in rows:
        rollout = StepRollout(prompts=[Prompt(**p) for p in row["prompts"]],
                              completions=[Completion(**c) for c in row["completions"]],
                              rewards=row["rewards"], metrics=row["metrics"])
        ready[row["step"]] = ReadyRollout(row["step"], rollout, row["version"], row["collect_s"],
                                          tensors.get(str(row["step"])))
    return ready
