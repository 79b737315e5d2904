"""Evaluation benchmarks (JSON Lines, one problem per line) -> BenchmarkProblem(id, problem, answer).

The six sets of the NFT paper differ in where the problem and the gold answer live:

    name           problem field   gold answer
    aime24         problem         answer
    aime25         problem         answer
    amc23          question        answer (a number such as 27.0 -> "27")
    math500        problem         answer
    minerva_math   problem         last \\boxed{} of solution
    olympiadbench  question        final_answer (a list of strings; joined with ", ", $ removed)

The six files ship with the package (megatron_nft/data/math_benchmarks/, its README gives sources and
sha256): `benchmark_file("aime24")` is the path of the shipped copy, and `resolve_benchmark(spec)` takes
a name or a path, as `megatron-nft eval --benchmarks` does. `load_benchmark(path)` infers the set from
the file name (aime24.jsonl -> aime24); any other JSON Lines file loads with explicit
`problem_field=` / `answer_field=`. Answers are gold strings in LaTeX/plain form, as
megatron_nft.reward graders take them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_nft.errors import ConfigError, DataError
from megatron_nft.data.latex import last_boxed


@dataclass(frozen=True)
class BenchmarkProblem:
    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class BenchmarkFormat:
    problem_field: str
    answer_field: str
    answer_from_boxed: bool = False  # the gold is the last \boxed{} inside answer_field (a solution)
    id_field: str | None = None


BENCHMARK_FORMATS: dict[str, BenchmarkFormat] = {
    "aime24": BenchmarkFormat("problem", "answer", id_field="id"),
    "aime25": BenchmarkFormat("problem", "answer"),
    "amc23": BenchmarkFormat("question", "answer", id_field="id"),
    "math500": BenchmarkFormat("problem", "answer", id_field="unique_id"),
    "minerva_math": BenchmarkFormat("problem", "solution", answer_from_boxed=True, id_field="idx"),
    "olympiadbench": BenchmarkFormat("question", "final_answer", id_field="id"),
}


# Package data (pyproject.toml [tool.setuptools.package-data]): present in a checkout and in an install.
BENCHMARK_DIR = Path(__file__).resolve().parent / "math_benchmarks"


def benchmark_names() -> list[str]:
    return list(BENCHMARK_FORMATS)


def benchmark_file(name: str) -> Path:
    """The shipped copy of benchmark `name` (one of benchmark_names()); ConfigError for another name."""
    if name not in BENCHMARK_FORMATS:
        raise ConfigError(f"benchmark {name!r}: known names are {', '.join(BENCHMARK_FORMATS)}")
    return BENCHMARK_DIR / f"{name}.jsonl"


def resolve_benchmark(spec: str | os.PathLike) -> Path:
    """A benchmark name (-> its shipped copy) or the path of an existing JSON Lines file.

    A known name always means the shipped copy (a file of that name in the working directory is not
    looked at: the same command line must evaluate the same problems everywhere). Anything else must
    be an existing file; otherwise ConfigError in one line listing the known names.
    """
    text = os.fspath(spec)
    if text in BENCHMARK_FORMATS:
        return benchmark_file(text)
    path = Path(text)
    if path.is_file():
        return path
    raise ConfigError(
        f"benchmark {text!r}: neither a benchmark name ({', '.join(BENCHMARK_FORMATS)}) nor an existing file"
    )


def _answer_text(value, where: str, field: str) -> str:
    """A gold answer from a JSON value: strings as they are, numbers without a spurious ".0",
    lists (OlympiadBench's final_answer) joined with ", "; a trailing period is dropped."""
    if isinstance(value, bool):
        raise DataError(f"{where}: field {field!r} is a boolean, not an answer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: field {field!r} is {value}, not an answer")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        value = value.strip()
        # A sentence-final period is not part of the answer (OlympiadBench has "(-\\infty, 0) \\cup\\{1\\}.").
        return value[:-1].rstrip() if value.endswith(".") and not value.endswith("..") else value
    if isinstance(value, list):
        parts = [_answer_text(v, where, field) for v in value]
        # OlympiadBench writes each answer in $...$ (sometimes several per string, e.g. "$69$,$84$"):
        # graders take bare LaTeX.
        return ", ".join(p.replace("$", "").strip() for p in parts if p.replace("$", "").strip())
    raise DataError(f"{where}: field {field!r} has type {type(value).__name__}; expected a string, number or list")


def load_benchmark(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    answer_from_boxed: bool | None = None,
    id_field: str | None = None,
) -> list[BenchmarkProblem]:
    """Load a benchmark JSON Lines file.

    name: one of benchmark_names(); None infers it from the file name (its stem), or, when the stem is
    not a known benchmark, requires problem_field and answer_field. Explicit fields override the
    named format. answer_from_boxed: take the last \\boxed{} of answer_field (a worked solution).
    id_field: a field holding the problem id (default: "<name>-<line>").

    Raises DataError naming FILE:LINE and the field for a malformed line or a row without a problem
    or an answer; ConfigError for an unknown benchmark name.
    """
    path = Path(path)
    if name is None:
        stem = path.name.split(".", 1)[0]
        if stem in BENCHMARK_FORMATS:
            name = stem
        elif problem_field is None or answer_field is None:
            raise ConfigError(
                f"{path}: cannot infer the benchmark from the file name; pass name= one of "
                f"{', '.join(BENCHMARK_FORMATS)}, or problem_field= and answer_field="
            )
    if name is not None and name in BENCHMARK_FORMATS:
        fmt = BENCHMARK_FORMATS[name]
    elif name is not None and (problem_field is None or answer_field is None):
        raise ConfigError(
            f"benchmark name={name!r}: allowed values are {', '.join(BENCHMARK_FORMATS)} "
            "(or give problem_field= and answer_field= for another file)"
        )
    else:
        fmt = BenchmarkFormat(problem_field or "problem", answer_field or "answer")
    fmt = BenchmarkFormat(
        problem_field or fmt.problem_field,
        answer_field or fmt.answer_field,
        fmt.answer_from_boxed if answer_from_boxed is None else answer_from_boxed,
        id_field or fmt.id_field,
    )
    label = name or path.stem

    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read benchmark file: {e.strerror or e}") from e
    problems: list[BenchmarkProblem] = []
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")

            problem = row.get(fmt.problem_field)
            if not isinstance(problem, str) or not problem.strip():
                raise DataError(f"{where}: field {fmt.problem_field!r} is missing or not a non-empty string")

            if row.get(fmt.answer_field) is None:
                raise DataError(f"{where}: field {fmt.answer_field!r} is missing")
            answer = _answer_text(row[fmt.answer_field], where, fmt.answer_field)
            if fmt.answer_from_boxed:
                answer = last_boxed(answer) or ""
                if not answer:
                    raise DataError(f"{where}: field {fmt.answer_field!r} has no complete \\boxed{{...}} answer")
            if not answer:
                raise DataError(f"{where}: field {fmt.answer_field!r} is empty")

            raw_id = row.get(fmt.id_field) if fmt.id_field else None
            pid = f"{label}-{lineno}" if raw_id is None or raw_id == "" else str(raw_id)
            problems.append(BenchmarkProblem(id=pid, problem=problem.strip(), answer=answer))
    if not problems:
        raise DataError(f"{path}: no problems (the file is empty)")
    return problems
