"""Process groups, Megatron parallel state, seeds, and the CPU compatibility layer for megatron-core.

On a machine with CUDA nothing here patches anything: process groups use NCCL and megatron-core runs
as its authors intended. Without CUDA (CI, laptops, the embedded demo) megatron-core still works over
gloo once a handful of hard-coded CUDA calls are redirected to the CPU. Those redirects live only in
`megatron_device_compat()`, a context manager the actor enters around each call into megatron-core, so
that code outside it (the local rollout engine, transformers, the tests' references) never sees them.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

CUDA = torch.cuda.is_available()

# How long host-side agreement (the control group below) waits for the slowest rank. Rank 0 generates
# and grades while the other ranks wait: for the paper's 32B launch one generation round alone is
# planned at tens of minutes, beyond the 30-minute watchdog of a device collective. A hung job is ended
# by the scheduler's time limit long before this.
CONTROL_TIMEOUT = datetime.timedelta(hours=24)


# --------------------------------------------------------------------------------------------------
# CPU compatibility layer
# --------------------------------------------------------------------------------------------------


def _names_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int is a CUDA ordinal (torch.cuda.current_device() returns one).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU inside megatron-core, which hard-codes them. (Under the strict
    test mode, to the CPU device that stands in for the accelerator: see `device()`.)

    Call sites in megatron-core 0.19.2 that need it:
      - optimizer/optimizer.py MixedPrecisionOptimizer.__init__:
        `torch.tensor([0], dtype=torch.int, device='cuda')` (_dummy_overflow_buf), and the found-inf
        buffers created with `device=torch.cuda.current_device()`;
      - pipeline_parallel/schedules.py: `torch.zeros(..., device="cuda")` for the token counters, and
        p2p_communication.py's receive buffers (`device=torch.cuda.current_device()`);
      - distributed/param_and_grad_buffer.py and distrib_optimizer.py: buffers allocated on
        `torch.cuda.current_device()`;
      - optimizer/distrib_optimizer.py `_build_model_and_main_param_groups` and optimizer.py
        `Float16OptimizerWithFloat16Params`: `param.type() == 'torch.cuda.FloatTensor'` (and the Half/
        BFloat16 variants) decide how a parameter is wrapped; a CPU tensor must answer with the CUDA
        name of the same dtype; clip_grads.py asserts the same on gradients.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": device()}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0].to(device()) if _accelerator_standin is not None else args[0]
        if func is torch.Tensor.to and args and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], device(), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.current_stream()/Stream on CPU: every operation is already ordered."""

    def wait_stream(self, *_):
        pass

    def synchronize(self):
        pass

    def record_event(self, *_):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


_CUDA_FUNCTION_REDIRECTS = {
    # model construction (tensor_parallel/layers.py, embeddings, param buffers):
    # `device=torch.cuda.current_device()` everywhere a parameter or buffer is allocated.
    "current_device": lambda: "cpu" if _accelerator_standin is None else _accelerator_standin,
    # distributed/param_and_grad_buffer.py and the schedules synchronise before timing/collectives.
    "synchronize": lambda *a, **k: None,
    # pipeline_parallel/p2p_communication.py and distributed/distributed_data_parallel.py
    # fetch the current stream to order communication.
    "current_stream": lambda *a, **k: _NullStream(),
    "stream": lambda *a, **k: _NullStream(),
}

# tensor_parallel/random.py: CheckpointFunction (activation recompute, parallel.recompute) saves the
# CPU, CUDA and tracker RNG states before a checkpointed forward and restores them for its recompute,
# through these two module functions, which initialise CUDA. On CPU there is no CUDA generator: the CPU
# state (saved by the same call) and the CPU tracker below cover every draw, so the CUDA part is an
# empty placeholder.
_MEGATRON_RANDOM_REDIRECTS = {
    "_get_cuda_rng_state": lambda *a, **k: torch.empty(0, dtype=torch.uint8),
    "_set_cuda_rng_state": lambda *a, **k: None,
}

_compat_depth = 0
_saved_cuda_functions: dict[str, object] = {}
_saved_random_functions: dict[str, object] = {}
_mode: _CudaToCpuMode | None = None


@contextlib.contextmanager
def megatron_device_compat():
    """Enter around calls into megatron-core. A no-op when CUDA is present; re-entrant."""
    global _compat_depth, _mode
    if CUDA:
        yield
        return
    if _compat_depth == 0:
        for name, replacement in _CUDA_FUNCTION_REDIRECTS.items():
            _saved_cuda_functions[name] = getattr(torch.cuda, name)
            setattr(torch.cuda, name, replacement)
        from megatron.core.tensor_parallel import random as mrandom

        for name, replacement in _MEGATRON_RANDOM_REDIRECTS.items():
            _saved_random_functions[name] = getattr(mrandom, name)
            setattr(mrandom, name, replacement)
        _install_cpu_rng_tracker()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
    _compat_depth += 1
    try:
        yield
    finally:
        _compat_depth -= 1
        if _compat_depth == 0:
            _mode.__exit__(None, None, None)
            _mode = None
            for name, original in _saved_cuda_functions.items():
                setattr(torch.cuda, name, original)
            _saved_cuda_functions.clear()
            from megatron.core.tensor_parallel import random as mrandom

            for name, original in _saved_random_functions.items():
                setattr(mrandom, name, original)
            _saved_random_functions.clear()


def _install_cpu_rng_tracker() -> None:
    """megatron-core keeps named CUDA RNG states (tensor_parallel/random.py CudaRNGStatesTracker) and
    forks them around weight init and dropout in tensor-parallel regions; its `add` and `fork` call
    torch.cuda.get_rng_state/set_rng_state. On CPU the same bookkeeping runs on the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    if not getattr(mrandom._CUDA_RNG_STATE_TRACKER, "runs_on_cpu", False):
        mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


@functools.cache
def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        runs_on_cpu = True

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"RNG seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"RNG state {name} already exists")
            self.seeds_.add(seed)
            generator = torch.Generator()
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"RNG state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


# --------------------------------------------------------------------------------------------------
# Devices: where the model's tensors live, and where each collective wants its tensors
# --------------------------------------------------------------------------------------------------

# Set only by the strict test mode (megatron_nft.testing.strict_devices): on CPU the accelerator is
# then `cpu:0`, a device name that places tensors on the CPU like "cpu" but that a placement check can
# tell apart from a tensor made on the host, so that "would this tensor be on the GPU?" has an answer
# on a machine without one.
_accelerator_standin: torch.device | None = None


def device() -> torch.device:
    """The accelerator: the current CUDA device, or the CPU (see `_accelerator_standin`)."""
    if CUDA:
        return torch.device("cuda", torch.cuda.current_device())
    return _accelerator_standin if _accelerator_standin is not None else torch.device("cpu")


def set_accelerator_standin(standin: torch.device | None) -> None:
    """For the strict test mode only; a no-op with CUDA, where the accelerator is real."""
    global _accelerator_standin
    _accelerator_standin = None if CUDA else standin


# Groups created with the gloo backend on purpose (host-side agreement): their collectives take CPU
# tensors on every machine. Every other group is NCCL on GPUs and takes tensors on `device()`.
_host_groups: list = []


def comm_device(group=None) -> torch.device:
    """The device whose tensors `group`'s backend accepts: NCCL takes CUDA tensors only, gloo CPU ones."""
    return torch.device("cpu") if any(group is g for g in _host_groups) else device()


def is_host_group(group) -> bool:
    return any(group is g for g in _host_groups)


# --------------------------------------------------------------------------------------------------
# Process groups and parallel state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}"
            )
        return world_size // model_parallel


def init_process_group(timeout: datetime.timedelta = datetime.timedelta(minutes=30),
                       control_timeout: datetime.timedelta = CONTROL_TIMEOUT) -> None:
    """Joins (or creates) the default process group: NCCL with CUDA, gloo without; and the control group.

    Reads torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a plain `python` process becomes a
    world of one with an in-memory store (no port: runs started side by side cannot collide).
    `timeout` is the default group's (the NCCL watchdog's on GPUs); `control_timeout` the control group's."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        dist.init_process_group(
            backend="nccl" if CUDA else "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
        )
        _init_control_group(control_timeout)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if CUDA else "gloo", rank=rank, world_size=world_size, timeout=timeout)
    _init_control_group(control_timeout)


def _init_control_group(timeout: datetime.timedelta) -> None:
    """A gloo group over every rank for host-side agreement: objects (the rollout, an accuracy), flags
    (stop, a failed load) and barriers around rank-0 file work. Ranks wait here while rank 0 generates,
    grades, evaluates or deletes files; on GPUs a wait that long in an NCCL collective would be killed
    by its watchdog, and NCCL would refuse the CPU tensors these flags are."""
    _host_groups.clear()
    _host_groups.append(dist.new_group(backend="gloo", timeout=timeout))


def control_group():
    """The gloo group of `_init_control_group` (init_process_group creates it)."""
    if not _host_groups:
        if not dist.is_initialized():
            raise RuntimeError("runtime.init_process_group() has not run: no control group")
        _init_control_group(CONTROL_TIMEOUT)  # a default group made elsewhere: every rank is here too
    return _host_groups[0]


def barrier() -> None:
    """All ranks meet, on the control group (host work such as deleting a run directory may take long)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=control_group())


def broadcast_object(obj, src: int = 0):
    """`obj` from global rank `src` to every rank, pickled over the control group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (pickled over the control group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on some rank (one all-reduce on the control group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=comm_device(control_group()))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=control_group())
    return bool(tensor.item())


def init_model_parallel(layout: ParallelLayout, seed: int) -> None:
    """(Re)initialises Megatron's parallel state for `layout` and seeds every generator.

    Can be called again with another layout in the same processes (the distributed tests do)."""
    from megatron.core import parallel_state, tensor_parallel

    init_process_group()
    layout.data_parallel_size(dist.get_world_size())  # validates divisibility with a clear message
    _destroy_model_parallel(parallel_state)
    _groups_before_layout[:] = _registered_groups()
    with megatron_device_compat():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp,
        )
        seed_everything(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# The process groups that existed before the current layout (see _destroy_model_parallel).
_groups_before_layout: list = []


def _registered_groups() -> list:
    # torch's registry of live process groups (private: torch has no public listing)
    return list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []


def _destroy_model_parallel(parallel_state) -> None:
    """parallel_state.destroy_model_parallel() forgets Megatron's groups, but torch keeps each in its
    registry until it is destroyed (measured: 20 more registered groups per actor a process builds).
    So a new layout destroys every group created since the previous one began, keeping the ones from
    before (the default group). The groups' descriptors are only freed once nothing holds them:
    Actor.close (megatron_workarounds.release_ddp) breaks the cycle that keeps an actor's DDP (and its
    groups) alive."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    keep = set(_groups_before_layout) | {dist.group.WORLD, *_host_groups}
    for group in _registered_groups():
        if group not in keep:
            dist.destroy_process_group(group)
    _groups_before_layout.clear()


def destroy() -> None:
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # only if the run got that far
    if parallel_state is not None:
        _destroy_model_parallel(parallel_state)
    _host_groups.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
