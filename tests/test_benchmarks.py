"""Benchmark loaders (megatron_nft.data.benchmarks) on the six shipped files and on synthetic files; names on the command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from megatron_nft.data.benchmarks import (
    BENCHMARK_DIR,
    BenchmarkProblem,
    benchmark_file,
    benchmark_names,
    load_benchmark,
    resolve_benchmark,
)
from megatron_nft.errors import ConfigError, DataError

BENCHMARKS = BENCHMARK_DIR

EXPECTED = {  # name: (problems, first answer)
    "aime24": (30, "204"),
    "aime25": (30, "70"),
    "amc23": (40, "27"),
    "math500": (500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "minerva_math": (272, "1.6"),
    "olympiadbench": (675, "2"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_shipped_benchmarks_load(name):
    problems = load_benchmark(BENCHMARKS / f"{name}.jsonl")
    count, first = EXPECTED[name]
    assert len(problems) == count
    assert problems[0].answer == first
    assert all(isinstance(p, BenchmarkProblem) and p.problem and p.answer for p in problems)
    assert len({p.id for p in problems}) == count
    assert not any("$" in p.answer.replace("\\$", "").replace("$ $", "") for p in problems)
    assert load_benchmark(BENCHMARKS / f"{name}.jsonl", name=name) == problems
    assert set(benchmark_names()) == set(EXPECTED)


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


def test_shipped_files_match_the_readme_sha256():
    """The README's checksums are the files' (the copies are the public files, unchanged)."""
    readme = (BENCHMARKS / "README.md").read_text()
    listed = dict(reversed(line.split()) for line in readme.splitlines() if line.endswith(".jsonl") and len(line.split()) == 2)
    assert sorted(listed) == sorted(f"{n}.jsonl" for n in benchmark_names())
    for name, digest in listed.items():
        assert hashlib.sha256((BENCHMARKS / name).read_bytes()).hexdigest() == digest, name


def test_names_resolve_to_the_shipped_copies(tmp_path, monkeypatch):
    for name in benchmark_names():
        assert resolve_benchmark(name) == benchmark_file(name) == BENCHMARKS / f"{name}.jsonl"
    mine = _write(tmp_path / "mine.jsonl", [{"problem": "p", "answer": "1"}])
    assert resolve_benchmark(str(mine)) == mine
    # a known name means the shipped copy even when a file of that name is in the working directory
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "aime24", [{"problem": "p", "answer": "1"}])
    assert resolve_benchmark("aime24") == benchmark_file("aime24")
    with pytest.raises(ConfigError, match="'gsm8k': neither a benchmark name .aime24, aime25, amc23, math500, minerva_math, olympiadbench. nor an existing file"):
        resolve_benchmark("gsm8k")
    with pytest.raises(ConfigError, match="known names are aime24"):
        benchmark_file("aime2024")


def test_eval_takes_names_and_refuses_unknown_ones_in_one_line(tmp_path, capsys):
    from megatron_nft.cli import main

    args = ["eval", "--hf", str(tmp_path / "no_model"), "--out", str(tmp_path / "out"), "--quiet", "--benchmarks"]
    assert main([*args, "aime24", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'gsm8k'" in err[0] and "olympiadbench" in err[0], err
    # names (and a path) resolve; the next thing checked is the checkpoint
    assert main([*args, "aime24", "math500", str(benchmark_file("amc23"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_model" in err[0] and "benchmark" not in err[0], err
    assert not (tmp_path / "out").exists()


def test_shipped_files_are_package_data():
    """pyproject.toml's package-data takes every file of the folder, so `pip install` users get them
    (a wheel built from this tree was checked to hold the six files and the README)."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["megatron_nft.data"]
    shipped = sorted(str(f.relative_to(BENCHMARKS.parent)) for f in BENCHMARKS.iterdir())
    assert len(shipped) == len(benchmark_names()) + 1
    assert [f for f in shipped if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
