"""Fused chunked per-token log-probs vs the naive path, forward + backward, time and peak extra memory.

    python bench/logprobs.py                                  # CPU, V=152064, H=1536, T in 1024 4096 16384
    python bench/logprobs.py --device cuda --dtype bf16       # on a GPU (torch.cuda.max_memory_allocated)
    python bench/logprobs.py --tokens 4096 --chunk-sizes 512 1024 2048

Both paths get the same random inputs (hidden [T, H], weight [V, H], labels [T], a random upstream
gradient per token, as a policy loss gives) and compute d/d(hidden) and d/d(weight):
  naive   logits = hidden @ weight.T -> .float() / temperature -> log_softmax -> gather; autograd
  fused   megatron_nft.model.logprobs.token_logprobs (chunked, hand-written backward)
The naive path is the baseline, measured in the same run; ratios are fused / naive.

Peak extra memory = the most memory held at any moment during forward + backward beyond what the
inputs already held (so it includes the gradients both paths produce).
  CPU: torch has no allocator statistics there, so every (path, T) runs in a FRESH subprocess that
       builds the inputs, resets the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs),
       records VmRSS, runs the step once and reads VmHWM: extra = VmHWM - VmRSS before. Large tensors
       are mmap-ed by the allocator and returned on free, so RSS follows live tensors closely; a
       tiny warm-up call first keeps library start-up (threads, kernels) out of the figures.
  CUDA: in one process, after a warm-up step of the same size, torch.cuda.max_memory_allocated()
       minus memory_allocated() before the step (reset_peak_memory_stats in between).
Time: forward + backward, the minimum over --repeats (CPU: that many fresh processes; CUDA:
synchronised repeats after the warm-up). On CPU also the process's CPU time (user + system, all
threads) for the step, with OMP_WAIT_POLICY=PASSIVE so idle OpenMP threads do not spin: on a box
shared with other work, wall time measures the neighbours as much as the code, CPU time much less.
Peak memory: the largest over the repeats. A naive run whose estimated need exceeds the free memory
is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# the two paths
# ------------------------------------------------------------------------------------------------


def make_inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Same inputs for both paths: RMS-normed-like hidden states, 0.02-std weights (logits ~ N(0, 0.8))."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    w = torch.randn(vocab, hidden, generator=g, device=device).mul_(0.02).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    upstream = torch.randn(tokens, generator=g, device=device)
    return h.requires_grad_(), w.requires_grad_(), labels, upstream


def naive_step(h, w, labels, upstream, *, temperature: float, chunk_size: int):
    del chunk_size
    logits = (h @ w.t()).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    (logprobs * upstream).sum().backward()
    return logprobs.detach()


def fused_step(h, w, labels, upstream, *, temperature: float, chunk_size: int):
    from megatron_nft.model.logprobs import token_logprobs

    logprobs, _ = token_logprobs(h, w, labels, chunk_size=chunk_size, temperature=temperature)
    (logprobs * upstream).sum().backward()
    return logprobs.detach()


PATHS = {"naive": naive_step, "fused": fused_step}


def save_sample(path: str, logprobs, h, w, labels) -> None:
    """What the parent compares between the paths: all log-probs, a slice of each gradient."""
    sample_rows = torch.unique(labels[:64])
    torch.save(
        {
            "logprobs": logprobs.cpu(),
            "grad_hidden": h.grad[:256].float().cpu(),
            "grad_weight_rows": w.grad[sample_rows].float().cpu(),
        },
        path,
    )


# ------------------------------------------------------------------------------------------------
# CPU: one fresh process per measurement
# ------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_worker(args) -> None:
    """Runs one (path, T) measurement and writes JSON + a sample of the results for the parent."""
    torch.set_num_threads(args.threads)
    step = PATHS[args.worker_path]
    # warm-up at a tiny size: thread pool, kernels, allocator
    small = make_inputs(8, 64, 16, DTYPES[args.dtype], "cpu")
    step(*small, temperature=args.temperature, chunk_size=4)
    del small

    h, w, labels, upstream = make_inputs(args.worker_tokens, args.vocab, args.hidden, DTYPES[args.dtype], "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    before = _proc_status_kib("VmRSS")
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    logprobs = step(h, w, labels, upstream, temperature=args.temperature, chunk_size=args.chunk_size)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    peak = _proc_status_kib("VmHWM")
    save_sample(args.sample_out, logprobs, h, w, labels)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra_bytes": (peak - before) * 1024}))


def run_cpu(path: str, tokens: int, chunk_size: int, args, sample_out: str) -> dict:
    cmd = [
        sys.executable, __file__, "--worker-path", path, "--worker-tokens", str(tokens),
        "--sample-out", sample_out, "--chunk-size", str(chunk_size), "--vocab", str(args.vocab),
        "--hidden", str(args.hidden), "--dtype", args.dtype, "--temperature", str(args.temperature),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{path} at T={tokens} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "seconds": min(r["seconds"] for r in runs),
        "cpu_seconds": min(r["cpu_seconds"] for r in runs),
        "peak_extra_bytes": max(r["peak_extra_bytes"] for r in runs),
    }


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def naive_need_bytes(tokens: int, vocab: int, hidden: int, itemsize: int) -> int:
    """Rough need of the naive step: ~4 live fp32 [T, V] buffers at its peak, plus grads."""
    return 4 * tokens * vocab * 4 + vocab * hidden * itemsize + tokens * hidden * itemsize


# ------------------------------------------------------------------------------------------------
# CUDA: both paths in this process
# ------------------------------------------------------------------------------------------------


def run_cuda(path: str, tokens: int, chunk_size: int, args, sample_out: str) -> dict:
    step = PATHS[path]
    h, w, labels, upstream = make_inputs(tokens, args.vocab, args.hidden, DTYPES[args.dtype], "cuda")

    def once():
        h.grad = w.grad = None
        return step(h, w, labels, upstream, temperature=args.temperature, chunk_size=chunk_size)

    once()  # warm-up at the same size (kernels, cuBLAS workspaces)
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logprobs = once()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - before
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    save_sample(sample_out, logprobs, h, w, labels)
    del h, w, labels, upstream, logprobs
    torch.cuda.empty_cache()
    return {"seconds": min(times), "cpu_seconds": None, "peak_extra_bytes": peak_extra}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def machine(args) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = (
        f"{platform.platform()} | {cpu} | os.cpu_count()={os.cpu_count()} | RAM {ram:.0f} GiB | "
        f"python {platform.python_version()} | torch {torch.__version__} | threads per path {args.threads}"
    )
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        text += f" | GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return text


def compare(fused_file: str, naive_file: str) -> tuple[float, float]:
    """max |Δ logprob| and the larger relative difference of the sampled gradients (sanity check)."""
    f, n = torch.load(fused_file), torch.load(naive_file)
    dlp = (f["logprobs"] - n["logprobs"]).abs().max().item()
    rel = max(
        ((f[k] - n[k]).norm() / n[k].norm().clamp_min(1e-30)).item() for k in ("grad_hidden", "grad_weight_rows")
    )
    return dlp, rel


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=None, help="fused chunk sizes (default: the library default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads, the same for both paths")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (CPU: each in a fresh process)")
    p.add_argument("--skip-naive-above", type=int, default=None, help="do not run naive for T above this")
    p.add_argument("--json", default=None, help="append one JSON object per table row to this file")
    # internal: one CPU measurement in a fresh process
    p.add_argument("--worker-path", choices=sorted(PATHS), help=argparse.SUPPRESS)
    p.add_argument("--worker-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sample-out", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_path:
        cpu_worker(args)
        return

    from megatron_nft.model.logprobs import DEFAULT_CHUNK_SIZE

    chunk_sizes = args.chunk_sizes or [DEFAULT_CHUNK_SIZE]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    run = run_cuda if args.device == "cuda" else run_cpu
    itemsize = DTYPES[args.dtype].itemsize
    print(f"machine: {machine(args)}")
    print(f"load average at start: {os.getloadavg()}")
    print(f"V={args.vocab} H={args.hidden} dtype={args.dtype} temperature={args.temperature} device={args.device}")
    print(f"repeats: {args.repeats} (min time, max memory)")
    print(
        "| T | chunk | naive wall s | fused wall s | wall fused/naive | naive CPU s | fused CPU s | CPU fused/naive "
        "| naive peak extra GiB | fused peak extra GiB | memory fused/naive | max abs dlogprob | grad rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            naive_file = os.path.join(tmp, f"naive_{tokens}.pt")
            need = naive_need_bytes(tokens, args.vocab, args.hidden, itemsize)
            free = mem_available_bytes() if args.device == "cpu" else torch.cuda.mem_get_info()[0]
            naive = None
            if args.skip_naive_above is not None and tokens > args.skip_naive_above:
                print(f"(T={tokens}: naive skipped by --skip-naive-above)")
            elif need > 0.85 * free:
                print(f"(T={tokens}: naive skipped: needs ~{gib(need)} GiB, {gib(free)} GiB free)")
            else:
                naive = run("naive", tokens, chunk_sizes[0], args, naive_file)
            for chunk in chunk_sizes:
                fused_file = os.path.join(tmp, f"fused_{tokens}_{chunk}.pt")
                fused = run("fused", tokens, chunk, args, fused_file)
                cells = []
                for key, fmt in (("seconds", "{:.2f}"), ("cpu_seconds", "{:.2f}"), ("peak_extra_bytes", None)):
                    show = (lambda x: gib(x)) if fmt is None else fmt.format
                    a, b = (None if naive is None else naive[key]), fused[key]
                    ratio = f"{b / a:.3f}" if a and b else "-"
                    cells += ["-" if a is None else show(a), "-" if b is None else show(b), ratio]
                diffs = compare(fused_file, naive_file) if naive else (None, None)
                cells += [f"{x:.1e}" for x in diffs] if naive else ["-", "-"]
                print(f"| {tokens} | {chunk} | " + " | ".join(cells) + " |", flush=True)
                if args.json:  # one line per row, written as it comes
                    ratio = lambda key: fused[key] / naive[key] if naive and naive[key] and fused[key] else None
                    row = {"tokens": tokens, "chunk": chunk, "vocab": args.vocab, "hidden": args.hidden,
                           "dtype": args.dtype, "device": args.device, "naive": naive, "fused": fused,
                           "time_ratio": ratio("seconds"), "memory_ratio": ratio("peak_extra_bytes"),
                           "max_abs_dlogprob": diffs[0], "grad_rel_diff": diffs[1]}
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
