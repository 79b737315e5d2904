"""megatron-core distributed checkpoint -> Hugging Face Qwen2 checkpoint (sharded safetensors + index).

Loads the checkpoint's weights into the model at the requested layout (model.bundle.ModelBundle) and
exports through its hf_tensors() (the same gather that feeds the actor's weight sync to rollout
engines); config.json, the tokenizer and the other non-weight files come from --hf-config. The result loads with transformers' from_pretrained.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from checkpoints_tools import common

PROG = "python -m checkpoints_tools.megatron_to_hf"


def build_parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        description="Convert a megatron-core distributed checkpoint (from hf_to_megatron or a megatron-nft "
        "training run) back into a Hugging Face Qwen2 checkpoint loadable by transformers.",
        epilog="--ckpt may be the checkpoint folder itself or a training run's checkpoints/step_N folder. "
        "Bad input: one line on stderr, exit status 2, nothing written.",
    )
    p.add_argument("--ckpt", required=True, type=Path, metavar="DIR", help="megatron-core dist checkpoint folder")
    p.add_argument(
        "--hf-config", required=True, type=Path, metavar="DIR",
        help="HF folder whose config.json describes the model; its tokenizer and other non-weight files are copied",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output HF folder (must not exist unless --overwrite)")
    common.add_layout_args(p, "to load the checkpoint at")
    p.add_argument(
        "--dtype", choices=common.DTYPE_CHOICES, default="auto",
        help="dtype of the exported weights; auto: the checkpoint's own (bit-exact export)",
    )
    p.add_argument(
        "--max-shard-mib", type=float, default=2048, metavar="MIB",
        help="largest safetensors file in MiB; more than one file gets a model.safetensors.index.json (default 2048)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def export_rank(ckpt: str, hf_config: str, out: str, shape, tp: int, pp: int, dtype: str, shard_mib: float) -> dict:
    """One rank's part of the export (the default process group exists)."""
    import torch.distributed as dist

    from megatron_nft.model.bundle import DTYPES as TORCH_DTYPES
    from megatron_nft.model.bundle import ModelBundle
    from megatron_nft.model.hf_io import load_hf_config, save_hf_checkpoint

    out = Path(out)
    start = time.perf_counter()
    bundle = ModelBundle.build(shape, tp=tp, pp=pp, dtype=dtype, seed=0, initialize=False)  # every weight is loaded
    bundle.load(ckpt)
    tensors = bundle.hf_tensors()  # the other ranks' part of the gather is done within this call
    nbytes = 0
    if dist.get_rank() == 0:
        # save_hf_checkpoint stages in OUT.tmp.tmp and renames it to OUT.tmp; the side files are added
        # there and OUT.tmp becomes OUT below.
        tmp = common.staging_dir(out)
        # Cast to one dtype: with bf16 parameters megatron-core still keeps the norms in fp32.
        torch_dtype = TORCH_DTYPES[dtype]
        save_hf_checkpoint(
            tmp, ((name, t.to(torch_dtype)) for name, t in tensors), load_hf_config(hf_config),
            overwrite=True, shard_bytes=int(shard_mib * 2**20),
        )
        common.copy_hf_side_files(Path(hf_config), tmp, dtype)
        common.publish_output(out)
        nbytes = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    common.barrier()
    return {"seconds": time.perf_counter() - start, "bytes": nbytes}


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    _, shape = common.read_hf_config(args.hf_config, "--hf-config")
    common.check_parallel(shape, args.tp, args.pp, args.hf_config / "config.json")
    ckpt = common.resolve_megatron_checkpoint(args.ckpt)
    ckpt_dtype = common.check_megatron_checkpoint(ckpt, shape, args.hf_config / "config.json")
    dtype = args.dtype if args.dtype != "auto" else ckpt_dtype
    if not (math.isfinite(args.max_shard_mib) and args.max_shard_mib > 0):
        raise common.ConfigError(f"--max-shard-mib {args.max_shard_mib}: expected a positive number of MiB")
    common.check_output(args.out, args.overwrite, args.ckpt, args.hf_config)
    stats = common.launch_writing(
        args.out, export_rank, args.tp, args.pp, str(ckpt), str(args.hf_config), str(args.out), shape, args.tp,
        args.pp, dtype, args.max_shard_mib,
    )
    if common.is_main_rank():
        print(
            f"wrote {args.out}: Hugging Face checkpoint, {dtype}, {stats['bytes'] / 2**20:.1f} MiB of safetensors, "
            f"loaded at tp={args.tp} pp={args.pp}, {stats['seconds']:.1f}s"
        )
    return 0


def main(argv=None) -> int:
    return common.run_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
