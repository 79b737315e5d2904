"""Benchmark loaders (megatron_nft.data.benchmarks) on the six shared files and on synthetic files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_nft.data.benchmarks import BenchmarkProblem, benchmark_names, load_benchmark
from megatron_nft.errors import ConfigError, DataError

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
needs_data = pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"benchmark data folder {BENCHMARKS} is absent")

EXPECTED = {  # name: (problems, first answer)
    "aime24": (30, "204"),
    "aime25": (30, "70"),
    "amc23": (40, "27"),
    "math500": (500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "minerva_math": (272, "1.6"),
    "olympiadbench": (675, "2"),
}


@needs_data
@pytest.mark.parametrize("name", list(EXPECTED))
def test_shared_benchmarks_load(name):
    problems = load_benchmark(BENCHMARKS / f"{name}.jsonl")
    count, first = EXPECTED[name]
    assert len(problems) == count
    assert problems[0].answer == first
    assert all(isinstance(p, BenchmarkProblem) and p.problem and p.answer for p in problems)
    assert len({p.id for p in problems}) == count
    assert not any("$" in p.answer.replace("\\$", "").replace("$ $", "") for p in problems)
    assert load_benchmark(BENCHMARKS / f"{name}.jsonl", name=name) == problems
    assert set(benchmark_names()) == set(EXPECTED)


@needs_data
def test_olympiadbench_lists_and_amc_floats():
    oly = {p.id: p.answer for p in load_benchmark(BENCHMARKS / "olympiadbench.jsonl")}
    assert "(1,8,19), (2,7,13), (4,5,7)" in oly.values()
    assert "69,84" in oly.values()  # ["$69$,$84$"]
    assert "(-\\infty, 0) \\cup\\{1\\}" in oly.values()  # trailing period dropped
    amc = [p.answer for p in load_benchmark(BENCHMARKS / "amc23.jsonl")]
    assert "-1" in amc and all("." not in a for a in amc)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_named_formats_on_synthetic_files(tmp_path):
    minerva = _write(tmp_path / "minerva_math.jsonl", [{"problem": "p", "solution": "a \\boxed{1} b \\boxed{\\frac{1}{2}}", "idx": 3}])
    assert load_benchmark(minerva) == [BenchmarkProblem("3", "p", "\\frac{1}{2}")]
    oly = _write(tmp_path / "olympiadbench.test.jsonl", [{"question": "q", "final_answer": ["$x^2$", "$3$"]}])
    assert load_benchmark(oly) == [BenchmarkProblem("olympiadbench-1", "q", "x^2, 3")]
    amc = _write(tmp_path / "whatever.jsonl", [{"question": "q", "answer": 2.5}, {"question": "r", "answer": 3}])
    assert [p.answer for p in load_benchmark(amc, name="amc23")] == ["2.5", "3"]


def test_explicit_fields(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [{"q": "What?", "gold": "42", "uid": "a"}, "", {"q": "Why?", "gold": 7}])
    problems = load_benchmark(path, problem_field="q", answer_field="gold", id_field="uid")
    assert problems == [BenchmarkProblem("a", "What?", "42"), BenchmarkProblem("mine-3", "Why?", "7")]
    sol = _write(tmp_path / "sol.jsonl", [{"q": "x", "sol": "so \\boxed{5}."}])
    assert load_benchmark(sol, problem_field="q", answer_field="sol", answer_from_boxed=True)[0].answer == "5"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"problem": "p", "answer": "1"}, "{not json"], "bad.jsonl:2: invalid JSON"),
        ([{"problem": "p"}], "bad.jsonl:1: field 'answer' is missing"),
        ([{"problem": "p", "answer": None}], "bad.jsonl:1: field 'answer' is missing"),
        ([{"problem": "p", "answer": "  "}], "bad.jsonl:1: field 'answer' is empty"),
        ([{"problem": "p", "answer": {"a": 1}}], "bad.jsonl:1: field 'answer' has type dict"),
        ([{"answer": "1"}], "bad.jsonl:1: field 'problem' is missing"),
        (["[1, 2]"], "bad.jsonl:1: expected a JSON object"),
        ([], "no problems"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, rows, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        load_benchmark(path, problem_field="problem", answer_field="answer")


def test_minerva_without_box(tmp_path):
    path = _write(tmp_path / "minerva_math.jsonl", [{"problem": "p", "solution": "no box here"}])
    with pytest.raises(DataError, match=r"minerva_math.jsonl:1: field 'solution' has no complete \\boxed"):
        load_benchmark(path)


def test_unknown_names(tmp_path):
    path = _write(tmp_path / "other.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(ConfigError, match="cannot infer the benchmark"):
        load_benchmark(path)
    with pytest.raises(ConfigError, match="aime24, aime25, amc23, math500, minerva_math, olympiadbench"):
        load_benchmark(path, name="gsm8k")
    with pytest.raises(DataError, match="cannot read"):
        load_benchmark(tmp_path / "absent.jsonl", name="aime24")
