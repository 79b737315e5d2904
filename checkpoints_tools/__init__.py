"""Hugging Face Qwen2 checkpoints in and out of megatron-core distributed checkpoints.

    python -m checkpoints_tools.hf_to_megatron --hf DIR --out DIR [--tp N --pp N] [--dtype auto|bf16|fp32]
    python -m checkpoints_tools.megatron_to_hf --ckpt DIR --hf-config DIR --out DIR [--tp N --pp N]
    python -m checkpoints_tools.verify --hf DIR --ckpt DIR [--tp N --pp N]

All three use the one weight mapping in megatron_nft.model.mapping. They run on tp*pp gloo (CPU) or
NCCL (GPU) ranks: spawned by the command itself, or the ranks of an existing torchrun world when
WORLD_SIZE is set. Bad input ends with one line on stderr and exit status 2; an output folder is
written as OUT.tmp and renamed to OUT only when complete.
"""
