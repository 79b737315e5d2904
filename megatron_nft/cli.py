"""`megatron-nft`: demo, train, eval, config, plan, report.

    megatron-nft demo                                  # the embedded CPU default (recipes/demo.yaml)
    megatron-nft train --recipe recipes/demo.yaml run.dir=runs/x algo.eps=0.5
    megatron-nft config --recipe recipes/demo.yaml     # print the resolved config and exit
    megatron-nft eval --hf runs/demo/hf --benchmarks aime24 amc23 --out runs/demo/eval
    megatron-nft plan --recipe recipes/paper/qwen2.5-32b-nft.yaml --gpus 128   # the run train would start
    megatron-nft plan --model qwen2.5-32b --gpus 128 --prompt-len 2048 --response-len 14336
    megatron-nft report runs/ctx4k runs/ctx8k --plan                  # phase times, MFU, memory, vs the plan

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



def _recipes_dir() -> Path:
    """The shipped recipes: beside the package in a checkout (or an editable install), else where a
    wheel installs them (pyproject's data-files: <prefix>/share/megatron-nft/recipes), as in the image."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    installed = Path(sys.prefix) / "share" / "megatron-nft" / "recipes"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


RECIPES = _recipes_dir()


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag (the usage block would bury it) and
    exit status 2, the CLI's convention for bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="megatron-nft",
        description="Negative-aware Fine-Tuning (NFT) and its baselines on Megatron-core actors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  megatron-nft demo                                   # tiny model, CPU, minutes\n"
            "  megatron-nft demo run.overwrite=true algo.eps=0.5   # replace runs/demo, other NFT floor\n"
            "  megatron-nft train --recipe my.yaml model.hf_path=/ckpt/Qwen2.5-Math-7B run.dir=runs/x\n"
            "  megatron-nft config --recipe recipes/demo.yaml      # print the resolved config\n"
            "  megatron-nft eval --hf runs/demo/hf --benchmarks aime24 amc23 --out runs/demo/eval\n"
            "  megatron-nft plan --recipe recipes/paper/qwen2.5-32b-nft.yaml --gpus 128\n\n"
            "Overrides are section.key=value; sections: model parallel optim algo rollout data reward eval\n"
            "warmup run. Multi-GPU: torchrun --nproc-per-node N -m megatron_nft.cli train ..."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

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

    ev = sub.add_parser(
        "eval",
        help="avg@k accuracy of an HF checkpoint on benchmark files, as a Markdown table (resumable).",
        description="avg@k accuracy of a Hugging Face checkpoint on benchmark JSON Lines files (the six "
        "paper benchmarks, by name, or any file with --problem-field/--answer-field). Writes OUT/<name>.jsonl per "
        "problem and OUT/results.md; rerunning with the same --out resumes. Generation runs on the CPU "
        "(--engine local) or on SGLang servers (--engine sglang). Megatron checkpoints: export "
        "them first with python -m checkpoints_tools.megatron_to_hf.",
    )
    ev.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (weights, config, tokenizer)")
    ev.add_argument("--benchmarks", required=True, nargs="+", metavar="NAME_OR_FILE",
                    help="benchmark names (the shipped copies: aime24 aime25 amc23 math500 minerva_math "
                    "olympiadbench) or .jsonl files")
    ev.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    ev.add_argument("--samples", type=int, default=None, help="answers per problem (default: the paper's, 32 for AIME/AMC, 1 otherwise)")
    ev.add_argument("--model-size", choices=["7b", "32b"], default="7b", help="paper sampling: temperature 0.6 (7b) or 1.0 (32b), top_p 0.7")
    ev.add_argument("--temperature", type=float, default=None, help="override the paper temperature")
    ev.add_argument("--top-p", type=float, default=None, help="override the paper top_p")
    ev.add_argument("--max-new-tokens", type=int, default=3584)
    ev.add_argument("--template", choices=["boxed", "dapo", "raw"], default="boxed")
    ev.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    ev.add_argument("--grader", choices=["math_verify", "qwen_math"], default="math_verify")
    ev.add_argument("--problem-field", default=None, help="for files that are not one of the six benchmarks")
    ev.add_argument("--answer-field", default=None, help="for files that are not one of the six benchmarks")
    ev.add_argument("--workers", type=int, default=None, help="grading processes (default: all cores)")
    ev.add_argument("--engine", choices=["local", "local_http", "sglang"], default="local",
                    help="local: this process, on CPU (small models); sglang: SGLang servers loading --hf "
                    "(launched here on this node's GPUs, or --urls of running ones serving the same weights); "
                    "local_http: the CPU engine behind SGLang's API (tests)")
    ev.add_argument("--urls", nargs="+", default=[], metavar="URL", help="running servers to use instead of launching")
    ev.add_argument("--num-servers", type=int, default=1, help="servers to launch (default: 1)")
    ev.add_argument("--server-tp-size", type=int, default=1, help="GPUs per launched SGLang server (--tp-size)")
    ev.add_argument("--sglang-python", default=None, help="interpreter with sglang installed (default: this one)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    from megatron_nft import plan

    pl = sub.add_parser(
        "plan",
        help="Per-GPU memory and step time of a run: which TP/PP/CP/DP layouts fit, ranked, every number explained.",
        description="Per-GPU memory (weights, gradients, optimizer states, activations for the recompute mode, "
        "log-prob buffers, colocated KV cache) and step time (actor FLOPs at a stated MFU, rollout decode) "
        "for every parallel layout of --gpus GPUs; the layouts that fit, fastest first. Pure arithmetic: "
        "formulas in megatron_nft/plan.py. With --recipe (and overrides, as for train) the run is the one "
        "`megatron-nft train` would start; without, flags describe it.",
    )
    plan.add_arguments(pl)

    from megatron_nft import report

    rp = sub.add_parser(
        "report",
        help="Where runs spent their time: phase means and p90, throughput, MFU, memory; runs side by side; a PNG.",
        description="Reads RUN_DIR/metrics.jsonl of each run: one table per run (each phase's mean and p90, "
        "tokens/s, TFLOP/s and MFU, peak memory, weight sync, response-length percentiles, stragglers, "
        "staleness), the runs side by side, and a PNG of the time breakdown per step. --plan adds the "
        "planner's prediction for each run's config.yaml, phase by phase, as measured/predicted ratios.",
    )
    report.add_arguments(rp)
    return parser


def _run_eval(args) -> dict:
    """The engine (--engine) holding the checkpoint's weights, then evaluate.evaluate_benchmarks."""
    from pathlib import Path

    from megatron_nft.data.benchmarks import load_benchmark, resolve_benchmark
    from megatron_nft.evaluate import evaluate_benchmarks, paper_sampling, paper_samples
    from megatron_nft.preflight import check_context, check_hf_model

    _check_eval_flags(args)
    paths = [resolve_benchmark(spec) for spec in args.benchmarks]  # a bad name fails before any loading
    _check_eval_paths(args, paths)
    config, shape, tokenizer = check_hf_model(args.hf, "--hf")
    check_context(args.max_new_tokens, shape.max_position_embeddings, "--max-new-tokens ",
                  f"{args.hf}/config.json max_position_embeddings")
    benchmarks = {}
    for path in paths:
        problems = load_benchmark(path, problem_field=args.problem_field, answer_field=args.answer_field)
        benchmarks[Path(path).stem] = problems
    overrides = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    sampling = paper_sampling(args.model_size, args.max_new_tokens, **overrides)
    engine = _eval_engine(args, config, shape)
    try:
        return evaluate_benchmarks(
            engine,
            tokenizer,
            benchmarks,
            out_dir=args.out,
            samples={name: args.samples or paper_samples(name) for name in benchmarks},
            sampling=sampling,
            template=args.template,
            chat=args.chat,
            grader=args.grader,
            max_prompt_len=shape.max_position_embeddings - args.max_new_tokens,
            workers=args.workers,
            model_name=Path(args.hf).name,
            progress=not args.quiet,
        )
    finally:
        engine.close()


def _check_finite_flags(args) -> None:
    """argparse's float() takes "nan" and "inf"; no flag of any subcommand means anything at either."""
    import math

    from megatron_nft.errors import ConfigError

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    for action in sub._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{max(action.option_strings, key=len)} {value}: expected a finite number")


def _check_eval_flags(args) -> None:
    """Numbers outside what they mean, refused before anything is read or created (argparse checks
    only their type)."""
    import math

    from megatron_nft.errors import ConfigError

    for flag, value in (("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens),
                        ("--workers", args.workers), ("--num-servers", args.num_servers),
                        ("--server-tp-size", args.server_tp_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: expected an integer >= 1")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"--temperature {args.temperature}: expected a finite number > 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    for flag, value in (("--hf", args.hf), ("--out", args.out)):
        if not value.strip():
            raise ConfigError(f"{flag} is empty: expected a directory path")
    for url in args.urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--urls {url!r}: expected an http(s):// URL")
    if args.urls and args.engine == "local":
        raise ConfigError("--urls needs --engine sglang or local_http")
    if args.sglang_python is not None and not Path(args.sglang_python).is_file():
        raise ConfigError(f"--sglang-python {args.sglang_python}: no such file; expected a Python interpreter")


def _check_eval_paths(args, paths) -> None:
    """--out is a directory (made if missing) that must not lie inside --hf, and no per-benchmark
    record file (OUT/<stem>.jsonl) may be an input or be shared by two benchmarks."""
    from megatron_nft.data.benchmarks import benchmark_names
    from megatron_nft.errors import ConfigError
    from megatron_nft.evaluate import RESULTS_FILE
    from megatron_nft.run_dir import is_within

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory; expected an output directory")
    if Path(args.hf).exists() and is_within(out, Path(args.hf)):
        raise ConfigError(f"--out {out} lies inside --hf {args.hf}: evaluation must not write into the checkpoint")
    records = {}
    for spec, path in zip(args.benchmarks, paths):
        stem = Path(path).name.split(".", 1)[0]
        if stem not in benchmark_names() and (args.problem_field is None or args.answer_field is None):
            raise ConfigError(
                f"--benchmarks {spec}: not one of the six benchmarks ({', '.join(benchmark_names())}), so its "
                f"fields are unknown; pass --problem-field and --answer-field"
            )
        record = (out / f"{Path(path).stem}.jsonl").resolve()
        if Path(path).resolve() in (record, (out / RESULTS_FILE).resolve()):
            raise ConfigError(f"--benchmarks {spec}: results would be written over it (--out {out}); choose another --out")
        if record in records:
            raise ConfigError(f"--benchmarks {records[record]} and {spec} would share the results file {record}")
        records[record] = spec


def _eval_engine(args, config, shape):
    """The rollout engine evaluation generates with, holding the --hf weights (the training engines)."""
    from pathlib import Path

    from megatron_nft.config import RolloutConfig
    from megatron_nft.model.hf_io import hf_tensor_reader
    from megatron_nft.model.mapping import hf_names
    from megatron_nft.rollout import LocalEngine, make_engine

    if args.engine == "local":
        engine = LocalEngine(config)
    else:
        rollout = RolloutConfig(engine=args.engine, urls=list(args.urls), num_servers=args.num_servers,
                                server_tp_size=args.server_tp_size, sglang_python=args.sglang_python)
        # server logs (and the local server's staged weights) go beside the results
        engine = make_engine(rollout, hf_config=config, model_path=args.hf, run_dir=Path(args.out),
                             progress=not args.quiet)
    if args.engine != "sglang":  # SGLang servers load --hf themselves; the CPU engines start empty
        fetch = hf_tensor_reader(args.hf)
        engine.update_weights(((name, fetch(name)) for name in hf_names(shape)), version=0)
    return engine


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


# A run stopped by SIGTERM (a pre-emption, a time limit) after checkpointing: not a success, not a
# failure; EX_TEMPFAIL from sysexits.h, "try again later", i.e. resume.
EXIT_STOPPED = 75


def _existing_outputs(run_dir: Path) -> str:
    names = ("metrics.jsonl", "curves.png", "checkpoints/", "hf/")
    return ", ".join(n for n in names if (run_dir / n.rstrip("/")).exists()) or "nothing yet"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from megatron_nft.config import load_config, to_yaml
    from megatron_nft.errors import UserError
    from megatron_nft.preflight import check_train

    try:
        _check_finite_flags(args)
        if args.command == "plan":
            from megatron_nft.plan import run as run_plan

            print(run_plan(args))
            return 0
        if args.command == "report":
            from megatron_nft.report import run as run_report

            print(run_report(args))
            return 0
        if args.command == "eval":
            results = _run_eval(args)
            print(" ".join(f"{name}: {100 * acc:.1f}%" for name, acc in results.items()))
            print(f"table: {args.out}/results.md")
            return 0
        cfg = load_config(args.recipe, args.overrides)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        if args.command == "demo":
            from megatron_nft.demo import run_demo

            check_train(cfg, demo=True)
            final = run_demo(cfg, quiet=args.quiet)
        else:
            from megatron_nft.errors import ConfigError
            from megatron_nft.run_dir import prepare_run_dir, remove_failed_start
            from megatron_nft.trainer import train

            if cfg.model.hf_path is None:
                raise ConfigError("train needs model.hf_path (a Hugging Face Qwen2 checkpoint directory)")
            check_train(cfg)  # before prepare_run_dir: a refused start creates nothing
            run_dir, made = prepare_run_dir(cfg)
            try:
                final = train(cfg, quiet=args.quiet)
            except BaseException:
                remove_failed_start(run_dir, made)
                raise
        from megatron_nft.runtime import is_main_rank

        if is_main_rank():
            if "stopped_at" not in final:  # a stopped run said so already (trainer.train)
                print(_summary(final))
            print(f"run directory: {cfg.run.dir} ({_existing_outputs(Path(cfg.run.dir))})")
        return EXIT_STOPPED if "stopped_at" in final else 0
    except UserError as e:
        print(f"megatron-nft: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the system refuses (name too long, no permission, a file for a folder)
        print(f"megatron-nft: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("megatron-nft: interrupted", file=sys.stderr)
        return 130
    finally:
        from megatron_nft import runtime

        runtime.destroy()


if __name__ == "__main__":
    sys.exit(main())
