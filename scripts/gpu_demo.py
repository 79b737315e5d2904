"""torchrun entry of gpu-check's demo steps: the demo recipe on this machine's device, any number of
ranks, with the process-group backend chosen here.

    torchrun --standalone --nproc-per-node 1 scripts/gpu_demo.py --json out.json run.dir=/tmp/d run.steps=40
    torchrun --standalone --nproc-per-node 2 scripts/gpu_demo.py --share-device --backend gloo --json ...
    torchrun --standalone --nproc-per-node 2 scripts/gpu_demo.py --share-device --backend nccl --probe

megatron_nft.runtime.init_process_group joins a default group that already exists, so this entry
creates it first when asked for something the runtime would not choose by itself: every rank on
CUDA device 0 (`--share-device`: one GPU for two ranks, where the runtime gives rank r device r), or
gloo on a CUDA machine (NCCL refuses two ranks on one device). `--probe` only checks that the
backend can all-reduce a tensor on the ranks' device and exits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def init_group(backend: str, share_device: bool) -> str:
    """Creates the default group (or leaves it to the runtime with backend 'auto'); returns the device."""
    import torch
    import torch.distributed as dist

    device = "cpu"
    if torch.cuda.is_available():
        index = 0 if share_device else int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    if backend != "auto":
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return device


def probe(device: str) -> None:
    import torch
    import torch.distributed as dist

    x = torch.ones(4, device=device) * (dist.get_rank() + 1)
    dist.all_reduce(x)
    world = dist.get_world_size()
    expected = world * (world + 1) / 2
    if x[0].item() != expected:
        raise SystemExit(f"probe: all_reduce gave {x[0].item()}, expected {expected}")
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                    help="auto: the runtime's choice (NCCL with CUDA, gloo without)")
    ap.add_argument("--share-device", action="store_true", help="every rank on CUDA device 0")
    ap.add_argument("--probe", action="store_true", help="one all-reduce on the ranks' device, then exit")
    ap.add_argument("--json", type=Path, help="rank 0 writes the final metrics here")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)

    device = init_group(args.backend, args.share_device)
    if args.probe:
        probe(device)
        return 0

    import torch.distributed as dist

    from megatron_nft import runtime
    from megatron_nft.config import load_config
    from megatron_nft.demo import run_demo

    start = time.perf_counter()
    try:
        cfg = load_config(args.recipe, args.overrides)
        final = run_demo(cfg, quiet=True)
        backend = dist.get_backend() if dist.is_initialized() else None
        world = dist.get_world_size() if dist.is_initialized() else 1
        main_rank = runtime.is_main_rank()
    finally:
        runtime.destroy()
    if args.json and main_rank:
        before, after = final.get("eval/accuracy_before"), final.get("eval/accuracy")
        history = []
        metrics = Path(cfg.run.dir) / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                row = json.loads(line)
                if "eval/accuracy" in row:
                    history.append([row.get("step"), row["eval/accuracy"]])
        args.json.write_text(json.dumps({
            "device": device, "backend": backend, "world_size": world, "steps": cfg.run.steps,
            "accuracy_before": before, "accuracy_after": after, "eval_history": history,
            "seconds": time.perf_counter() - start, "final": final,
        }, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
