"""Repairs of megatron-core state that the actor needs on every machine (CPU and CUDA alike).

runtime.py redirects megatron-core's hard-coded CUDA calls on machines without CUDA; this module
holds the other places where megatron-core 0.19.2's own objects have to be adjusted by hand, each
with the megatron-core code that makes it necessary. Nothing here replaces a function: each helper
changes the state of one object the caller passes in.
"""

from __future__ import annotations

import torch


def release_ddp(ddp, config) -> None:
    """Breaks the reference cycles that keep a megatron-core DistributedDataParallel alive forever.

    distributed/distributed_data_parallel.py `DistributedDataParallel.__init__` registers, on each
    parameter's gradient accumulator (`param.expand_as(param).grad_fn.next_functions[0][0]`), a hook
    whose closure holds the DDP (`self._make_backward_post_hook(param)`), and keeps the accumulators
    in `self.grad_accs`: a cycle through C++ autograd nodes, which Python's gc cannot see. The actor
    also stores DDP's bound methods in the TransformerConfig (no_sync_func, finalize_model_grads_func,
    grad_scale_func), as Megatron-LM's training loop does. Without breaking both, every model built in
    a process keeps its gradient buffers and ~80 gloo file descriptors until exit (measured)."""
    ddp.grad_accs.clear()
    for name in ("no_sync_func", "finalize_model_grads_func", "grad_scale_func"):
        setattr(config, name, None)


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core optimizer (a ChainedOptimizer holds several)."""
    return [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])]


def materialize_adam_state(optimizer) -> None:
    """Gives every parameter the state torch Adam's first step would create (zero moments, step 0).

    optimizer/distrib_optimizer.py `DistributedOptimizer.state_dict` (the path without apex/TE, which
    this project takes on CPU) reads each parameter state's 'step' to save, and `sharded_state_dict`
    builds the dict to load into from the same states; a fresh torch Adam has none until its first
    step. Numerically the optimizer is unchanged: Adam's first step starts from exactly this state."""
    for torch_opt in torch_optimizers(optimizer):
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def adam_step(optimizer) -> int:
    """The torch-Adam step count shared by every parameter (0 before the first step)."""
    steps = {int(st["step"]) for opt in torch_optimizers(optimizer) for st in opt.state.values() if "step" in st}
    return steps.pop() if len(steps) == 1 else 0


def restore_adam_steps(optimizer, step: int) -> None:
    """Gives every parameter's torch-Adam state its own 'step' tensor holding `step`.

    optimizer/distrib_optimizer.py `DistributedOptimizer.load_state_dict`, without apex/TE, assigns ONE
    `torch.tensor(step)` to every parameter's state (`s["step"] = step`); the parameter-state copy that
    follows (`load_parameter_state_from_dp_reshardable`) skips 'step'. torch's Adam increments
    each state's 'step' in place, so the shared tensor would advance once per parameter per update.
    The count is saved beside the checkpoint (actor_state.json) and restored here."""
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step))


_results_managers: list = []  # kept alive for the process's life, as megatron-core keeps its own


def results_queue_that_dies_with_us() -> None:
    """Gives megatron-core's checkpoint writer a results queue whose server process dies with ours.

    dist_checkpointing/strategies/filesystem_async.py `get_write_results_queue` starts, on a process's
    first torch_dist save, a multiprocessing Manager (a spawned server process, ~770 MB resident once
    it has imported torch) and keeps it in the module global `_results_queue`. Its clean-up runs only
    at a normal exit: a SIGKILLed trainer (OOM killer, Slurm after KillWait, a test) left it alive
    with parent init. Here the same kind of Manager is started with parent_death's initializer, and
    its queue put where megatron-core looks for one; megatron-core then never starts its own."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_nft.parent_death import die_with_parent

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    _results_managers.append(manager)
    filesystem_async._results_queue = manager.Queue()
