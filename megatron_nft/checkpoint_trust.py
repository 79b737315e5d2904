"""Reading checkpoints a user may have received: nothing in them gets to run code.

A torch_dist checkpoint (megatron-core's dist_checkpointing over torch.distributed.checkpoint) keeps
its index in `.metadata`, which torch's FileSystemReader.read_metadata reads with a plain
`pickle.load`: a crafted `.metadata` runs whatever it names. Every torch_dist load in this project
(resume, `model.megatron_ckpt`, megatron_to_hf, verify) first reads that file here with an unpickler
that resolves only the classes such an index is made of, and refuses the checkpoint otherwise. The
rest of a checkpoint is read without pickle: tensors and `common.pt` by torch.load(weights_only=True)
(torch's and megatron-core's default), our own state as JSON.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from megatron_nft.errors import CheckpointError

METADATA = ".metadata"

# What torch 2.x's DCP writes into `.metadata` (Metadata, its storage and tensor descriptions, the
# save plans it keeps as planner data), seen by recording every class a real checkpoint's index names.
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"}
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout looked up by its name
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    if module in _ALLOWED_MODULES:
        # classes only (dataclasses and enums of those modules), never their functions
        return isinstance(getattr(__import__(module, fromlist=[name]), name, None), type)
    return False


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if not _allowed(module, name):
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    pass


def check_torch_dist_index(directory: str | Path) -> None:
    """Raises CheckpointError unless `directory/.metadata` is a torch_dist index and nothing else."""
    path = Path(directory) / METADATA
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a torch_dist checkpoint (no {METADATA})")
    try:
        with path.open("rb") as f:
            _IndexUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(
            f"{path}: names {e}, which a torch_dist checkpoint's index never holds; refusing to load it "
            f"(unpickling it could run code)"
        ) from None
    except Exception as e:  # noqa: BLE001 - a truncated or garbled index: one line, not a traceback
        raise CheckpointError(f"{path}: unreadable torch_dist index ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
