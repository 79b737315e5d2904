"""HF -> Megatron -> HF round trip of a Qwen2.5-0.5B-shaped random model on CPU: peak memory, size, time.

    python bench/convert_0p5b.py [--workdir DIR] [--tp N --pp N] [--hf-dtype bf16|fp32] [--verify] [--keep]

The HF checkpoint is random but has Qwen2.5-0.5B's exact config (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocab 151936, tied embeddings, rope_theta 1e6) and, like the released model,
one bf16 model.safetensors (~0.99 GB). Both converters run as real `python -m` subprocesses; their peak
memory is measured two ways:
  - max RSS of the largest single process (getrusage of reaped children: the kernel's own figure);
  - peak of the summed RSS over the whole process tree (psutil, sampled every 50 ms; counts pages
    shared between processes, e.g. the mmapped safetensors file, once per process).
Baseline printed against, from the same run: the HF checkpoint's own size on disk (peak RSS / HF bytes).
The exported checkpoint is compared with the source tensor by tensor (bit-exact); --verify adds a fp32
logit-parity run of checkpoints_tools.verify against transformers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN25_0P5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768, max_window_layers=21,
    hidden_act="silu", bos_token_id=151643, eos_token_id=151643,
)


def make_hf_checkpoint(out: Path, dtype: str) -> None:
    """Random tensors with the released model's names and shapes, generated and written one at a time."""
    import torch
    from transformers import Qwen2Config

    from megatron_nft.model.hf_io import save_hf_checkpoint
    from megatron_nft.model.mapping import hf_tensor_shapes
    from megatron_nft.model.qwen2 import shape_from_hf

    config = Qwen2Config(**QWEN25_0P5B)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, shp in hf_tensor_shapes(shape_from_hf(config)).items():
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shp, generator=g)
            elif name.endswith("bias"):
                t = 0.1 * torch.randn(shp, generator=g)
            else:
                t = 0.02 * torch.randn(shp, generator=g)
            yield name, t.to(torch_dtype)

    config.dtype = torch_dtype
    save_hf_checkpoint(out, tensors(), config, overwrite=True)


class TreeRSS:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(argv: list[str], logdir: Path) -> dict:
    """Runs a converter as `python -m ...` and returns wall time and peak memory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out_file, err_file = logdir / f"{argv[0]}.out", logdir / f"{argv[0]}.err"
    start = time.perf_counter()
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=out, stderr=err)
        sampler = TreeRSS(proc.pid)
        # wait4: the kernel's max RSS of the child and of every descendant it reaped (the largest one)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    tree_peak = sampler.stop()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err_file.read_text()[-4000:]}")
    return {"seconds": seconds, "max_rss": usage.ru_maxrss * 1024, "tree_peak": tree_peak, "stdout": out_file.read_text().strip()}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compare_bit_exact(a: Path, b: Path) -> tuple[int, list[str]]:
    import torch

    from megatron_nft.model.hf_io import hf_tensor_reader, hf_weight_map

    names_a, names_b = set(hf_weight_map(a)), set(hf_weight_map(b))
    bad = sorted(names_a ^ names_b)
    fa, fb = hf_tensor_reader(a), hf_tensor_reader(b)
    for name in sorted(names_a & names_b):
        x, y = fa(name), fb(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            bad.append(name)
    return len(names_a & names_b), bad


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nft-bench-convert-0p5b"))
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--hf-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--verify", action="store_true", help="also run checkpoints_tools.verify (fp32, 1 x 32 tokens)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    args = ap.parse_args()

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    hf, mg, back = work / "hf", work / "megatron", work / "hf_back"
    t = time.perf_counter()
    make_hf_checkpoint(hf, args.hf_dtype)
    print(f"random Qwen2.5-0.5B-shaped HF checkpoint ({args.hf_dtype}): {gib(dir_bytes(hf))} in {time.perf_counter() - t:.0f}s")
    hf_bytes = dir_bytes(hf)
    layout = ["--tp", str(args.tp), "--pp", str(args.pp)]

    imp = run_measured(["checkpoints_tools.hf_to_megatron", "--hf", str(hf), "--out", str(mg), *layout], work)
    ckpt_bytes = dir_bytes(mg)
    print(imp["stdout"])
    exp = run_measured(["checkpoints_tools.megatron_to_hf", "--ckpt", str(mg), "--hf-config", str(hf), "--out", str(back), *layout], work)
    count, bad = compare_bit_exact(hf, back)

    print(f"\nimport  hf_to_megatron --tp {args.tp} --pp {args.pp}: {imp['seconds']:.0f}s wall")
    print(f"        peak RSS, largest process: {gib(imp['max_rss'])}; process tree (sampled sum): {gib(imp['tree_peak'])}")
    print(f"        = {imp['tree_peak'] / hf_bytes:.2f}x the HF checkpoint ({gib(hf_bytes)})")
    print(f"        checkpoint: {gib(ckpt_bytes)} on disk ({ckpt_bytes / hf_bytes:.2f}x the HF checkpoint), "
          f"{len(list(mg.iterdir()))} files")
    print(f"export  megatron_to_hf --tp {args.tp} --pp {args.pp}: {exp['seconds']:.0f}s wall")
    print(f"        peak RSS, largest process: {gib(exp['max_rss'])}; process tree (sampled sum): {gib(exp['tree_peak'])}")
    print(f"round trip: {count} tensors compared, {'bit-exact' if not bad else f'{len(bad)} DIFFER: {bad[:5]}'}")
    status = 0 if not bad else 1
    if args.verify:
        ver = run_measured(["checkpoints_tools.verify", "--hf", str(hf), "--ckpt", str(mg), *layout, "--batch-size", "1", "--seq-len", "32"], work)
        print(f"verify ({ver['seconds']:.0f}s, peak RSS largest process {gib(ver['max_rss'])}):\n  " + ver["stdout"].replace("\n", "\n  "))
        status = status or (0 if ver["stdout"].endswith("PASS") else 1)
    if not args.keep:
        shutil.rmtree(work)
    return status


if __name__ == "__main__":
    sys.exit(main())
