"""The "qwen_math" grader: normalisation rules, numeric tolerance, sympy equality, benchmark golds, timeout."""

from __future__ import annotations

import time

import pytest

from megatron_nft.data.benchmarks import benchmark_file, benchmark_names, load_benchmark
from megatron_nft.reward import GradingPool, grader_names
from megatron_nft.reward.qwen_grader import answers_equal, normalize_answer, qwen_math_grader


@pytest.fixture(scope="module")
def pool():
    with GradingPool(grader="qwen_math", answer_format="boxed", timeout_s=5.0, workers=2) as p:
        yield p


def test_registered():
    assert "qwen_math" in grader_names()


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$5$", "5"),  # dollar signs
        (r"\text{5}", "5"),  # \text{} wrapper
        (r"90^\circ", "90"),  # degrees
        (r"90^{\circ}", "90"),
        ("90 degrees", "90"),  # unit words
        (r"5 \text{ cm}", "5"),
        (r"5\text{ cm}^2", "5"),
        ("10 square units", "10"),
        (r"\left(1,2\right)", "(1,2)"),  # \left / \right
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),  # \dfrac -> \frac
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        ("5.", "5"),  # trailing period
        ("1,000", "1000"),  # thousands separators
        ("1,234,567.5", "1234567.5"),
        ("1{,}000", "1000"),
        (r"50\%", "50"),  # percentages
        ("50%", "50"),
        ("x = 3", "3"),  # a single assignment
        (r"\frac12", r"\frac{1}{2}"),
        ("2.50", "2.5"),
        (".5", "0.5"),
        ("2m", "2m"),  # a bare one-letter "unit" is an expression in m: kept
    ],
)
def test_normalisation_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_tuple_commas_are_not_thousands_separators():
    assert normalize_answer("1, 000") == "1,000"
    assert normalize_answer("(1,000, 2)") == "(1,000,2)"


@pytest.mark.parametrize(
    "gold, answer, right",
    [
        ("0.5", r"\frac{1}{2}", True),
        (r"\frac{1}{2}", "0.5", True),
        ("1/3", "0.33333", True),  # within 1e-4 relative
        ("1/3", "0.333", False),  # 1e-3 off
        ("100", "100.001", True),
        ("100", "100.1", False),
        ("-\\frac{3}{4}", "-0.75", True),
        ("1000", "1,000", True),
        ("50", r"50\%", True),
    ],
)
def test_numeric_tolerance(gold, answer, right):
    assert answers_equal(gold, answer) is right


@pytest.mark.parametrize(
    "gold, answer",
    [
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        ("x^2+2x+1", "(x+1)^2"),
        (r"\frac{\pi}{2}", r"\pi/2"),
        ("(1,2)", r"\left( 1, 2 \right)"),
        ("2, 3", "3, 2"),  # lists of roots in any order
    ],
)
def test_symbolic_equality(gold, answer):
    assert qwen_math_grader(gold, answer) == 1.0


@pytest.mark.parametrize(
    "gold, answer",
    [("3", "4"), ("[1,2)", "(1,2)"), ("x^2+1", "(x+1)^2"), ("2m", "2"), ("5", "five apples"), ("(1,2)", "(1,2,3)")],
)
def test_wrong_answers(gold, answer):
    assert qwen_math_grader(gold, answer) == 0.0


def test_in_pool(pool):
    responses = [r"so \boxed{\dfrac{1}{2}}", r"\boxed{0.75}", r"\boxed{1,000 \text{ cm}}", "no box"]
    assert pool.score(responses, ["0.5", r"\frac{3}{4}", "1000", "1"]) == [1.0, 1.0, 1.0, 0.0]


def test_benchmark_golds_grade_against_themselves(pool):
    rates = {}
    failures = {}
    for name in benchmark_names():
        problems = load_benchmark(benchmark_file(name))
        scores = pool.score(["\\boxed{" + p.answer + "}" for p in problems], [p.answer for p in problems])
        rates[name] = sum(scores) / len(scores)
        failures[name] = [(p.id, p.answer) for p, s in zip(problems, scores) if s != 1.0]
    print("qwen_math self-grading pass rates:", rates, "failures:", {k: v for k, v in failures.items() if v})
    assert all(rate == 1.0 for rate in rates.values()), (rates, failures)


def test_pathological_input_is_cut_at_the_timeout():
    # 9^(9^(9^9)) makes sympy try to evaluate an astronomically large integer power. The guard would
    # refuse it before grading (tests/test_reward.py); off here, so the timeout is what stops it.
    with GradingPool(grader="qwen_math", timeout_s=1.0, workers=1, guard=False) as p:
        start = time.perf_counter()
        scores = p.score([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{1}"], ["1", "1"])
        elapsed = time.perf_counter() - start
        assert scores == [0.0, 1.0]
        assert p.last_stats["timeouts"] == 1
    assert elapsed < 10
