"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors + tokenizer).

Reads are lazy (one tensor at a time through safetensors' mmap), so loading a sharded 32B checkpoint
never holds more than the tensors being mapped. Writes go to a temporary sibling directory that is
renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from megatron_nft.errors import CheckpointError

SHARD_BYTES = 2 * 1024**3


def load_hf_config(path: str | Path):
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    return AutoConfig.from_pretrained(str(path))


def hf_tensor_reader(path: str | Path) -> Callable[[str], torch.Tensor]:
    """Returns fetch(name) -> tensor over the checkpoint's safetensors files (sharded or not)."""
    from safetensors import safe_open

    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(path / "model.safetensors", framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise CheckpointError(f"{path}: shard {shard} listed in the index is missing")
    handles = {}

    def fetch(name: str) -> torch.Tensor:
        shard = weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{path}: tensor {name} is not in the checkpoint")
        if shard not in handles:
            handles[shard] = safe_open(path / shard, framework="pt")
        return handles[shard].get_tensor(name)

    return fetch


def save_hf_checkpoint(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config,
    tokenizer=None,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes sharded safetensors with an index, config.json and the tokenizer, atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; refusing to overwrite it")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    total = len(shards)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    if total > 1:
        total_size = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
        )
    if dtype is not None:
        config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
