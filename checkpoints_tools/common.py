"""What the three checkpoint CLIs share: one-line errors, the output-folder protocol, input checks
against the HF config, and running a function on tp*pp ranks.

Process model (`launch`):
  - WORLD_SIZE set (torchrun, or a test's run_distributed rank): every process is a rank of the
    existing world; the world size must be a multiple of tp*pp (extra ranks are data-parallel copies).
  - tp*pp == 1: in this process, as a world of one.
  - otherwise: tp*pp ranks spawned with torch.multiprocessing; only rank 0's return value comes back.
Only this module decides which; the per-rank functions see an initialised default process group.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import shutil
import sys
import traceback
from pathlib import Path

import torch

from megatron_nft.errors import CheckpointError, ConfigError, UserError

DTYPE_CHOICES = ("auto", "bf16", "fp32")
_SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}
_TORCH_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Weight files of an HF folder: everything else in --hf-config (config, tokenizer, generation config,
# license, chat template) is copied beside exported weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (naming the flag) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_layout_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--tp", type=int, default=1, metavar="N", help=f"tensor-parallel size {what} (default 1)")
    parser.add_argument("--pp", type=int, default=1, metavar="N", help=f"pipeline-parallel size {what} (default 1)")


def run_main(prog: str, body, argv) -> int:
    """Runs body(argv) -> exit status; a UserError becomes one line on stderr (rank 0) and status 2."""
    quiet_library_chatter()
    try:
        return int(body(argv) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    except UserError as e:
        if is_main_rank():
            print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code


def quiet_library_chatter() -> None:
    """megatron-core warns at import about the missing TE/apex and logs deprecations; none of it is
    actionable for a conversion, and it would bury the one line that matters."""
    import logging
    import warnings

    for module in (r"megatron\.", r"torch\.distributed\.checkpoint"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
    for name in ("megatron", "megatron.core", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def is_main_rank() -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------------------------------
# output folder: OUT.tmp, renamed to OUT when complete
# ----------------------------------------------------------------------------------------------------


def _overlaps(a: Path, b: Path) -> bool:
    """a and b are one path, or one lies inside the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(out: Path, overwrite: bool, *inputs: Path) -> None:
    """Refuses an existing OUT without --overwrite, and any overlap between what the tool writes,
    renames or deletes (OUT and its staging folder OUT.tmp) and an input: the same path, one inside
    the other either way. Nothing is created before this check."""
    if out.exists() and not overwrite:
        raise CheckpointError(f"--out {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    for written in (out, staging_dir(out)):
        for src in inputs:
            if _overlaps(written, src):
                what = f"--out {out}" if written == out else f"the staging folder {written} of --out {out}"
                raise CheckpointError(f"{what} overlaps the input {src} (the same folder, or one inside the other); "
                                      f"the tool writes and deletes there: choose an --out apart from every input")


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def begin_output(out: Path) -> Path:
    """Rank 0: a fresh, empty OUT.tmp (a stale one from a killed run is removed)."""
    tmp = staging_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_output(out: Path) -> None:
    tmp = staging_dir(out)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def discard_output(out: Path) -> None:
    shutil.rmtree(staging_dir(out), ignore_errors=True)


def launch_writing(out: Path, fn, tp: int, pp: int, *args):
    """launch(fn, tp, pp, *args) for a converter that stages `out`: on any failure rank 0 removes the
    staging folder, so a failed conversion leaves nothing behind."""
    try:
        return launch(fn, tp, pp, *args)
    except BaseException:
        if is_main_rank():
            discard_output(out)
        raise


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path, flag: str):
    """(transformers config, Qwen2Shape) of an HF folder; every refusal names the file and the field."""
    from megatron_nft.model.hf_io import load_hf_config
    from megatron_nft.model.qwen2 import SUPPORTED_MODEL_TYPES, shape_from_hf

    if not hf_dir.is_dir():
        raise CheckpointError(f"{flag} {hf_dir}: no such directory")
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{flag} {hf_dir}: not a Hugging Face checkpoint (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise ConfigError(f"{cfg_file}: model_type={got!r}, expected one of {list(SUPPORTED_MODEL_TYPES)}")
    try:
        config = load_hf_config(hf_dir)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise CheckpointError(f"{cfg_file}: transformers cannot read it ({e})") from None
    try:
        shape = shape_from_hf(config)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    return config, shape


def check_parallel(shape, tp: int, pp: int, cfg_file: Path) -> None:
    """--tp / --pp against the model in cfg_file (the rule is Qwen2Shape.parallel_problems')."""
    problems = shape.parallel_problems(tp, pp, "--tp ", "--pp ")
    if problems:
        raise ConfigError(f"{cfg_file}: {problems[0]}")


def check_hf_tensors(hf_dir: Path, shape) -> str:
    """Checks names, shapes and dtypes of the HF tensors against the config, from the safetensors
    headers alone. Returns the checkpoint's dtype ('bf16', 'fp32', ... or 'mixed')."""
    from megatron_nft.model.hf_io import hf_tensor_specs
    from megatron_nft.model.mapping import hf_tensor_shapes

    specs = hf_tensor_specs(hf_dir)
    expected = hf_tensor_shapes(shape)
    if shape.tie_word_embeddings and "lm_head.weight" in specs:
        # transformers ties it to the embedding and ignores the stored copy; so do we.
        expected.setdefault("lm_head.weight", expected["model.embed_tokens.weight"])
    for name, want in expected.items():
        if name not in specs:
            if name == "lm_head.weight" and shape.tie_word_embeddings:
                continue
            raise CheckpointError(
                f"{hf_dir}: tensor {name} is missing (config.json implies shape {list(want)})"
            )
        fname, got, dtype = specs[name]
        if got != want:
            raise CheckpointError(
                f"{hf_dir / fname}: tensor {name} has shape {list(got)}, config.json implies {list(want)}"
            )
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{hf_dir / fname}: tensor {name} has dtype {dtype}, expected a float type")
    extra = sorted(n for n in specs if n not in expected and not n.endswith(".rotary_emb.inv_freq"))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{hf_dir / specs[extra[0]][0]}: unexpected tensor {extra[0]}{more}: the Megatron Qwen2 model has "
            "no such parameter (only q/k/v carry biases)"
        )
    dtypes = {_SAFETENSORS_DTYPES[specs[n][2]] for n in expected if n in specs}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def resolve_megatron_checkpoint(ckpt: Path) -> Path:
    """The dist-checkpoint folder: --ckpt itself, or its actor/ (a trainer's step_N folder)."""
    from megatron.core import dist_checkpointing

    if not ckpt.is_dir():
        raise CheckpointError(f"--ckpt {ckpt}: no such directory")
    if not (ckpt / "metadata.json").is_file() and (ckpt / "actor" / "metadata.json").is_file():
        ckpt = ckpt / "actor"
    if not dist_checkpointing.check_is_distributed_checkpoint(str(ckpt)):
        raise CheckpointError(f"--ckpt {ckpt}: not a megatron-core distributed checkpoint (no valid metadata.json)")
    from megatron_nft import actor_state

    if not (ckpt / actor_state.FILE).is_file():
        raise CheckpointError(f"--ckpt {ckpt}: no {actor_state.FILE} (not written by megatron-nft)")
    return ckpt


def check_megatron_checkpoint(ckpt: Path, shape, cfg_file: Path) -> str:
    """Compares the checkpoint's global tensor shapes with the model of `cfg_file`; returns its dtype."""
    from megatron.core import dist_checkpointing

    from megatron_nft.checkpoint_trust import check_torch_dist_index

    check_torch_dist_index(ckpt)  # load_tensors_metadata unpickles it
    try:
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is bad input
        raise CheckpointError(f"--ckpt {ckpt}: cannot read its tensor metadata ({type(e).__name__}: {e})") from None
    h, d, ffn, layers = shape.hidden_size, shape.head_dim, shape.intermediate_size, shape.num_layers
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * d
    want = {
        "decoder.layers.self_attention.linear_qkv.weight": (layers, qkv, h),
        "decoder.layers.self_attention.linear_proj.weight": (layers, h, shape.num_heads * d),
        "decoder.layers.mlp.linear_fc1.weight": (layers, 2 * ffn, h),
        "decoder.layers.mlp.linear_fc2.weight": (layers, h, ffn),
        "decoder.final_layernorm.weight": (h,),
    }
    for key, expected in want.items():
        if key not in meta:
            raise CheckpointError(f"--ckpt {ckpt}: tensor {key} is missing; not a Qwen2 GPTModel checkpoint")
        got = tuple(meta[key].global_shape)
        if got != expected:
            raise CheckpointError(
                f"--ckpt {ckpt}: {key} has shape {list(got)}, the model of {cfg_file} needs {list(expected)}"
            )
    emb = tuple(meta["embedding.word_embeddings.weight"].global_shape)
    if emb[1] != h or emb[0] < shape.vocab_size:
        raise CheckpointError(
            f"--ckpt {ckpt}: embedding.word_embeddings.weight has shape {list(emb)}, the model of {cfg_file} "
            f"needs [{shape.vocab_size} (+ padding), {h}]"
        )
    untied = "output_layer.weight" in meta
    if untied == shape.tie_word_embeddings:
        raise CheckpointError(
            f"--ckpt {ckpt}: {'has' if untied else 'has no'} output_layer.weight but {cfg_file} says "
            f"tie_word_embeddings={str(shape.tie_word_embeddings).lower()}"
        )
    return _TORCH_DTYPES.get(meta["decoder.layers.self_attention.linear_qkv.weight"].dtype, "fp32")


def copy_hf_side_files(src: Path, dst: Path, dtype: str | None) -> None:
    """Copies config.json, tokenizer and other non-weight files of an HF folder; config.json verbatim
    except its dtype field, which is set to the exported weights' dtype."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)
    if dtype is not None:
        cfg = json.loads((dst / "config.json").read_text())
        name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
        for k in keys:
            cfg[k] = name
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------
# ranks
# ----------------------------------------------------------------------------------------------------


class _RankUserError(UserError):
    pass


def _rank_entry(rank, world_size, port, threads, fn, args, results):
    from megatron_nft.parent_death import die_with_parent

    die_with_parent()  # a killed tool leaves no rank behind
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    quiet_library_chatter()
    from megatron_nft import runtime

    try:
        runtime.init_process_group()
        value = fn(*args)
        # By value (torch.save): the queue's pickler would pass tensors as shared-memory handles that
        # die with this process.
        buffer = io.BytesIO()
        torch.save(value if rank == 0 else None, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except UserError as e:
        results.put((rank, "user", (e.exit_code, str(e))))
    except BaseException:  # noqa: BLE001 - anything else comes back with its traceback
        results.put((rank, "crash", traceback.format_exc()))
    finally:
        runtime.destroy()


def _spawn(fn, world_size: int, args: tuple, timeout_s: float):
    import torch.multiprocessing as mp

    from megatron_nft.runtime import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(r, world_size, port, threads, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    value, failure, done = None, None, 0
    try:
        waited = 0.0
        while done < world_size and failure is None:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    failure = ("crash", f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                elif waited > timeout_s:
                    failure = ("crash", f"no result within {timeout_s:.0f}s")
                continue
            done += 1
            if status == "ok":
                if rank == 0:
                    value = torch.load(io.BytesIO(payload), weights_only=True)  # plain results: no pickles read
            else:
                failure = (status, payload if status == "user" else f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=30 if failure is None else 2)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        status, payload = failure
        if status == "user":
            code, message = payload
            err = _RankUserError(message)
            err.exit_code = code
            raise err
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on {world_size} ranks: {payload}")
    return value


def launch(fn, tp: int, pp: int, *args, timeout_s: float = 24 * 3600.0):
    """Runs fn(*args) on every rank (see the module docstring); returns rank 0's value (None on
    other ranks of an existing world)."""
    import torch.distributed as dist

    from megatron_nft import runtime

    model_parallel = tp * pp
    if "WORLD_SIZE" in os.environ or dist.is_initialized():
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
        if world % model_parallel:
            raise ConfigError(f"WORLD_SIZE={world} is not a multiple of --tp*--pp = {tp}*{pp}")
        runtime.init_process_group()
        return fn(*args)
    if model_parallel == 1:
        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        try:
            runtime.init_process_group()
            return fn(*args)
        finally:
            runtime.destroy()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return _spawn(fn, model_parallel, args, timeout_s)


def barrier() -> None:
    from megatron_nft import runtime

    runtime.barrier()
