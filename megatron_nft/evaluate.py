"""Benchmark evaluation: avg@k accuracy tables like the NFT paper's, resumable problem by problem.

    from megatron_nft.data.benchmarks import benchmark_file, load_benchmark
    from megatron_nft.evaluate import evaluate_benchmarks, paper_samples, paper_sampling
    acc = evaluate_benchmarks(engine, tokenizer, {"aime24": load_benchmark(benchmark_file("aime24"))}, out_dir="eval/",
                              samples={"aime24": paper_samples("aime24")},
                              sampling=paper_sampling("7b", max_new_tokens=3584), max_prompt_len=512)

For each benchmark, every problem gets k sampled answers (k = samples[name]); each is graded 1/0 (a
truncated answer, finish_reason "length", is wrong) and the benchmark's score is avg@k: the mean over
problems of the mean over their k answers. Records go to `out_dir/<name>.jsonl`, one line per problem:

    {"id", "answer", "samples": k, "responses": [k texts], "scores": [k floats],
     "finish_reasons": [k strings], "mean_score": float}

appended (and flushed to disk) chunk by chunk as problems finish. A rerun with the same out_dir skips
the problems already recorded -- no generation, no grading -- so an interrupted evaluation resumes
where it stopped; a last line cut short by the interruption is dropped and that problem redone.
`out_dir/results.md` holds the Markdown table (one column per benchmark, plus the average), rewritten
atomically (temp file + rename) after each benchmark.

Paper settings (the NFT paper's evaluation): AIME24/AIME25/AMC23 avg@32, MATH500/OlympiadBench/Minerva avg@1, top_p 0.7,
temperature 0.6 for 7B and 1.0 for 32B models.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from megatron_nft.data.benchmarks import BenchmarkProblem
from megatron_nft.data.prompts import encode_prompts
from megatron_nft.errors import DataError
from megatron_nft.reward.grading import GradingPool, apply_truncation
from megatron_nft.rollout.base import FINISH_LENGTH, RolloutEngine, SamplingParams

PAPER_TOP_P = 0.7
PAPER_TEMPERATURE = {"7b": 0.6, "32b": 1.0}
PAPER_AVG32_BENCHMARKS = ("aime24", "aime25", "amc23")
PAPER_SAMPLES_AVG32 = 32

RESULTS_FILE = "results.md"


def paper_samples(name: str) -> int:
    """Answers per problem in the paper's tables: 32 for AIME24/AIME25/AMC23, 1 for the others."""
    return PAPER_SAMPLES_AVG32 if name in PAPER_AVG32_BENCHMARKS else 1


def paper_sampling(model_size: str, max_new_tokens: int, **overrides) -> SamplingParams:
    """The paper's evaluation sampling: top_p 0.7, temperature 0.6 ("7b") or 1.0 ("32b")."""
    if model_size not in PAPER_TEMPERATURE:
        raise ValueError(f"model_size={model_size!r}: allowed values are {', '.join(PAPER_TEMPERATURE)}")
    return SamplingParams(
        **{"temperature": PAPER_TEMPERATURE[model_size], "top_p": PAPER_TOP_P, "max_new_tokens": max_new_tokens, **overrides}
    )


def evaluate_benchmarks(
    engine: RolloutEngine,
    tokenizer,
    benchmarks: Mapping[str, Sequence[BenchmarkProblem]],
    *,
    out_dir: str | os.PathLike,
    samples: Mapping[str, int] | None = None,
    sampling: SamplingParams,
    template: str = "boxed",
    chat: bool = False,
    grader: str = "math_verify",
    answer_format: str = "auto",
    max_prompt_len: int,
    workers: int | None = None,
    timeout_s: float = 5.0,
    chunk_size: int | None = None,
    model_name: str = "model",
    progress: bool = True,
) -> dict[str, float]:
    """avg@k accuracy of `engine` on each benchmark, {name: accuracy in [0, 1]} in the given order.

    samples: k per benchmark; a benchmark missing from it (or samples=None) uses paper_samples(name).
    sampling: temperature / top_p / max_new_tokens (its `n` is replaced by k); when it names no
    stop_token_ids, generation stops at the tokenizer's EOS token.
    template / chat / max_prompt_len: as encode_prompts; a prompt over max_prompt_len is a DataError
    naming the benchmark and the problem id (raised before anything of that benchmark is generated).
    grader / answer_format / workers / timeout_s: as GradingPool.
    chunk_size: problems per engine.generate call (None: enough for about 256 answers per call).
    model_name: the row label in results.md. progress: a tqdm bar over problems.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = dict(samples or {})
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if not sampling.stop_token_ids and getattr(tokenizer, "eos_token_id", None) is not None:
        sampling = replace(sampling, stop_token_ids=(int(tokenizer.eos_token_id),))
    ks = {}
    for name in benchmarks:
        k = samples.get(name, paper_samples(name))
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"samples[{name!r}]={k!r}: must be an integer >= 1")
        ks[name] = k
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive integer or None")

    results: dict[str, float] = {}
    with GradingPool(grader=grader, answer_format=answer_format, timeout_s=timeout_s, workers=workers) as pool:
        for name, problems in benchmarks.items():
            problems = list(problems)
            k = ks[name]
            _check_ids(name, problems)
            prompt_ids = encode_prompts(
                tokenizer,
                [{"problem": p.problem, "source": f"benchmark {name!r}, problem id {p.id!r}"} for p in problems],
                template=template,
                chat=chat,
                max_prompt_len=max_prompt_len,
            )
            path = out / f"{name}.jsonl"
            done = _load_records(path, name, problems, k)
            pending = [i for i, p in enumerate(problems) if p.id not in done]
            per_call = chunk_size or max(1, 256 // k)
            params = replace(sampling, n=k)
            bar = tqdm(total=len(problems), initial=len(problems) - len(pending), desc=name, unit="problem", disable=not progress)
            try:
                with path.open("a", encoding="utf-8") as f:
                    for start in range(0, len(pending), per_call):
                        chunk = pending[start : start + per_call]
                        records = _run_chunk(engine, tokenizer, pool, [problems[i] for i in chunk], [prompt_ids[i] for i in chunk], params)
                        for record in records:
                            f.write(json.dumps(record, ensure_ascii=False) + "\n")
                            done[record["id"]] = record
                        f.flush()
                        os.fsync(f.fileno())
                        bar.update(len(chunk))
            finally:
                bar.close()
            means = [done[p.id]["mean_score"] for p in problems]
            results[name] = sum(means) / len(means) if means else 0.0
            write_results_table(out / RESULTS_FILE, results, {n: ks[n] for n in results}, model_name=model_name)
    return results


def _check_ids(name: str, problems: list[BenchmarkProblem]) -> None:
    seen = set()
    for p in problems:
        if p.id in seen:
            raise DataError(f"benchmark {name!r}: problem id {p.id!r} appears twice; ids must be unique (resuming keys on them)")
        seen.add(p.id)


def _run_chunk(engine, tokenizer, pool: GradingPool, problems, prompt_ids, params: SamplingParams) -> list[dict]:
    k = params.n
    completions = engine.generate(prompt_ids, params)
    if len(completions) != len(problems) * k:
        raise RuntimeError(f"engine returned {len(completions)} completions for {len(problems)} prompts x n={k}")
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    reasons = [c.finish_reason for c in completions]
    golds = [p.answer for p in problems for _ in range(k)]
    scores = apply_truncation(pool.score(texts, golds), [r == FINISH_LENGTH for r in reasons])
    records = []
    for j, p in enumerate(problems):
        rows = slice(j * k, (j + 1) * k)
        s = scores[rows]
        records.append(
            {
                "id": p.id,
                "answer": p.answer,
                "samples": k,
                "responses": texts[rows],
                "scores": s,
                "finish_reasons": reasons[rows],
                "mean_score": sum(s) / k,
            }
        )
    return records


def _load_records(path: Path, name: str, problems: list[BenchmarkProblem], k: int) -> dict[str, dict]:
    """The records already in `path`, by problem id. A last line without its newline (an interrupted
    write) is cut off the file; any other unreadable line, or a record made with another k or gold
    answer, is an error: mixing settings in one file would make its avg@k meaningless."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    golds = {p.id: p.answer for p in problems}
    done: dict[str, dict] = {}
    for lineno, raw in enumerate(data[:end].splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start}); delete the file to "
                            f"re-evaluate {name!r}") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: unreadable record ({e.msg}); delete the file to re-evaluate {name!r}") from None
        if not isinstance(record, dict) or not {"id", "answer", "samples", "scores", "mean_score"} <= record.keys():
            raise DataError(f"{path}:{lineno}: not an evaluation record; delete the file to re-evaluate {name!r}")
        pid = record["id"]
        if pid not in golds:
            raise DataError(f"{path}:{lineno}: problem id {pid!r} is not in benchmark {name!r}; is out_dir from another run?")
        if record["samples"] != k:
            raise DataError(
                f"{path}:{lineno}: problem {pid!r} was evaluated with {record['samples']} samples, this run asks "
                f"for {k}; use another out_dir or delete the file"
            )
        if record["answer"] != golds[pid]:
            raise DataError(f"{path}:{lineno}: problem {pid!r} has gold {record['answer']!r} on file but {golds[pid]!r} in the benchmark")
        done[pid] = record
    if end < len(data):  # an interrupted append: drop the partial line (only once the rest is valid); its problem is redone
        with path.open("r+b") as f:
            f.truncate(end)
    return done


def format_results_table(results: Mapping[str, float], samples: Mapping[str, int], *, model_name: str = "model") -> str:
    """A Markdown table: one column per benchmark (accuracy in %, header "name (avg@k)"), plus the average."""
    names = list(results)
    header = ["Model", *(f"{n} (avg@{samples.get(n, 1)})" for n in names), "Avg."]
    avg = sum(results.values()) / len(results) if results else 0.0
    row = [model_name, *(f"{100 * results[n]:.1f}" for n in names), f"{100 * avg:.1f}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|", "| " + " | ".join(row) + " |"]
    return "\n".join(lines) + "\n"


def write_results_table(path: str | os.PathLike, results, samples, *, model_name: str = "model") -> None:
    """Writes format_results_table(...) to `path` atomically (a temp file in the same folder, renamed)."""
    path = Path(path)
    text = format_results_table(results, samples, model_name=model_name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
