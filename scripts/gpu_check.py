"""gpu-check: one command that proves this project on a CUDA machine and writes what it measured.

    scripts/gpu-check OUTDIR                    # every step on the GPU (~12 min on one H200)
    scripts/gpu-check OUTDIR --only demo flex   # some steps (install always runs first)
    scripts/gpu-check --dry-run                 # the plan with its budgets, and the bundle checked
    scripts/gpu-check OUTDIR --device cpu       # the same plumbing on CPU at tiny sizes (a smoke test)

The machine needs Python 3.12 with torch; nothing of ours and no network. The first step installs,
from the wheels `make gpu-bundle` put in gpu-bundle/, only the packages the machine's Python cannot
import at an accepted version (into WORK/site, put on PYTHONPATH with this checkout). Then each step
runs as its own process group with its own time budget; when the budget is spent the group is killed
and the step recorded as a timeout with whatever it had written. OUTDIR/results.json and
OUTDIR/results.md are rewritten after every step (temp name + rename), OUTDIR/gpu-check.log holds
every command's output; bulky work files (run directories, junit XML, raw benchmark rows) go to
--work (default: a fresh temporary folder), so that OUTDIR stays three files. docs/gpu.md explains
each step and how to read results.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bundle  # noqa: E402
from gpu_results import Results  # noqa: E402

REPO = gpu_bundle.REPO
LOG_NAME = "gpu-check.log"
TAIL_CHARS = 4000

# The learning check of the demo step: held-out accuracy must rise by at least this many points over the
# reduced run (on CPU, 40 steps of recipes/demo.yaml take it from 19.6% to 34.2%: docs/benchmarks.md).
DEMO_STEPS = 40
DEMO_2RANK_STEPS = 10
DEMO_MIN_GAIN = 0.05


class StepTimeout(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# running commands under a step's budget
# --------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a step needs: where to write, the environment of its commands, its deadline, and the record
    it fills in (summary, notes, tables, failures) as it goes, so a timeout keeps what it found."""

    args: argparse.Namespace
    out: Path
    work: Path
    env: dict
    deadline: float = 0.0
    record: dict = field(default_factory=dict)
    last_output: tuple[Path, int] | None = None  # (log, offset) of the latest command's output

    @property
    def python(self) -> str:
        return self.args.python

    @property
    def cpu(self) -> bool:
        return self.args.device == "cpu"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, text: str) -> None:
        self.record.setdefault("notes", []).append(text)

    def run(self, argv: list[str], *, env: dict | None = None, timeout: float | None = None) -> tuple[int, str]:
        """Runs `argv` in the repository as a new process group, output appended to the log; returns
        (exit status, its output's tail). Past the step's deadline (or `timeout`, if sooner) the whole
        group is killed and StepTimeout raised."""
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        if limit <= 0:
            raise StepTimeout(f"no time left in the step's budget for: {shlex.join(argv)}")
        log = self.out / LOG_NAME
        with open(log, "a") as f:
            f.write(f"\n$ {shlex.join(argv)}   [{datetime.datetime.now():%H:%M:%S}, {limit:.0f} s left]\n")
            f.flush()
            offset = f.tell()
            self.last_output = (log, offset)
            proc = subprocess.Popen(argv, cwd=REPO, env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            own_limit = timeout is not None and timeout < self.remaining()
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                tail = read_tail(log, offset)
                self.record["log_tail"] = tail
                if own_limit:
                    return 124, tail  # the command's own limit, not the step's
                raise StepTimeout(f"killed after {limit:.0f} s: {shlex.join(argv)}") from None
        tail = read_tail(log, offset)
        self.record["log_tail"] = tail
        return rc, tail


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL 10 s later if anything is left."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def read_tail(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(offset, os.path.getsize(path) - TAIL_CHARS))
        return f.read().decode(errors="replace")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# step 0: install what the machine lacks
# --------------------------------------------------------------------------------------------------

_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {}
for dist, module in json.loads(sys.argv[1]):
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = None
    try:
        importlib.import_module(module)
        error = None
    except Exception as e:  # any failure to import means the package cannot be used as it is
        error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    out[dist] = {"version": version, "error": error}
print(json.dumps(out))
"""


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string ("2.11.0+cu130" -> (2, 11, 0))."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def accepted(version: str | None, spec: str) -> bool:
    """Whether `version` meets a Wheel.accept spec ("==X" exactly, ">=X" by release numbers)."""
    if version is None:
        return False
    op, wanted = spec[:2], spec[2:]
    if op == "==":
        return version == wanted
    if op == ">=":
        return release(version) >= release(wanted)
    raise ValueError(f"accept spec {spec!r}: expected '==X' or '>=X'")


def probe_versions(python: list[str], wheels, env: dict, timeout: float = 120) -> dict:
    """{dist: {version, error}} as `python` (a command prefix) sees them in `env`."""
    pairs = json.dumps([[w.dist, w.module] for w in wheels])
    out = subprocess.run([*python, "-c", _PROBE, pairs], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"probing the installed packages failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def usable(state: dict, wheel) -> bool:
    return state["error"] is None and accepted(state["version"], wheel.accept)


def install_missing(python: list[str], bundle: Path, site: Path, env: dict, wheels=gpu_bundle.BUNDLE,
                    deadline: float | None = None) -> list[dict]:
    """Installs (pip --no-index --no-deps --target `site`) each bundled wheel that `python` cannot use
    as it is; returns one row per wheel: what was there, what was done, what is there now. Each command
    must end by `deadline` (time.monotonic()), else subprocess.TimeoutExpired."""
    left = lambda: 300.0 if deadline is None else max(deadline - time.monotonic(), 0.1)  # noqa: E731
    before = probe_versions(python, wheels, env, timeout=left())
    todo = [w for w in wheels if not usable(before[w.dist], w)]
    found = gpu_bundle.wheel_files(bundle)
    if todo:
        missing = [w.dist for w in todo if gpu_bundle.normalize(w.dist) not in found]
        if missing:
            raise RuntimeError(f"{bundle}: no wheel for {', '.join(missing)} (run `make gpu-bundle` and carry the folder)")
        site.mkdir(parents=True, exist_ok=True)
        paths = [str(found[gpu_bundle.normalize(w.dist)][1]) for w in todo]
        subprocess.run([*python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--upgrade", "--target", str(site), *paths],
                       check=True, env=env, capture_output=True, text=True, timeout=left())
    after = probe_versions(python, wheels, env, timeout=left())
    return [{"package": w.dist, "accepts": w.accept, "found": before[w.dist]["version"] or "missing",
             "action": "installed" if w in todo else "kept", "now": after[w.dist]["version"],
             "import": "ok" if after[w.dist]["error"] is None else after[w.dist]["error"]} for w in wheels]


_MACHINE = r"""
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
print(json.dumps(info))
"""


def step_install(ctx: Context) -> bool:
    try:
        rows = install_missing([ctx.python], ctx.args.bundle, ctx.work / "site", ctx.env, deadline=ctx.deadline)
    except subprocess.TimeoutExpired as e:
        raise StepTimeout(f"killed after the step's budget: {shlex.join(map(str, e.cmd))[:200]}") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"pip install from the bundle failed: {(e.stderr or '').strip()[-500:]}") from None
    ctx.record["tables"] = {"packages": rows}
    installed = [r["package"] for r in rows if r["action"] == "installed"]
    ctx.note(f"installed from {ctx.args.bundle}: {', '.join(installed) or 'nothing (all present)'}; site {ctx.work / 'site'}")
    rc, tail = ctx.run([ctx.python, "-c", _MACHINE])
    if rc == 0:
        info = json.loads(tail.strip().splitlines()[-1])
        ctx.record["machine"] = info
        ctx.note("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        if not ctx.cpu and not info.get("cuda_available"):
            ctx.record["summary"] = "torch sees no CUDA device (use --device cpu for the CPU smoke run)"
            return False
    bad = [r for r in rows if r["import"] != "ok"]
    ctx.record["summary"] = (f"{len(installed)} installed, {len(rows) - len(installed)} already there"
                             + (f"; not importable: {', '.join(r['package'] for r in bad)}" if bad else ""))
    return rc == 0 and not bad


# --------------------------------------------------------------------------------------------------
# steps 1 and 6: pytest selections, read from their junit XML
# --------------------------------------------------------------------------------------------------


def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """({tests, failures, errors, skipped, passed}, ["node: first line of the message", ...])."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in root.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append(f"{case.get('classname')}::{case.get('name')} ({child.tag}): {message[0][:300] if message else ''}")
    return counts, failures


_VERBOSE_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)


def verbose_counts(text: str) -> tuple[dict, list[str]]:
    """Counts from pytest -v's streamed result lines: what a run cut short had finished."""
    results = _VERBOSE_RESULT.findall(text)
    counts = {"tests": len(results), "failures": sum(r == "FAILED" for _, r in results),
              "errors": sum(r == "ERROR" for _, r in results), "skipped": sum(r == "SKIPPED" for _, r in results)}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts, [f"{node} ({r.lower()})" for node, r in results if r in ("FAILED", "ERROR")]


def run_pytest(ctx: Context, name: str, selection: list[str], per_test_s: int) -> bool:
    """pytest over `selection` with a per-test timeout; counts from its junit XML, or, when the step's
    budget ends first, from the result lines it had printed."""
    xml = ctx.work / f"{name}.xml"
    xml.unlink(missing_ok=True)
    ctx.note("pytest " + shlex.join(selection))
    argv = [ctx.python, "-m", "pytest", "-v", "-o", "addopts=", "-p", "no:cacheprovider", f"--junitxml={xml}",
            f"--timeout={per_test_s}", *selection]
    try:
        rc, _ = ctx.run(argv)
    except StepTimeout:
        log, offset = ctx.last_output
        with open(log, "rb") as f:
            f.seek(offset)
            counts, failures = verbose_counts(f.read().decode(errors="replace"))
        ctx.record.update(counts=counts, failures=failures)
        ctx.record["summary"] = f"cut short after {counts['tests']} tests: " + ", ".join(
            f"{v} {k}" for k, v in counts.items() if k != "tests")
        raise
    if not xml.is_file():
        ctx.record["summary"] = f"pytest exited {rc} without a report"
        return False
    counts, failures = junit_counts(xml)
    ctx.record.update(counts=counts, failures=failures)
    ctx.record["summary"] = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "tests") + f" of {counts['tests']}"
    if rc == 5 or counts["tests"] == 0:  # pytest's "no tests collected"
        ctx.record["summary"] = "no test selected"
        ctx.record["status"] = "skipped"
    return rc in (0, 5) and counts["failures"] == 0 and counts["errors"] == 0


TRANSPORT_FILES = ["tests/test_weight_sync.py", "tests/test_sglang_client.py"]


def sglang_importable(ctx: Context) -> bool:
    return subprocess.run([ctx.python, "-c", "import sglang"], env=ctx.env, capture_output=True).returncode == 0


def step_gpu_tests(ctx: Context) -> bool:
    if ctx.cpu:  # CUDA tests cannot run here: a fast CPU selection exercises the same plumbing
        selection = ["-m", "not gpu and not slow", "tests/test_bench_actor.py", "-k", "sequence_lengths or variant_names"]
    else:
        # The transport tests are step 6's, and this kit's own GPU test would run the kit inside itself.
        selection = ["-m", "gpu", "tests", *(f"--ignore={f}" for f in [*TRANSPORT_FILES, "tests/test_gpu_check.py"])]
    return run_pytest(ctx, "gpu-tests", selection, per_test_s=int(ctx.args.budget_scale * 80))


def step_transports(ctx: Context) -> bool:
    if ctx.cpu:
        selection = ["-m", "not gpu and not slow", *TRANSPORT_FILES, "-k", "disk or cuda_ipc_payload"]
    else:
        selection = ["-m", "gpu", *TRANSPORT_FILES]
        if not sglang_importable(ctx):
            # A real SGLang server cannot be carried to the machine (its wheels pin their own torch);
            # the stand-in server's GPU tests are the ones that run.
            selection += ["-k", "not real_sglang"]
            ctx.note("sglang is not importable here: tests against a real SGLang server deselected (-k 'not real_sglang')")
    return run_pytest(ctx, "transports", selection, per_test_s=int(ctx.args.budget_scale * 45))


# --------------------------------------------------------------------------------------------------
# step 2: the demo recipe through torchrun
# --------------------------------------------------------------------------------------------------


def demo_overrides(ctx: Context, run_dir: Path, steps: int) -> list[str]:
    common = [f"run.dir={run_dir}", "run.overwrite=true", f"run.steps={steps}"]
    if ctx.cpu:  # the plumbing only: a few samples, a step or two
        return common + ["warmup.steps=4", "eval.every=1", "eval.samples=2", "rollout.prompts_per_step=8",
                         "rollout.gen_prompts=8", "rollout.samples_per_prompt=4", "rollout.max_num_gen_batches=1",
                         "data.n_train=300", "reward.workers=1"]
    # the recipe as it is, fewer NFT steps; the grading pool and generation use the machine's cores
    return common + ["eval.every=10", f"reward.workers={min(8, os.cpu_count() or 2)}"]


def torchrun(ctx: Context, ranks: int, script_args: list[str]) -> list[str]:
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "scripts/gpu_demo.py", *script_args]


def demo_result(ctx: Context, name: str, rc: int, out_json: Path, run_dir: Path, min_gain: float | None) -> bool:
    if out_json.is_file():
        r = json.loads(out_json.read_text())
    else:  # cut short: what the run had logged
        history = [[row["step"], row["eval/accuracy"]] for row in read_jsonl(run_dir / "metrics.jsonl")
                   if "eval/accuracy" in row]
        r = {"eval_history": history, "accuracy_before": history[0][1] if history else None,
             "accuracy_after": history[-1][1] if len(history) > 1 else None}
    before, after = r.get("accuracy_before"), r.get("accuracy_after")
    gain = after - before if before is not None and after is not None else None
    ctx.record.setdefault("tables", {})[name] = [
        {"step": s, "held-out accuracy %": round(100 * a, 1)} for s, a in r.get("eval_history", [])]
    ctx.record.setdefault("metrics", {})[name] = {k: r.get(k) for k in ("device", "backend", "world_size", "steps",
                                                                         "accuracy_before", "accuracy_after", "seconds")}
    text = (f"{name}: {100 * before:.1f}% -> {100 * after:.1f}% ({100 * gain:+.1f} points)" if gain is not None
            else f"{name}: no accuracy (exit {rc})")
    ok = rc == 0 and gain is not None and (min_gain is None or gain >= min_gain)
    if rc == 0 and gain is not None and min_gain is not None and gain < min_gain:
        text += f", below the required +{100 * min_gain:.0f}"
    ctx.record["summary"] = (ctx.record.get("summary", "") + "; " if ctx.record.get("summary") else "") + text
    return ok


def step_demo(ctx: Context) -> bool:
    run_dir, out_json = ctx.work / "demo-1rank", ctx.work / "demo-1rank.json"
    out_json.unlink(missing_ok=True)
    steps = 2 if ctx.cpu else DEMO_STEPS
    ctx.note(f"recipes/demo.yaml with run.steps={steps} (the recipe's 80 reduced), 1 rank, "
             f"{'CPU (gloo)' if ctx.cpu else 'CUDA (NCCL)'}; learning check: +{100 * DEMO_MIN_GAIN:.0f} points or more"
             + (" (not applied on CPU)" if ctx.cpu else ""))
    rc, _ = ctx.run(torchrun(ctx, 1, ["--json", str(out_json), *demo_overrides(ctx, run_dir, steps)]))
    return demo_result(ctx, "1 rank", rc, out_json, run_dir, None if ctx.cpu else DEMO_MIN_GAIN)


def step_demo_2ranks(ctx: Context) -> bool:
    """Two ranks on the one GPU: NCCL if it accepts two ranks on a device (a probe), else gloo."""
    run_dir, out_json = ctx.work / "demo-2ranks", ctx.work / "demo-2ranks.json"
    out_json.unlink(missing_ok=True)
    backend = "gloo"
    if not ctx.cpu:
        rc, tail = ctx.run(torchrun(ctx, 2, ["--probe", "--share-device", "--backend", "nccl"]), timeout=60)
        if rc == 0:
            backend = "nccl"
            ctx.note("NCCL accepted two ranks on one GPU (probe all-reduce passed): the run uses NCCL")
        else:
            reason = next((l.strip() for l in tail.splitlines() if "Duplicate GPU" in l or "ncclInvalidUsage" in l),
                          tail.strip().splitlines()[-1][:300] if tail.strip() else f"exit {rc}")
            ctx.note(f"NCCL refused two ranks on one GPU ({reason}): the run uses gloo, CUDA tensors on both ranks")
    else:
        ctx.note("CPU: two ranks over gloo")
    steps = 2 if ctx.cpu else DEMO_2RANK_STEPS
    ctx.note(f"recipes/demo.yaml with run.steps={steps}, 2 ranks (data parallel), backend {backend}; "
             "accuracy reported, no learning threshold (fewer steps)")
    args = ["--backend", backend] + ([] if ctx.cpu else ["--share-device"])
    rc, _ = ctx.run(torchrun(ctx, 2, [*args, "--json", str(out_json), *demo_overrides(ctx, run_dir, steps)]))
    ctx.record.setdefault("metrics", {})["backend"] = backend
    return demo_result(ctx, f"2 ranks ({backend})", rc, out_json, run_dir, None)


# --------------------------------------------------------------------------------------------------
# steps 3-5: benchmarks
# --------------------------------------------------------------------------------------------------


def step_throughput(ctx: Context) -> bool:
    out = ctx.work / "throughput.jsonl"
    out.unlink(missing_ok=True)
    if ctx.cpu:
        sizes = ["--model", "tiny", "--tokens", "256", "--steps", "1", "--warmup", "0", "--micro-batches", "1", "--rows", "4"]
    else:
        sizes = ["--model", "qwen2.5-1.5b", "--tokens", "4096", "16384", "--steps", "2", "--warmup", "1",
                 "--micro-batches", "2", "--dtype", "bf16"]
    variants = ["bf16", "bf16+full"]
    rc, _ = ctx.run([ctx.python, "bench/actor_throughput.py", *sizes, "--impl", "local",
                     "--variants", ",".join(variants), "--json", str(out)])
    rows = read_jsonl(out)
    ctx.record["tables"] = {"train step": [
        {"budget": r["budget"], "variant": r["variant"], "tokens/s": round(r["tokens_per_s"]),
         "TFLOP/s": r["tflops"], "MFU %": None if r["mfu"] is None else round(100 * r["mfu"], 1),
         "peak GiB": r["peak_gib"], "s/step": r["step_s"], "x baseline": r["ratio_to_baseline"]} for r in rows]}
    expected = (1 if ctx.cpu else 2) * len(variants)
    if rows:
        peak = rows[0]["peak_tflops"]
        ctx.note(f"{rows[0]['model']}, local layer spec, {rows[0]['dtype']}, packed micro-batches; MFU against "
                 + (f"{peak} TFLOP/s dense BF16 (megatron_nft.plan.GPUS)" if peak else "no known peak"))
        best = max(rows, key=lambda r: r["tflops"])
        ctx.record["summary"] = (f"{len(rows)}/{expected} rows; best {best['variant']} at {best['budget']}: "
                                 f"{best['tokens_per_s']:,.0f} tokens/s, {best['tflops']:.1f} TFLOP/s"
                                 + (f", MFU {100 * best['mfu']:.1f}%" if best["mfu"] else ""))
    return rc == 0 and len(rows) == expected


def step_logprobs(ctx: Context) -> bool:
    out = ctx.work / "logprobs.jsonl"
    out.unlink(missing_ok=True)
    if ctx.cpu:
        sizes = ["--device", "cpu", "--tokens", "64", "--vocab", "512", "--hidden", "32", "--repeats", "1", "--threads", "1"]
        tokens = [64]
    else:
        tokens = [4096, 16384]
        sizes = ["--device", "cuda", "--dtype", "bf16", "--tokens", *map(str, tokens), "--vocab", "152064",
                 "--hidden", "1536", "--repeats", "3"]
    rc, _ = ctx.run([ctx.python, "bench/logprobs.py", *sizes, "--json", str(out)])
    rows = read_jsonl(out)
    ctx.record["tables"] = {"fused vs naive": [
        {"T": r["tokens"], "V": r["vocab"], "dtype": r["dtype"], "chunk": r["chunk"],
         "naive s": (r["naive"] or {}).get("seconds"), "fused s": r["fused"]["seconds"], "time fused/naive": r["time_ratio"],
         "naive peak GiB": (r["naive"] or {}).get("peak_extra_bytes", 0) / 2**30 if r["naive"] else None,
         "fused peak GiB": r["fused"]["peak_extra_bytes"] / 2**30, "memory fused/naive": r["memory_ratio"],
         "max |dlogprob|": r["max_abs_dlogprob"]} for r in rows]}
    ctx.record["summary"] = "; ".join(
        f"T={r['tokens']}: time x{r['time_ratio']:.2f}, memory x{r['memory_ratio']:.3f}" if r["time_ratio"] and r["memory_ratio"]
        else f"T={r['tokens']}: no naive baseline" for r in rows)
    return rc == 0 and sorted(r["tokens"] for r in rows) == tokens and all(r["time_ratio"] for r in rows)


def step_flex(ctx: Context) -> bool:
    out = ctx.work / "flex.json"
    out.unlink(missing_ok=True)
    if ctx.cpu:
        sizes = ["--device", "cpu", "--compile-backend", "eager", "--min-tokens", "64", "--max-tokens", "512",
                 "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
    else:
        sizes = ["--device", "cuda"]
    rc, _ = ctx.run([ctx.python, "bench/flex_compile.py", "--lengths", "10", *sizes, "--json", str(out)])
    if not out.is_file():
        return False
    r = json.loads(out.read_text())
    ctx.record["metrics"] = {k: v for k, v in r.items() if k != "rows"}
    ctx.record["tables"] = {"per micro-batch length": r["rows"]}
    ctx.record["summary"] = (f"{r['lengths']} lengths: {r['compiles_total']} compiles, {r['compiles_after_second_length']} "
                             f"after the second length ({r['compile_backend']}, recompile limit {r['recompile_limit']})")
    limit = r["recompile_limit"] or float("inf")
    return rc == 0 and r["compiles_total"] < limit


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    title: str
    run: Callable[[Context], bool]


# Budgets: 575 s in all, so that one 10-minute call on a lent machine holds the whole run with its
# start-up; the order is the issue's, and each step's result is on disk before the next starts.
STEPS = (
    Step("install", 40, "install what the machine lacks from the bundle; record the machine", step_install),
    Step("gpu-tests", 100, "the gpu-marked tests (pytest -m gpu), but the transports' (step transports)", step_gpu_tests),
    Step("demo", 120, f"recipes/demo.yaml, {DEMO_STEPS} NFT steps, 1 rank on CUDA via torchrun: held-out accuracy "
         f"must rise by >= {100 * DEMO_MIN_GAIN:.0f} points", step_demo),
    Step("demo-2ranks", 60, f"recipes/demo.yaml, {DEMO_2RANK_STEPS} steps, 2 ranks sharing the GPU: NCCL if it "
         "allows two ranks on one device, else gloo", step_demo_2ranks),
    Step("throughput", 120, "bench/actor_throughput.py, Qwen2.5-1.5B shape, local spec, bf16, packed 4K and 16K, "
         "recompute none and full: tokens/s, TFLOP/s, MFU, peak memory", step_throughput),
    Step("logprobs", 40, "bench/logprobs.py on CUDA: fused vs naive log-probs at T=4096 and 16384, V=152064, bf16",
         step_logprobs),
    Step("flex", 40, "bench/flex_compile.py: FlexAttention compiles over 10 micro-batch lengths (1K-16K tokens)",
         step_flex),
    Step("transports", 55, "gpu-marked tests of test_weight_sync.py and test_sglang_client.py: CUDA-IPC and disk "
         "transports into the stand-in server, log-prob parity", step_transports),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def selected_steps(only: list[str] | None) -> list[Step]:
    if not only:
        return list(STEPS)
    return [s for s in STEPS if s.name == "install" or s.name in only]


def run_step(step: Step, ctx: Context, budget: float) -> dict:
    """Runs one step under its budget and returns its record (never raises)."""
    ctx.record = {"name": step.name, "title": step.title, "budget_s": round(budget)}
    start = time.monotonic()
    ctx.deadline = start + budget
    try:
        ok = step.run(ctx)
        status = ctx.record.pop("status", None) or ("passed" if ok else "failed")
    except StepTimeout as e:
        status = "timeout"
        ctx.note(str(e))
        ctx.record.pop("status", None)
    except Exception as e:  # a step's own failure is its result; the next step still runs
        status = "error"
        ctx.note(f"{type(e).__name__}: {e}")
        ctx.record.pop("status", None)
    ctx.record.update(status=status, seconds=round(time.monotonic() - start, 1))
    return ctx.record


def step_env(args, work: Path) -> dict:
    env = dict(os.environ)
    paths = [str(work / "site"), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def describe_plan(steps: list[Step], args) -> str:
    total = sum(s.budget_s for s in steps) * args.budget_scale
    lines = [f"gpu-check plan: {len(steps)} steps on {args.device}, {total:.0f} s ({total / 60:.1f} min) of budgets in all"]
    lines += [f"  {s.name:<12s} {s.budget_s * args.budget_scale:>5.0f} s  {s.title}" for s in steps]
    return "\n".join(lines)


def dry_run(args) -> int:
    steps = selected_steps(args.only)
    print(describe_plan(steps, args))
    problems = gpu_bundle.check(args.bundle)
    size = gpu_bundle.folder_bytes(args.bundle) + gpu_bundle.tree_bytes()
    found = gpu_bundle.wheel_files(args.bundle)
    for w in gpu_bundle.BUNDLE:
        got = found.get(gpu_bundle.normalize(w.dist))
        print(f"  bundle: {w.dist:<24s} {w.version:<8s} {got[1].name if got else 'MISSING'}")
    print(f"bundle {args.bundle} + source tree: {size / 2**20:.1f} MiB (limit {gpu_bundle.SIZE_LIMIT / 2**20:.0f} MiB)")
    if size >= gpu_bundle.SIZE_LIMIT:
        problems.append(f"bundle + source tree {size / 2**20:.1f} MiB: over the {gpu_bundle.SIZE_LIMIT / 2**20:.0f} MiB "
                        "the lent machine accepts")
    for line in problems:
        print(f"gpu-check: {line}", file=sys.stderr)
    return 1 if problems else 0


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", type=Path, help="where results.json, results.md and gpu-check.log go")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, check the bundle, run nothing")
    ap.add_argument("--only", nargs="+", metavar="STEP", help=f"run only these steps (and install): {', '.join(STEP_NAMES)}")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the same steps at tiny sizes on CPU, CUDA hidden (checks the kit, measures nothing)")
    ap.add_argument("--bundle", type=Path, default=gpu_bundle.DEFAULT_DIR, help="the wheels (default: gpu-bundle/)")
    ap.add_argument("--work", type=Path, default=None, help="work files (default: a new temporary folder)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's budget (slow machines)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the steps run with (default: this one)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(STEP_NAMES))
    if unknown:
        ap.error(f"--only {' '.join(unknown)}: not a step; the steps are {', '.join(STEP_NAMES)}")
    if not args.dry_run and args.outdir is None:
        ap.error("OUTDIR is required (the folder for results.json and results.md), unless --dry-run")
    return args


def main(argv=None, steps: list[Step] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    steps = steps if steps is not None else selected_steps(args.only)
    out = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.bundle = args.bundle.resolve()
    print(describe_plan(steps, args), flush=True)
    results = Results(out, {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": args.device, "host": platform.node(), "repo_commit": git_commit(), "bundle": str(args.bundle),
        "work": str(work), "plan": [{"name": s.name, "budget_s": s.budget_s * args.budget_scale, "title": s.title}
                                    for s in steps],
    })
    results.write()
    ctx = Context(args=args, out=out, work=work, env=step_env(args, work))
    start = time.monotonic()
    for step in steps:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {step.name} (budget {step.budget_s * args.budget_scale:.0f} s)",
              flush=True)
        record = run_step(step, ctx, step.budget_s * args.budget_scale)
        if step.name == "install" and "machine" in record:
            results.doc["machine"] = ", ".join(f"{k} {v}" for k, v in record["machine"].items())
        results.record(record)
        print(f"    {record['status']} in {record['seconds']:.0f} s: {record.get('summary', '')}", flush=True)
        if step.name == "install" and record["status"] != "passed":
            print("gpu-check: the install step failed; nothing else can run (see results.md)", file=sys.stderr)
            break
    results.finish(finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   wall_s=round(time.monotonic() - start, 1))
    print(f"results: {out / 'results.md'} (work files in {work})")
    return 0 if all(s["status"] in ("passed", "skipped") for s in results.doc["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
