"""`megatron-nft`: train, demo.

    megatron-nft demo                                  # the embedded CPU default (recipes/demo.yaml)
    megatron-nft train --recipe recipes/demo.yaml run.dir=runs/x algo.eps=0.5
    megatron-nft config --recipe recipes/demo.yaml     # print the resolved config and exit

Overrides are `section.key=value` (sections: model, parallel, optim, algo, rollout, data, reward,
eval, warmup, run). Bad input prints one line naming the problem and exits with status 2.
Multi-rank runs start this through torchrun (`torchrun --nproc-per-node N -m megatron_nft.cli train ...`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-nft",
        description="Negative-aware Fine-Tuning (NFT) and its baselines on Megatron-core actors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  megatron-nft demo                                   # tiny model, CPU, minutes\n"
            "  megatron-nft demo run.overwrite=true algo.eps=0.5   # replace runs/demo, other NFT floor\n"
            "  megatron-nft train --recipe my.yaml model.hf_path=/ckpt/Qwen2.5-Math-7B run.dir=runs/x\n"
            "  megatron-nft config --recipe recipes/demo.yaml      # print the resolved config\n\n"
            "Overrides are section.key=value; sections: model parallel optim algo rollout data reward eval\n"
            "warmup run. Multi-GPU: torchrun --nproc-per-node N -m megatron_nft.cli train ..."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, default_recipe=None):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--recipe",
            default=default_recipe,
            help="YAML recipe (default: %(default)s)" if default_recipe else "YAML recipe",
        )
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    add("demo", "Warm up a tiny random Qwen2 on arithmetic, then improve it with NFT on CPU.", str(RECIPES / "demo.yaml"))
    add("train", "Train from a Hugging Face checkpoint (model.hf_path) with the configured algorithm.")
    add("config", "Print the resolved configuration (recipe + overrides) as YAML and exit.")
    return parser


def _quiet_libraries() -> None:
    # megatron-core and torch.distributed warn about deprecations and missing TE/apex on every rank;
    # none of it is actionable for a user of this CLI.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # torch.utils.cpp_extension warns "No CUDA runtime is found" when megatron-core imports it on CPU.
    for name in ("megatron", "megatron.core", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _summary(final: dict) -> str:
    before, after = final.get("eval/accuracy_before"), final.get("eval/accuracy")
    if before is None or after is None:
        return "done"
    return (
        f"held-out accuracy: {100 * before:.1f}% before NFT -> {100 * after:.1f}% after "
        f"({100 * (after - before):+.1f} points)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from megatron_nft.config import load_config, to_yaml
    from megatron_nft.errors import UserError

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        if args.command == "demo":
            from megatron_nft.demo import run_demo

            final = run_demo(cfg, quiet=args.quiet)
        else:
            from megatron_nft.errors import ConfigError
            from megatron_nft.trainer import prepare_run_dir, train

            if cfg.model.hf_path is None:
                raise ConfigError("train needs model.hf_path (a Hugging Face Qwen2 checkpoint directory)")
            prepare_run_dir(cfg)
            final = train(cfg, quiet=args.quiet)
        from megatron_nft.runtime import is_main_rank

        if is_main_rank():
            print(_summary(final))
            print(f"run directory: {cfg.run.dir} (metrics.jsonl, curves.png, checkpoints/, hf/)")
        return 0
    except UserError as e:
        print(f"megatron-nft: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("megatron-nft: interrupted", file=sys.stderr)
        return 130
    finally:
        from megatron_nft import runtime

        runtime.destroy()


if __name__ == "__main__":
    sys.exit(main())
