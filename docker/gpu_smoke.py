"""The image's end-to-end smoke test: rollout server, Megatron actor, one train step, a weight sync
through disk, and log-prob agreement between the two.

    python /opt/megatron-nft/docker/gpu_smoke.py                 # on a GPU node (smoke.sh calls it)
    python docker/gpu_smoke.py --device cpu --work /tmp/smoke    # the same steps on CPU

On a GPU: a tiny random Qwen2 (HF format, with a BPE tokenizer trained here: no download) in bf16,
one SGLang server started by the command the trainer itself launches servers with
(rollout.servers.sglang_command, SGLang from --sglang-python) and sharing the GPU, and the actor with
Transformer Engine layers, in FP8 where the GPU has FP8 tensor cores (compute capability >= 8.9).
On CPU: the stand-in server (rollout.http_server, the rollout engine local_http) and megatron-core's
local layers in fp32. Both then:

  model     write the checkpoint (config, safetensors, tokenizer)
  server    start the server on it and wait until it serves (/health_generate)
  actor     build the actor on the same checkpoint
  generate  sample answers from the server (weights of the checkpoint)
  logprobs-before  the actor scores the server's answers as the server did
  train     one actor train step on them: finite loss and gradient, and the log-probs move by more
            than the tolerance (so that the last check could tell old weights from new)
  sync      the trainer's disk weight sync (weight_sync.sync_from_stages into SGLangEngine): the files
            hold the actor's tensors bit for bit, and the server answers with the new version
  logprobs  the server's log-probs of new answers equal the actor's within the tolerance

Tolerances (max |log-prob difference| over the answers' tokens): fp32 1e-4 (measured on CPU below
1e-5). bf16 0.1 nats: bf16 keeps 8 significant bits (steps of 2^-8 = 0.4% of a value), and the
server's kernels (its attention, RMSNorm, fused MLP) round at other points than Transformer Engine's.
Measured on CPU with transformers for this model (logits below 3.3 in size): a bf16 forward is at
most 0.021 from the fp32 one over 16 sampled answers, so two bf16 stacks, each that far from exact,
stay within ~0.05; the train step moves log-probs by ~3.5, far beyond either tolerance.
FP8 rounds the actor's own forward far more (TE's e4m3 keeps 4 significant bits), so with FP8 the
step is taken in FP8 and the synced weights are then scored by a bf16 Transformer Engine actor loaded
from the files the server loaded; the FP8 actor's own gap is printed, not judged.

One line per check on stdout; on the first failure, its line says FAILED and why (the server's log
tail follows when the server is at fault), and the exit status is 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout as well as from the image's install
    sys.path.insert(0, str(REPO))

from launch.tasks import (
    SGLANG_PYTHON,  # the image's SGLang interpreter, as launches use it
)

TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}
MIN_MOVE = 3.0  # the train step must move some log-prob by this many tolerances
PROMPTS = [f"What is {a} + {b}?" for a, b in ((3, 4), (12, 7), (25, 17), (9, 30))]
SAMPLES, NEW_TOKENS = 2, 12


class CheckFailed(Exception):
    def __init__(self, check: str, reason: str, log: str = ""):
        super().__init__(f"{check}: {reason}")
        self.check, self.reason, self.log = check, reason, log


@dataclass
class Setup:
    device: str  # "cuda" or "cpu"
    dtype: str  # the actor's and the server's: "bf16" on a GPU, "fp32" on CPU
    impl: str  # the actor's layers: "te" on a GPU, "local" on CPU
    fp8: str | None  # "hybrid" where the GPU has FP8, else None
    fp8_recipe: str

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]


def choose_setup(device: str, fp8: str, fp8_recipe: str) -> Setup:
    """The GPU setup (bf16, TE, FP8 from compute capability 8.9 unless --fp8 off) or the CPU one."""
    if device == "cpu":
        if fp8 == "on":
            raise CheckFailed("actor", "--fp8 on needs a GPU (Transformer Engine's FP8 GEMMs)")
        return Setup("cpu", "fp32", "local", None, fp8_recipe)
    import torch

    if not torch.cuda.is_available():
        raise CheckFailed("actor", "--device cuda: torch sees no CUDA device")
    capability = torch.cuda.get_device_capability(0)
    has_fp8 = capability >= (8, 9)  # Ada and Hopper onward have FP8 tensor cores
    if fp8 == "on" and not has_fp8:
        raise CheckFailed("actor", f"--fp8 on: compute capability {capability[0]}.{capability[1]} has no FP8 (>= 8.9)")
    return Setup("cuda", "bf16", "te", "hybrid" if has_fp8 and fp8 != "off" else None, fp8_recipe)


def say(check: str, detail: str) -> None:
    print(f"gpu-smoke: {check:<16s} ok   {detail}", flush=True)


# --------------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------------


def write_model(out: Path, setup: Setup):
    """A random 2-layer Qwen2 with an offline-trained tokenizer, saved as an HF checkpoint in the
    run's dtype. Its weights are drawn wider than transformers' default (std 0.1, not 0.02) so that
    the next-token distributions are far from uniform and log-prob differences mean something."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_nft.data.tokenizer import train_bpe_tokenizer
    from megatron_nft.model.bundle import DTYPES
    from megatron_nft.model.hf_io import save_hf_checkpoint

    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer([f"What is {a} + {b}? Answer: {a + b}" for a in range(40) for b in range(40)],
                                    vocab_size=320)
    # every GEMM dimension a multiple of 16, as Transformer Engine's FP8 GEMMs need; the vocabulary
    # padded past the tokenizer's to a multiple of 64, as Qwen2.5's own (151936 for 151665 tokens)
    config = Qwen2Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # transformers starts biases at zero; random ones exercise the QKV-bias mapping
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    save_hf_checkpoint(out, model.named_parameters(), config, tokenizer, dtype=DTYPES[setup.dtype])
    return config, tokenizer


def server_command(args, setup: Setup, model_dir: Path, port: int) -> list[str]:
    """The command the trainer launches its rollout servers with (rollout.servers), for this setup."""
    from megatron_nft.rollout import servers as srv

    if setup.device == "cpu":
        return srv.local_server_command(str(model_dir), port=port, random_seed=0, threads=1, extra_args=args.server_arg)
    # mem_fraction_static: SGLang takes this share of the GPU's memory up front; the actor shares the
    # GPU. dtype named, not read from config.json: SGLang's own transformers may predate its "dtype" key.
    return srv.sglang_command(str(model_dir), port=port, mem_fraction_static=args.server_mem_fraction,
                              dtype="bfloat16", random_seed=0, extra_args=args.server_arg, python=args.sglang_python)


def start_server(args, setup: Setup, model_dir: Path, work: Path, stack: ExitStack):
    """The rollout server on the checkpoint, and the SGLangEngine over it (disk transport)."""
    from megatron_nft.rollout import servers as srv
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import DiskTransport

    [port] = srv.free_ports(1)
    url = f"http://127.0.0.1:{port}"
    command = server_command(args, setup, model_dir, port)
    [server] = srv.launch_servers([(command, url)], work / "server_logs")
    engine = SGLangEngine([url], servers=[server], transport=DiskTransport(work / "weight_sync"))
    stack.callback(engine.close)
    return engine, server, command


def build_actor(config, setup: Setup, fetch, *, fp8: str | None):
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import ModelOptions, shape_from_hf

    options = ModelOptions(impl=setup.impl, fp8=fp8, fp8_recipe=setup.fp8_recipe)
    options.check(bf16=setup.dtype == "bf16")
    # Adam's first step moves every weight by lr (m / sqrt(v) = sign(g)): 0.02 of weights of size 0.1
    actor = Actor(shape_from_hf(config), dtype=setup.dtype, micro_batch_size=4, options=options,
                  optim=OptimConfig(lr=2e-2, warmup_steps=0, weight_decay=0.0),
                  algo=AlgoConfig(name="nft", agg="token_mean"))
    actor.load_hf(fetch)
    return actor


def generate(engine, prompts: list[list[int]], eos: int, seed: int):
    from megatron_nft.rollout import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, n=SAMPLES, stop_token_ids=(eos,), seed=seed)
    completions = engine.generate(prompts, params)
    if len(completions) != len(prompts) * SAMPLES or not all(c.token_ids for c in completions):
        raise CheckFailed("generate", f"expected {len(prompts) * SAMPLES} non-empty answers, got "
                          f"{[len(c.token_ids) for c in completions]}")
    return completions


def rollout_batch(prompts: list[list[int]], completions) -> dict:
    """The actor's batch of the server's answers: label-aligned server log-probs as old_logprobs,
    rewards 1, 0 alternating within each prompt's answers (so NFT has both kinds to learn from)."""
    from megatron_nft.data.batching import pack_rows

    rewards = [float(i % 2 == 0) for i in range(len(completions))]
    by_prompt = {}
    for c, r in zip(completions, rewards):
        by_prompt.setdefault(c.prompt_index, []).append(r)
    return pack_rows([prompts[c.prompt_index] for c in completions], [list(c.token_ids) for c in completions],
                     extra={"old_logprobs": [list(c.logprobs) for c in completions], "rewards": rewards,
                            "correct_rate": [sum(by_prompt[c.prompt_index]) / SAMPLES for c in completions]})


def logprob_gap(actor, batch: dict) -> tuple[float, float, torch.Tensor]:
    """(max, mean) |actor - server| over the answers' tokens, and the actor's log-probs."""
    mask = batch["loss_mask"].bool()
    mine, _ = actor.compute_logprobs({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]})
    gap = (mine - batch["old_logprobs"]).abs()[mask]
    return float(gap.max()), float(gap.mean()), mine


def push_weights(actor, engine, version: int):
    """The trainer's weight sync: every pipeline stage writes its own shards, the servers load them."""
    from megatron_nft.rollout.weight_sync import sync_from_stages

    bundle = actor.bundle
    report = sync_from_stages(engine, bundle.stage_tensors, stage=bundle.pp_rank, source=bundle.stage_source,
                              version=version)
    if report is None:
        raise CheckFailed("sync", "the engine took no per-stage sync (disk transport expected)")
    return report


def compare_files(actor, directory: Path) -> int:
    """Every tensor the actor would send equals the one written under `directory`, bit for bit."""
    import torch

    from megatron_nft.model.hf_io import hf_tensor_reader, hf_weight_map

    fetch, names = hf_tensor_reader(directory), set(hf_weight_map(directory))
    sent = 0
    for name, tensor in actor.hf_tensors(device="cpu"):
        if name not in names:
            raise CheckFailed("sync", f"{directory}: tensor {name} is missing")
        written = fetch(name)
        if written.dtype != tensor.dtype or not torch.equal(written, tensor):
            raise CheckFailed("sync", f"{directory}: tensor {name} differs from the actor's")
        sent += 1
    if sent != len(names):
        raise CheckFailed("sync", f"{directory}: {len(names)} tensors written, the actor has {sent}")
    return sent


@contextmanager
def check(name: str, server=None):
    """Any error inside is check `name`'s failure (with the server's log tail when it is involved)."""
    try:
        yield
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 - whatever broke, the report names the check
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckFailed(name, f"{type(e).__name__}: {first}", server.log_tail() if server else "") from None


def judge(name: str, worst: float, mean: float, tol: float, what: str = "actor vs server") -> None:
    if not worst <= tol:
        raise CheckFailed(name, f"{what}: max |log-prob difference| {worst:.3g} > {tol:g} (mean {mean:.3g})")
    say(name, f"{what}: max |log-prob difference| {worst:.3g} <= {tol:g} (mean {mean:.3g})")


def run(args) -> None:
    from megatron_nft import runtime
    from megatron_nft.model.hf_io import hf_tensor_reader

    setup = choose_setup(args.device, args.fp8, args.fp8_recipe)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-smoke-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tol = setup.tolerance
    with ExitStack() as stack:
        stack.callback(runtime.destroy)
        model_dir = work / "model"
        start = time.perf_counter()
        with check("model"):
            config, tokenizer = write_model(model_dir, setup)
        say("model", f"Qwen2 2 layers, hidden 64, vocab {config.vocab_size}, {setup.dtype}, in {model_dir}")

        with check("server"):
            engine, server, command = start_server(args, setup, model_dir, work, stack)
        with check("server", server):
            engine.wait_ready(timeout_s=args.server_timeout)
        say("server", f"{engine.urls[0]} serves after {time.perf_counter() - start:.0f} s: {' '.join(command[1:3])}")

        with check("actor"):
            actor = build_actor(config, setup, hf_tensor_reader(model_dir), fp8=setup.fp8)
            stack.callback(actor.close)
        say("actor", f"{setup.impl} layers on {actor.device}, {setup.dtype}"
            + (f", FP8 {setup.fp8} ({setup.fp8_recipe})" if setup.fp8 else ", no FP8"))

        prompts = [tokenizer.encode(p) for p in PROMPTS]
        eos = tokenizer.eos_token_id
        with check("generate", server):
            before = rollout_batch(prompts, generate(engine, prompts, eos, seed=1))
        say("generate", f"{len(PROMPTS)} prompts x {SAMPLES} answers, {int(before['loss_mask'].sum())} answer tokens")

        with check("logprobs-before"):
            worst, mean, start_lp = logprob_gap(actor, before)
        if setup.fp8:
            say("logprobs-before", f"FP8 actor vs server: max {worst:.3g}, mean {mean:.3g} (FP8 rounding: not judged)")
        else:
            judge("logprobs-before", worst, mean, tol)

        with check("train"):
            stats = actor.train_step(before)
            _, _, after_lp = logprob_gap(actor, before)
        if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0):
            raise CheckFailed("train", f"loss {stats['loss']}, grad norm {stats['grad_norm']}")
        moved = float((after_lp - start_lp).abs()[before["loss_mask"].bool()].max())
        if not moved > MIN_MOVE * tol:
            raise CheckFailed("train", f"the step moved log-probs by at most {moved:.3g}, not > {MIN_MOVE:g} x {tol:g}")
        say("train", f"loss {stats['loss']:.4g}, grad norm {stats['grad_norm']:.4g}, log-probs moved up to {moved:.3g}")

        with check("sync", server):
            report = push_weights(actor, engine, version=1)
            version_dir = engine.transport.version_dir(1)
            tensors = compare_files(actor, version_dir)
            after = generate(engine, prompts, eos, seed=2)
        versions = sorted({c.weight_version for c in after})
        if versions != [1]:
            raise CheckFailed("sync", f"the server answers with weight versions {versions}, expected [1]")
        say("sync", f"{tensors} tensors, {report.total_bytes / 2**20:.2f} MiB in {report.seconds:.2f} s through "
            f"{version_dir}; the server answers with version 1")

        batch = rollout_batch(prompts, after)
        scorer = actor
        if setup.fp8:
            with check("logprobs"):
                worst, mean, _ = logprob_gap(actor, batch)
                say("logprobs", f"FP8 actor vs server: max {worst:.3g}, mean {mean:.3g} (FP8 rounding: not judged)")
                actor.close()  # one actor per process (Megatron's parallel state): a bf16 scorer replaces it
                scorer = build_actor(config, setup, hf_tensor_reader(version_dir), fp8=None)
                stack.callback(scorer.close)
        with check("logprobs"):
            worst, mean, _ = logprob_gap(scorer, batch)
        judge("logprobs", worst, mean, tol, "bf16 TE actor on the synced files vs server" if setup.fp8 else
              "trained actor vs server")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="cuda: SGLang + Transformer Engine; cpu: the stand-in server + local layers "
                         "(default: cuda when torch sees a GPU)")
    ap.add_argument("--work", type=Path, help="model, weight-sync and server-log files (default: a new temporary folder)")
    ap.add_argument("--sglang-python", default=SGLANG_PYTHON, help="the interpreter with sglang (the image's venv)")
    ap.add_argument("--server-mem-fraction", type=float, default=0.3, help="SGLang --mem-fraction-static")
    ap.add_argument("--server-timeout", type=float, default=600.0, help="seconds for the server to come up")
    ap.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                    help="an extra server flag (repeatable), as rollout.server_args passes them")
    ap.add_argument("--fp8", choices=["auto", "on", "off"], default="auto",
                    help="auto: FP8 on GPUs of compute capability >= 8.9")
    ap.add_argument("--fp8-recipe", default="delayed", help="model.fp8_recipe for the FP8 step")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except CheckFailed as e:
        print(f"gpu-smoke: {e.check:<16s} FAILED {e.reason}", flush=True)
        if e.log:
            print(f"gpu-smoke: server log tail:\n{e.log}", file=sys.stderr)
        print(f"gpu-smoke: failed at check '{e.check}'", file=sys.stderr)
        return 1
    print("gpu-smoke: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
