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


def hf_weight_map(path: str | Path) -> dict[str, str]:
    """HF tensor name -> safetensors file name (relative to `path`), checking that every file exists."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index with a 'weight_map' ({e})") from None
    elif (path / "model.safetensors").is_file():
        try:
            with safe_open(path / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'}: not a readable safetensors file ({e})") from None
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise CheckpointError(f"{path}: shard {shard} listed in the index is missing")
    return weight_map


def hf_tensor_specs(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """HF tensor name -> (file, shape, safetensors dtype), from the files' headers only (no tensor data)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    weight_map = hf_weight_map(path)
    specs = {}
    for shard in sorted(set(weight_map.values())):
        try:
            with safe_open(path / shard, framework="pt") as f:
                present = set(f.keys())
                for name in (n for n, s in weight_map.items() if s == shard):
                    if name not in present:
                        raise CheckpointError(f"{path / shard}: tensor {name} listed in the index is not in the file")
                    sl = f.get_slice(name)
                    specs[name] = (shard, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / shard}: not a readable safetensors file ({e})") from None
    return specs


def hf_tensor_reader(path: str | Path) -> Callable[[str], torch.Tensor]:
    """Returns fetch(name) -> tensor over the checkpoint's safetensors files (sharded or not)."""
    from safetensors import safe_open

    path = Path(path)
    weight_map = hf_weight_map(path)
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
    shard_bytes: int = SHARD_BYTES,
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
    # Each shard is written as soon as it is full (peak memory: one shard, not the model); the files
    # get their final "-of-N" names once N is known.
    written: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    size = total_size = 0

    def flush():
        part = tmp / f"part-{len(written):05d}.safetensors"
        save_file(pending, str(part), metadata={"format": "pt"})
        written.append((part, list(pending)))
        pending.clear()

    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > shard_bytes:
            flush()
            size = 0
        pending[name] = tensor
        size += nbytes
        total_size += nbytes
    if pending or not written:
        flush()
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    weight_map = {}
    total = len(written)
    for i, (part, names) in enumerate(written):
        fname = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(part, tmp / fname)
        os.chmod(tmp / fname, mode)  # safetensors writes 0600 files; give them the usual mode
        weight_map.update({name: fname for name in names})
    if total > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
        )
    if dtype is not None:
        config.dtype = dtype  # written as config.json's "dtype" (transformers 5 name; torch_dtype is deprecated)
    config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
