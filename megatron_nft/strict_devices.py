"""A CPU test mode as strict about devices as NCCL: a collective given a host tensor fails, as on a GPU.

On a GPU, NCCL collectives take CUDA tensors only: `dist.all_reduce(torch.tensor([1.0]))` on the
default group raises "No backend type associated with device type cpu". On CPU every group is gloo,
which takes anything, so a CPU test never sees that mistake. This mode gives CPU tensors a *home*, the
device they would live on in the GPU run, and checks it where the GPU run would:

- `runtime.device()` becomes `cpu:0`, the stand-in for the accelerator: tensors placed there (the model,
  its batch, anything megatron-core puts on `torch.cuda.current_device()` through the CPU layer) are
  *accelerator* tensors; tensors made without a device, with `device="cpu"`, by `.cpu()` or
  `torch.tensor(x.item())` are *host* tensors; every other op's result lives where its inputs live.
- every tensor collective called from this project's code (megatron_nft/, checkpoints_tools/) on a
  group that is NCCL on GPUs (every group but runtime's gloo control group) must get accelerator
  tensors; a host tensor raises StrictDeviceError naming the call site.

Collectives inside torch (broadcast_object_list picks its device itself) and inside megatron-core are
not checked: only this project's call sites. multi-rank tests run under it (megatron_nft.testing).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from megatron_nft import runtime

HOST, ACCELERATOR = "host", "accelerator"
STANDIN = torch.device("cpu", 0)  # places tensors on the CPU, but names the accelerator
_ATTR = "_megatron_nft_home"

# torch functions that make a tensor from nothing: without a device they make it on the host (the
# default device is the CPU on GPU machines too).
_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.empty_strided, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn,
    torch.randint, torch.randperm, torch.from_numpy,
}

_DEVICE_PROPERTY = torch.Tensor.device  # modes see its getter as a fresh method-wrapper per access
_MOVES = {torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.to}

# The tensor collectives of torch.distributed. Point-to-point calls stay unwrapped: megatron-core's
# pipeline schedule hands dist.isend/irecv to P2POp, which accepts only torch's own functions.
COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
)

_PROJECT_ROOTS = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("megatron_nft", "checkpoints_tools"))


class StrictDeviceError(RuntimeError):
    """A collective got a tensor on a device its backend would refuse on a GPU machine."""


def home(tensor: torch.Tensor) -> str | None:
    """HOST, ACCELERATOR, or None for a tensor made outside the mode (by autograd's engine, say)."""
    return getattr(tensor, _ATTR, None)


def _home_of_device(device) -> str | None:
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return ACCELERATOR  # a CUDA ordinal
    if isinstance(device, str):
        device = torch.device(device)
    if not isinstance(device, torch.device):
        return None
    if device.type == "cuda" or device == STANDIN:
        return ACCELERATOR
    return HOST if device.type == "cpu" else None


def _input_home(t: torch.Tensor) -> str | None:
    # Parameters are made by megatron-core (nn.Parameter drops the stamp of the tensor it wraps) on
    # torch.cuda.current_device(): the model's parameters live on the accelerator.
    return home(t) or (ACCELERATOR if isinstance(t, torch.nn.Parameter) else None)


def _inputs_home(args, kwargs) -> str | None:
    homes = {_input_home(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    return ACCELERATOR if ACCELERATOR in homes else HOST if HOST in homes else None


def _result_home(func, args, kwargs) -> str | None:
    if func is torch.Tensor.cpu:
        return HOST
    if func is torch.Tensor.cuda:
        return ACCELERATOR
    if func is torch.Tensor.to:
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        if isinstance(target, torch.Tensor):
            return home(target)
        moved = _home_of_device(target) if not isinstance(target, torch.dtype) else None
        return moved if moved is not None else _inputs_home(args[:1], {})
    if "device" in kwargs and kwargs["device"] is not None:
        return _home_of_device(kwargs["device"])
    if func in _FACTORIES:
        return HOST
    return _inputs_home(args, kwargs)


class _HomeTracker(TorchFunctionMode):
    """Stamps every tensor a torch function returns with the home its GPU twin would have."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__self__", None) is _DEVICE_PROPERTY:
            # `torch.zeros(n, device=x.device)` makes its tensor where x is: answer the stand-in for
            # an accelerator tensor, so the new tensor is stamped as the GPU run would place it.
            return STANDIN if out.type == "cpu" and _input_home(args[0]) == ACCELERATOR else out
        where = _result_home(func, args, kwargs)
        if func in _MOVES and out is args[0] and where is not None and home(out) not in (None, where):
            # On the CPU a move between "devices" returns the tensor itself; on a GPU machine it is a
            # copy on the other device, and the original stays where it was.
            out = out.clone()
        if where is not None:
            inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                # an in-place op returns its input: it does not move it
                # (only CPU tensors: a meta tensor, say, has a place of its own)
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not (id(t) in inputs and home(t) is not None):
                    try:
                        setattr(t, _ATTR, where)
                    except (AttributeError, RuntimeError):  # tensors that take no attributes
                        pass
        return out


def _called_from_project(depth: int = 2) -> str | None:
    frame = sys._getframe(depth)
    filename = frame.f_code.co_filename
    return f"{filename}:{frame.f_lineno}" if filename.startswith(_PROJECT_ROOTS) else None


def _checked(name: str, collective):
    signature = inspect.signature(collective)

    def check(*args, **kwargs):
        site = _called_from_project()
        if site is not None:
            bound = signature.bind_partial(*args, **kwargs)
            group = bound.arguments.get("group")
            if not runtime.is_host_group(group):
                for t in tree_flatten((bound.args, bound.kwargs))[0]:
                    if isinstance(t, torch.Tensor) and home(t) == HOST:
                        raise StrictDeviceError(
                            f"{site}: dist.{name} on a group that is NCCL on GPUs got a host tensor "
                            f"(shape {tuple(t.shape)}); NCCL rejects CPU tensors: make it on runtime.device() "
                            f"or use the gloo control group"
                        )
        return collective(*args, **kwargs)

    check.__wrapped__ = collective
    return check


@contextlib.contextmanager
def strict_devices():
    """Enter on each rank before building anything (the model's tensors must be made under it)."""
    if runtime.CUDA:  # the real thing checks
        yield
        return
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    runtime.set_accelerator_standin(STANDIN)
    tracker = _HomeTracker()
    tracker.__enter__()
    # Test tooling, not the library: the collectives are wrapped only for the duration of the mode.
    for name, collective in saved.items():
        setattr(dist, name, _checked(name, collective))
    try:
        yield
    finally:
        for name, collective in saved.items():
            setattr(dist, name, collective)
        tracker.__exit__(None, None, None)
        runtime.set_accelerator_standin(None)
