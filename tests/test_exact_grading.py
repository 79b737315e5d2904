"""Exact numeric values before any float tolerance (megatron_nft/reward/exact.py), in both graders.

References: Python's own Fraction arithmetic and math.factorial for the values; for ordinary pairs,
math-verify's verify() itself (the wrapper must agree with it wherever floats are not the problem).
"""

from __future__ import annotations

import math
import time
from fractions import Fraction

import pytest

from megatron_nft.data.latex import drop_insignificant_spaces
from megatron_nft.reward.exact import MAX_BITS, compare_exact, exact_value
from megatron_nft.reward.grading import _math_verify_parse, math_verify_grader
from megatron_nft.reward.qwen_grader import normalize_answer, qwen_math_grader

GRADERS = {"math_verify": math_verify_grader, "qwen_math": qwen_math_grader}


@pytest.mark.parametrize(
    "text, value, decimal",
    [
        ("42", Fraction(42), False),
        ("-1./3", Fraction(-1, 3), False),  # Python-style float literals in minerva golds
        ("-3./2", Fraction(-3, 2), False),
        ("0.25", Fraction(1, 4), True),
        (".5", Fraction(1, 2), True),
        ("2e-3", Fraction(1, 500), True),
        ("\\frac{1}{2006!}", Fraction(1, math.factorial(2006)), False),
        ("\\dfrac{3}{4}", Fraction(3, 4), False),
        ("\\frac12", Fraction(1, 2), False),
        ("\\frac 1 2", Fraction(1, 2), False),
        ("2^{-2000}", Fraction(1, 2**2000), False),
        ("2^3", Fraction(8), False),
        ("-2^2", Fraction(-4), False),  # the power binds tighter than the sign
        ("(-2)^{3}", Fraction(-8), False),
        ("3 \\cdot 4!", Fraction(72), False),
        ("10^{100}+1", Fraction(10**100 + 1), False),
        ("\\$36", Fraction(36), False),
        ("$\\left( \\frac{7}{2} \\right)$", Fraction(7, 2), False),
        ("6 \\div 4", Fraction(3, 2), False),
    ],
)
def test_exact_values_against_fraction_arithmetic(text, value, decimal):
    got = exact_value(text)
    assert got is not None and got.value == value and got.decimal is decimal


@pytest.mark.parametrize(
    "text",
    ["x", "\\sqrt{2}", "\\pi", "1, 2", "1 2", "2(3)", "2\\frac{1}{2}", "3!!", "2^{1/2}", "\\frac{1}{0}", "1/0",
     "(0,1]", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "", "50\\%"],
)
def test_not_plain_numbers_are_left_to_the_grader(text):
    assert exact_value(text) is None


@pytest.mark.parametrize("text", ["9^{9^{9^{9}}}", "(10^{9})!", "2^{10^{7}}", "20000!", "{" * 5000 + "1" + "}" * 5000])
def test_huge_values_are_refused_quickly(text):
    start = time.perf_counter()
    assert exact_value(text) is None
    assert time.perf_counter() - start < 0.05
    assert exact_value("2^{%d}" % (MAX_BITS - 1)).value == 2 ** (MAX_BITS - 1)  # the bound, not below it


def test_compare_exact_applies_the_tolerance_only_to_decimals():
    never = lambda a, b: False  # noqa: E731
    always = lambda a, b: True  # noqa: E731
    assert compare_exact("\\frac{1}{2}", "0.5", never) is True  # equal values need no tolerance
    assert compare_exact("10000", "10001", always) is False  # two exact spellings: the values decide
    assert compare_exact("\\frac{1}{3}", "0.333", always) is True  # a decimal: the grader's rule
    assert compare_exact("x", "1", always) is None


# Pairs floats cannot separate: both values underflow to 0.0 or round to the same double (or, for
# qwen_math's 1e-4 relative rule, two distinct integers 1e-4 apart).
FALSE_POSITIVES = [
    ("\\frac{1}{2006!}", "\\frac{1}{2004!}"),
    ("2^{-2000}", "2^{-2001}"),
    ("10^{100}", "10^{100}+1"),
    ("10000", "10001"),
]


@pytest.mark.parametrize("grader", sorted(GRADERS))
@pytest.mark.parametrize("gold, answer", FALSE_POSITIVES)
def test_distinct_exact_values_are_wrong(grader, gold, answer):
    assert GRADERS[grader](gold, answer) == 0.0
    assert GRADERS[grader](gold, gold) == 1.0


@pytest.mark.parametrize("grader", sorted(GRADERS))
@pytest.mark.parametrize(
    "gold, answer",
    [
        ("\\frac{1}{2006!}", "\\frac{1}{2006 \\cdot 2005 \\cdot 2004!}"),
        ("-1./3", "-\\frac{1}{3}"),
        ("-1./3", "-0.333333"),
        ("-3./2", "-1.5"),
        ("\\$32,\\!348", "32348"),
        ("\\$36", "36"),
        ("36", "\\$36"),
        ("\\$18.90", "18.9"),
    ],
)
def test_equal_values_in_other_spellings_are_right(grader, gold, answer):
    assert GRADERS[grader](gold, answer) == 1.0


def test_decimal_tolerances_are_each_graders_own():
    # qwen_math: relative 1e-4; math_verify: both rounded to 6 decimals (verify's float_rounding)
    assert qwen_math_grader("\\frac{1}{3}", "0.33333") == 1.0
    assert qwen_math_grader("\\frac{1}{3}", "0.333") == 0.0
    assert qwen_math_grader("100", "100.001") == 1.0
    assert math_verify_grader("\\frac{1}{3}", "0.333333") == 1.0
    assert math_verify_grader("\\frac{1}{3}", "0.33333") == 0.0
    assert math_verify_grader("0.0123456789", "0.012346") == 1.0
    # ... but never wider than 1e-4 relative: rounding to 6 places alone makes tiny values all 0
    assert math_verify_grader("2.88e-19", "0") == 0.0  # was 1.0
    assert math_verify_grader("1e-8", "2e-8") == 0.0  # was 1.0
    assert math_verify_grader("2.88e-19", "2.88 \\times 10^{-19}") == 1.0  # was 0.0: e read as Euler's number
    assert math_verify_grader("4.5e33", "4.5 \\cdot 10^{33}") == 1.0


@pytest.mark.parametrize(
    "gold, answer",
    [("\\frac{1}{3}", "0.333333"), ("\\frac{1}{3}", "0.33333"), ("2", "2.0"), ("3", "4"), ("\\frac{6}{4}", "\\frac{3}{2}"),
     ("-5", "5"), ("0.5", "\\frac{1}{2}"), ("1.25", "1.250001"), ("1.25", "1.2501"), ("7", "7")],
)
def test_math_verify_wrapper_agrees_with_math_verify_on_ordinary_numbers(gold, answer):
    from math_verify import verify

    reference = verify(_math_verify_parse(gold), _math_verify_parse(answer), timeout_seconds=None)
    assert math_verify_grader(gold, answer) == (1.0 if reference else 0.0)


def test_qwen_dollar_and_row_break_normalisation():
    assert normalize_answer("\\$32,\\!348") == "32348"  # was "\\32,348"
    assert normalize_answer("\\$36") == "36"
    # the row break's second backslash is not a spacing command "\ " (was "1\\2" with one backslash)
    spaced = "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"
    assert normalize_answer(spaced) == normalize_answer("\\begin{pmatrix}1\\\\2\\end{pmatrix}") == "\\begin{pmatrix}1\\\\2\\end{pmatrix}"
    assert qwen_math_grader(spaced, "\\begin{pmatrix}1\\\\2\\end{pmatrix}") == 1.0
    assert qwen_math_grader(spaced, "\\begin{pmatrix}1\\\\3\\end{pmatrix}") == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\frac{4 A}{3+3 i} e^{i t}", "\\frac{4A}{3+3i}e^{it}"),
        ("\\pi r", "\\pi r"),  # a control word before a letter keeps one space
        ("\\pi  2", "\\pi2"),
        ("\\text {red}", "\\text{red}"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("a\\ b", "a\\ b"),  # control space
        ("m_{\\max }=n", "m_{\\max}=n"),
    ],
)
def test_drop_insignificant_spaces(text, expected):
    assert drop_insignificant_spaces(text) == expected


@pytest.mark.parametrize(
    "gold, answer",
    [
        ("\\frac{4 A}{3+3 i} e^{i t}", "\\frac{4A}{3+3i}e^{it}"),  # a standalone i made one side's symbols complex
        ("2i", "i \\cdot 2"),
        ("m_{\\max }=n^{2}-n-1", "m_{\\max}=n^{2}-n-1"),  # unparsed: compared as strings
        ("\\lambda_{\\text {red}} / \\sqrt{2}", "\\lambda_{\\text{red}}/\\sqrt{2}"),  # the second did not parse
    ],
)
def test_math_verify_spellings_of_one_expression(gold, answer):
    assert math_verify_grader(gold, answer) == 1.0
    assert math_verify_grader(gold, "3") == 0.0
