"""Cheap checks that keep answers which would only stall a grader out of the grading pool.

Some answers make sympy (under both graders) run for seconds or forever: deeply nested brackets (the
LaTeX parser's recursion), power towers and huge factorials (sympy evaluates numeric powers eagerly:
9^{9^{9^9}} has more digits than memory holds), and very long expressions. The pool's hard timeout
already bounds each of them to `timeout_s` of one worker; these checks, linear in the answer's length
and run in the calling process, score them 0 without spending a worker at all. No real final answer
comes near the limits: over the six benchmark files the longest gold answer has 210 characters, the
deepest 4 levels of brackets, the largest number 10^100 (tests/test_reward.py checks that every gold
passes).

`refusal(answer, gold)` returns None for an answer to grade, else a short reason.
"""

from __future__ import annotations

import math
import re

# Brackets of any kind ((, [, {) nested deeper than this. math-verify's LaTeX parsing is exponential in
# the depth of nested braces (measured: 8 levels 0.7 s, 16 levels 17 s, 24 never ends in 20 s);
# twice the deepest gold answer's 4 levels.
MAX_DEPTH = 8
MIN_LENGTH_CAP = 1000  # answers may be up to max(MIN_LENGTH_CAP, LENGTH_FACTOR * len(gold)) characters
LENGTH_FACTOR = 4
MAX_DIGITS = 1e6  # a numeric power or factorial with more decimal digits than this

_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|\\[A-Za-z]+|\\.|\S")
_MUL = {"*", "\\cdot", "\\times"}
_FRACS = {"\\frac", "\\dfrac", "\\tfrac"}
_IGNORED = {"\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ "}
_OPEN_CLOSE = {"{": "}", "(": ")", "[": "]"}


def bracket_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


class _SizeScan:
    """A recursive-descent reading of the numeric part of a LaTeX/plain expression that tracks an
    upper bound on log10 |value| of every power and factorial whose operands are numbers.

    Anything non-numeric (variables, functions, relations) makes the enclosing value unknown (None)
    but the scan goes on, so a tower inside `x + 9^{9^{9^9}}` is still found. Depth is bounded by
    MAX_DEPTH, checked before the scan."""

    def __init__(self, text: str):
        self.tokens = [t for t in _TOKEN_RE.findall(text) if t not in _IGNORED]
        self.pos = 0
        self.largest = 0.0  # the most decimal digits of any numeric power / factorial seen

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def scan(self) -> float:
        while self.peek() is not None:
            self.expr()
            if self.peek() is not None:
                self.take()  # a token no rule starts with (a relation, a comma, a stray bracket)
        return self.largest

    def expr(self, closer: str | None = None) -> float | None:
        value = self.term(closer)
        while self.peek() in ("+", "-", "\\pm"):
            self.take()
            rhs = self.term(closer)
            value = None if value is None or rhs is None else max(value, rhs) + math.log10(2)
        return value

    def _starts_atom(self, closer: str | None) -> bool:
        tok = self.peek()
        return tok is not None and tok != closer and tok not in ("+", "-", "\\pm", "^", "!", "}", ")", "]", ",", "=")

    def term(self, closer: str | None) -> float | None:
        value = self.power(closer)
        while True:
            if self.peek() in _MUL:
                self.take()
            elif not self._starts_atom(closer):
                return value
            rhs = self.power(closer)
            value = None if value is None or rhs is None else value + rhs

    def power(self, closer: str | None) -> float | None:
        base = self.factorials(self.atom(closer))
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.superscript(closer)
        if base is None or exponent is None:
            return None
        value = 10.0 ** exponent if exponent < 308 else math.inf  # the exponent's own size
        digits = value * base if base > 0 else 0.0  # |base| <= 1: the power stays small
        self._seen(digits)
        return self.factorials(digits)

    def superscript(self, closer: str | None) -> float | None:
        if self.peek() == "{":
            return self.factorials(self.atom(closer))
        # plain text: 2^3^4 is a tower, read right to left
        return self.power(closer)

    def factorials(self, value: float | None) -> float | None:
        while self.peek() == "!":
            self.take()
            if value is None:
                continue
            n = 10.0 ** value if value < 308 else math.inf
            value = math.lgamma(n + 1) / math.log(10) if n < 1e300 else math.inf
            self._seen(value)
        return value

    def _seen(self, digits: float) -> None:
        self.largest = max(self.largest, digits)

    def atom(self, closer: str | None) -> float | None:
        tok = self.take()
        if tok is None:
            return None
        if tok[0].isdigit():
            return math.log10(float(tok)) if float(tok) >= 1 else 0.0
        if tok == "-":
            return self.atom(closer)
        if tok in _OPEN_CLOSE:
            close = _OPEN_CLOSE[tok]
            value = self.expr(close)
            while self.peek() is not None and self.peek() != close:
                self.take()
                self.expr(close)
            self.take()
            return value
        if tok in _FRACS:
            numerator = self.atom(closer)
            self.atom(closer)  # the denominator: scanned for towers; >= 1 is assumed for the bound
            return numerator
        return None  # a variable or a command: unknown value


def refusal(answer: str, gold: str = "") -> str | None:
    """None when `answer` should be graded; else why it is scored 0 without grading."""
    cap = max(MIN_LENGTH_CAP, LENGTH_FACTOR * len(gold))
    if len(answer) > cap:
        return f"longer than {cap} characters"
    if bracket_depth(answer) > MAX_DEPTH:
        return f"brackets nested deeper than {MAX_DEPTH}"
    digits = _SizeScan(answer).scan()
    if digits > MAX_DIGITS:
        return f"a number with more than {MAX_DIGITS:.0e} digits"
    return None
