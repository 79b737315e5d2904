"""Hugging Face Qwen2 checkpoint -> megatron-core distributed checkpoint (torch_dist).

The result loads at any TP/PP that divides the model (the format is resharding-capable), e.g. with
Actor.load_checkpoint(OUT, with_optimizer=False). Each rank builds only its GPTModel partition (a
model.bundle.ModelBundle: no DDP, no optimizer, no random init) and fills it from the safetensors
files one mapping rule at a time, so a rank holds its partition plus about one layer of HF tensors.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from checkpoints_tools import common

PROG = "python -m checkpoints_tools.hf_to_megatron"
DTYPES = ("bf16", "fp32")


def build_parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        description="Convert a Hugging Face Qwen2/Qwen2.5 checkpoint (config.json + safetensors) into a "
        "megatron-core distributed checkpoint (torch_dist) that loads at any TP/PP dividing the model.",
        epilog="Under torchrun (WORLD_SIZE set) the existing ranks are used; otherwise --tp*--pp gloo/NCCL "
        "ranks are spawned. Bad input: one line on stderr, exit status 2, nothing written.",
    )
    p.add_argument("--hf", required=True, type=Path, metavar="DIR", help="HF checkpoint folder (config.json, *.safetensors)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    common.add_layout_args(p, "to convert with (the checkpoint loads at any other)")
    p.add_argument(
        "--dtype", choices=common.DTYPE_CHOICES, default="auto",
        help="parameter dtype stored in the checkpoint; auto: bf16 if every HF tensor is bf16, else fp32",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def convert_rank(hf_dir: str, out: str, shape, tp: int, pp: int, dtype: str) -> dict:
    """One rank's part of the conversion (the default process group exists)."""
    import torch.distributed as dist

    from megatron_nft.actor_state import ActorState
    from megatron_nft.model.bundle import ModelBundle
    from megatron_nft.model.hf_io import hf_tensor_reader

    out = Path(out)
    start = time.perf_counter()
    # the actor's default options ("auto": TE layers where TE and CUDA are), so that the checkpoint's
    # names match; no random init, as every parameter is filled from the HF tensors
    bundle = ModelBundle.build(shape, tp=tp, pp=pp, dtype=dtype, seed=0, initialize=False)
    main = dist.get_rank() == 0
    if main:
        common.begin_output(out)
    common.barrier()
    tmp = common.staging_dir(out)
    bundle.load_hf(hf_tensor_reader(hf_dir))
    bundle.save(tmp)
    if main:
        ActorState().write(tmp)  # an imported model: no update taken, no optimizer state
        (tmp / "converted_from_hf.json").write_text(
            json.dumps(
                {"hf": str(Path(hf_dir).resolve()), "tp": tp, "pp": pp, "dtype": dtype, "format": "torch_dist",
                 "vocab_size": shape.vocab_size, "padded_vocab_size": shape.padded_vocab_size(tp)},
                indent=2,
            )
        )
    common.barrier()
    if main:
        common.publish_output(out)
    common.barrier()
    nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if main else 0
    return {"seconds": time.perf_counter() - start, "bytes": nbytes,
            "params": sum(p.numel() for p in bundle.model.parameters())}


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    _, shape = common.read_hf_config(args.hf, "--hf")
    common.check_parallel(shape, args.tp, args.pp, args.hf / "config.json")
    hf_dtype = common.check_hf_tensors(args.hf, shape)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if hf_dtype == "bf16" else "fp32")
    common.check_output(args.out, args.overwrite, args.hf)
    stats = common.launch_writing(
        args.out, convert_rank, args.tp, args.pp, str(args.hf), str(args.out), shape, args.tp, args.pp, dtype
    )
    if common.is_main_rank():
        print(
            f"wrote {args.out}: megatron-core torch_dist checkpoint, {dtype}, converted at tp={args.tp} "
            f"pp={args.pp}, {stats['bytes'] / 2**20:.1f} MiB, {stats['seconds']:.1f}s"
        )
    return 0


def main(argv=None) -> int:
    return common.run_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
