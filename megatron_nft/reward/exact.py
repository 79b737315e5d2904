"""Exact values of plain numeric answers, compared before any float tolerance (both graders).

Floats cannot tell some distinct numbers apart: 1/2004! and 1/2006! both underflow to 0.0,
2^{-2000} and 2^{-2001} too, and 10^{100} + 1 rounds to 10^{100}; math-verify (its evalf with
chop) and the qwen_math grader's numeric rule then call them equal. `exact_value` reads an answer
that is a plain number written in LaTeX or Python style -- integers, decimals (`0.25`, `1.`, `.5`,
`2e-3`), `+ - * / \\cdot \\times \\div`, `\\frac{}{}` (and `\\dfrac`, `\\tfrac`, `\\frac12`), integer
powers `^{}` and factorials `!`, with parentheses and braces -- as a `fractions.Fraction`, and
`compare_exact` decides equality from those values: equal values are equal; distinct values are
different unless one side was written with a decimal fraction, which may be a rounding, and then the
grader's own tolerance (passed in) is applied to the exact values. Anything else (a symbol, a root,
a list, a unit) is not a plain number: `exact_value` returns None and the grader goes on as before.

Pure Python and bounded: numbers of more than MAX_BITS bits are not built (None instead), so the
exact path never costs more than milliseconds; the guard and the pool's timeout bound the rest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

# Largest numerator or denominator built, in bits (~30,000 decimal digits: 2006! has 5,700). Fraction
# arithmetic reduces by gcd, quadratic in the size: at this bound an operation takes about a millisecond.
MAX_BITS = 100_000

# Markup that does not change a number's value: math delimiters, dollar signs (`\$` is currency),
# sizing, spacing commands (but not the row break `\\`), \displaystyle. Plain spaces stay: the
# tokenizer skips them, and "1 2" is two numbers, not 12.
_NOISE_RE = re.compile(
    r"\\\\|\\\$|\$|\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])|\\displaystyle(?![A-Za-z])|\\[!,;: ]|~"
)
_TOKEN_RE = re.compile(
    r"\s*(?:"
    r"(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"  # 12, 1.5, 1., .5, 2e-3
    r"|(?P<cmd>\\[A-Za-z]+)"
    r"|(?P<sym>[-+*/^!(){}])"
    r")"
)
_SPACES_RE = re.compile(r"\s*")
_FRACS = {"\\frac", "\\dfrac", "\\tfrac"}
_MUL = {"*", "\\cdot", "\\times"}
_DIV = {"/", "\\div"}


@dataclass(frozen=True)
class Exact:
    value: Fraction
    decimal: bool  # written with a decimal fraction or an exponent (0.33, 2e-3): possibly rounded


class _NotExact(Exception):
    pass


def _clean(text: str) -> str:
    def keep_row_break(m: re.Match) -> str:
        return m.group(0) if m.group(0) == "\\\\" else ""

    return _NOISE_RE.sub(keep_row_break, text)


def _check_size(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise _NotExact
    return x


class _Parser:
    """Recursive descent over one cleaned string; raises _NotExact at anything outside the grammar."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.decimal = False

    def parse(self) -> Fraction:
        value = self.expr()
        if _SPACES_RE.match(self.text, self.pos).end() != len(self.text):
            raise _NotExact
        return value

    def peek(self) -> str | None:
        m = _TOKEN_RE.match(self.text, self.pos)
        return m.group(m.lastgroup) if m else None

    def take(self) -> str:
        m = _TOKEN_RE.match(self.text, self.pos)
        if not m:
            raise _NotExact
        self.pos = m.end()
        return m.group(m.lastgroup)

    def expect(self, token: str) -> None:
        if self.take() != token:
            raise _NotExact

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _check_size(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in _MUL:
                self.take()
                value = _check_size(value * self.unary())
            elif tok in _DIV:
                self.take()
                rhs = self.unary()
                if rhs == 0:
                    raise _NotExact
                value = _check_size(value / rhs)
            else:
                return value

    def unary(self) -> Fraction:
        tok = self.peek()
        if tok in ("-", "+"):
            self.take()
            value = self.unary()
            return -value if tok == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.factorials(self.atom())
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.group_or_digit()
        if self.peek() == "^":  # a^b^c: not valid LaTeX, and a tower besides
            raise _NotExact
        return _power(base, exponent)

    def factorials(self, value: Fraction) -> Fraction:
        if self.peek() == "!":
            self.take()
            if self.peek() == "!":  # n!! is the double factorial in LaTeX, (n!)! in sympy: ambiguous
                raise _NotExact
            value = _factorial(value)
        return value

    def group_or_digit(self) -> Fraction:
        """A macro argument: `{expr}` or a single digit (`\\frac12`, `2^3`)."""
        if self.peek() == "{":
            self.take()
            value = self.expr()
            self.expect("}")
            return value
        self.pos = _SPACES_RE.match(self.text, self.pos).end()
        if self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
            return Fraction(int(self.text[self.pos - 1]))
        raise _NotExact

    def atom(self) -> Fraction:
        m = _TOKEN_RE.match(self.text, self.pos)
        if not m:
            raise _NotExact
        if m.group("num"):
            self.pos = m.end()
            num = m.group("num")
            if re.search(r"\.\d|[eE]", num):
                self.decimal = True
            return _check_size(Fraction(num.rstrip(".") if num.endswith(".") else num))
        tok = m.group(m.lastgroup)
        self.pos = m.end()
        if tok in ("(", "{"):
            value = self.expr()
            self.expect(")" if tok == "(" else "}")
            return value
        if tok in _FRACS:
            num = self.group_or_digit()
            den = self.group_or_digit()
            if den == 0:
                raise _NotExact
            return _check_size(num / den)
        raise _NotExact


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise _NotExact  # a root: not rational in general
    e = exponent.numerator
    if base == 0 and e < 0:
        raise _NotExact
    if base in (0, 1):
        return base
    if base == -1:
        return Fraction(-1 if e % 2 else 1)
    size = max(base.numerator.bit_length(), base.denominator.bit_length())
    if abs(e) * (size - 1) > MAX_BITS:  # the result's size, known before computing it
        raise _NotExact
    return _check_size(base**e)


def _factorial(value: Fraction) -> Fraction:
    if value.denominator != 1 or value < 0:
        raise _NotExact
    n = value.numerator
    if n > 2 and math.lgamma(n + 1) / math.log(2) > MAX_BITS:
        raise _NotExact
    return Fraction(math.factorial(n))


def exact_value(text: str) -> Exact | None:
    """The exact value of `text` when it is a plain number (module docstring), else None."""
    cleaned = _clean(text)
    if not cleaned.strip() or len(cleaned) > 2000:
        return None
    parser = _Parser(cleaned)
    try:
        value = parser.parse()
    except (_NotExact, RecursionError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return Exact(value, parser.decimal)


def compare_exact(gold: str, answer: str, close: Callable[[Fraction, Fraction], bool]) -> bool | None:
    """None unless both are plain numbers; then True when their values are equal, or when one was
    written with a decimal fraction and `close(gold_value, answer_value)` (the grader's tolerance,
    evaluated on exact values); False otherwise."""
    g = exact_value(gold)
    if g is None:
        return None
    a = exact_value(answer)
    if a is None:
        return None
    if g.value == a.value:
        return True
    if g.decimal or a.decimal:
        return bool(close(g.value, a.value))
    return False
