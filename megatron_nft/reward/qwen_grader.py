"""The "qwen_math" grader: Qwen2.5-Math-evaluation-style answer equivalence.

Registered as `grader="qwen_math"` (GradingPool / score_batch); like every grader it only ever runs
inside the grading pool's worker processes, so the pool's hard per-answer timeout bounds the sympy
work below (which can take unbounded time on adversarial input).

Both strings (the gold and the extracted answer) are first normalised by `normalize_answer`:
$ signs (and the currency sign \\$), \\text{}/\\mbox{}/\\mathrm{} wrappers, units ("degrees", "cm",
^\\circ, ...), \\left/\\right, \\dfrac/\\tfrac -> \\frac, a trailing period, thousands separators ("1,000" -> "1000"), percent signs
("50\\%" -> "50"), spacing commands, "x = " prefixes, \\frac12 -> \\frac{1}{2}. Then the answer is right
when, in this order:
  1. the normalised strings are equal;
  2. both are plain numbers (reward/exact.py: integers, decimals, Python-style `-1./3`, a/b,
     \\frac{a}{b}, powers, factorials) whose exact values are equal, or, when one is written as a
     decimal (a possible rounding), within a relative tolerance of 1e-4 computed on the exact values
     (floats would call 1/2004! and 1/2006! equal: both underflow to 0);
  3. both are bracketed tuples/intervals, or comma-separated lists, of the same length and bracket
     kind whose elements are pairwise equal by these rules;
  4. latex2sympy (latex2sympy2_extended) parses both and sympy finds them equal: a == b, or
     simplify(a - b) == 0 (for equations, of lhs - rhs), or their numerical values agree within 1e-4.
The rules are written from the description of Qwen's evaluation toolkit, not from its code.
"""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction

from megatron_nft.reward.exact import compare_exact
from megatron_nft.reward.grading import register_grader

REL_TOL = 1e-4
_REL_TOL_EXACT = Fraction(str(REL_TOL))

# Words that follow a number as its unit; removed at the end of an answer, with an optional plural
# "s", when inside \text{}/\mbox{} or, bare, after a space (one-letter units only inside \text{}: a
# bare "2m" is an expression in m). Longest first so "centimeters" wins over "meters".
_UNITS = sorted(
    {
        "degree", "deg", "radian", "rad", "cm", "mm", "km", "m", "meter", "metre", "centimeter",
        "millimeter", "kilometer", "inch", "inches", "foot", "feet", "ft", "yard", "mile", "unit",
        "square unit", "square units", "sq units", "square feet", "square inches", "square meters",
        "cubic units", "cubic feet", "cubic inches", "cents", "cent", "dollar", "dollars", "hour",
        "hours", "minute", "minutes", "second", "seconds", "sec", "day", "days", "week", "weeks",
        "year", "years", "mph", "kg", "g", "gram", "pound", "pounds", "lb", "lbs", "ounce", "liter",
        "litre", "ml", "percent", "points", "point", "people", "students", "ways", "times",
    },
    key=len,
    reverse=True,
)
_UNIT_RE = re.compile(
    r"(?:\\(?:text|mbox|mathrm|textrm)\s*\{\s*(?:" + "|".join(re.escape(u) for u in _UNITS) + r")s?\s*\}"
    r"|(?<=[\d}])\s+(?:" + "|".join(re.escape(u) for u in _UNITS if len(u) > 1) + r")s?)"
    r"(?:\^\{?[23]\}?)?\s*$"
)
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|textrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([+-]?(?:\d+\.?\d*|\.\d+))\}\{([+-]?(?:\d+\.?\d*|\.\d+))\}$")
_SLASH_RE = re.compile(r"^([+-]?\d+)/(\d+)$")
_ASSIGN_RE = re.compile(r"^\s*(?:\\?[A-Za-z](?:_\{?\w+\}?)?|\\[a-z]+)\s*=\s*(?!=)")


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
        s = s[1:-1].strip()
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c == "{"
        depth -= c == "}"
        if depth < 0:
            return False
    return depth == 0


def _fix_short_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{x} -> \\frac{1}{x}, \\sqrt3 -> \\sqrt{3}."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)(?=\s*\{)", r"\\frac{\1}", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    return re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)


def _drop_spacing(m: re.Match) -> str:
    return m.group(0) if m.group(0) == "\\\\" else ""


@functools.lru_cache(maxsize=8192)
def normalize_answer(s: str) -> str:
    """The canonical string form of an answer (see the module docstring). Linear-time regexes only."""
    s = str(s).strip().replace("\n", " ")
    s = s.replace("\\$", "").replace("$", "")  # "\$36": a currency sign, backslash included
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\displaystyle", "")
    # spacing: "\!", "\,", "\;", "\:", "\ ", "~"; "{,}" is a thousands separator written in LaTeX
    s = s.replace("{,}", ",")
    # `\\` (a row break) is matched as a pair first, so the `\ ` inside "\\ " is not taken for a space
    s = re.sub(r"\\\\|\\[!,;: ]", _drop_spacing, s).replace("~", " ")
    # degrees: ^\circ, ^{\circ}, \circ, \degree
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "").replace("\\degree", "")
    # percent
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    for _ in range(2):  # "5 \text{ cm}^2", then a plural/second unit such as "5 square units"
        s = _UNIT_RE.sub("", s).strip()
    s = _TEXT_RE.sub(r"\1", s).strip()
    s = s.rstrip(".").strip()
    # "x = 5" -> "5" (a single assignment to one variable); equations with more on the left stay.
    if s.count("=") == 1:
        m = _ASSIGN_RE.match(s)
        if m:
            s = s[m.end():].strip()
    s = _strip_outer_braces(s)
    s = _fix_short_fracs(s)
    if _THOUSANDS_RE.match(s):  # before spaces go: "1, 000" is a list, not a thousand
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    if s.startswith("."):
        s = "0" + s
    elif s.startswith("-."):
        s = "-0" + s[1:]
    if _NUMBER_RE.match(s) and "." in s and "e" not in s.lower():  # "2.50" -> "2.5", "3.0" -> "3"
        s = s.rstrip("0").rstrip(".") if "." in s else s
    return s


def _to_number(s: str) -> float | None:
    """The value of a normalised plain number, a/b or \\frac{a}{b}; None for anything else."""
    if _NUMBER_RE.match(s):
        try:
            return float(s)
        except ValueError:
            return None
    m = _FRAC_RE.match(s)
    if m:
        num, den = float(m.group(2)), float(m.group(3))
        if den == 0:
            return None
        return (-1 if m.group(1) == "-" else 1) * num / den
    m = _SLASH_RE.match(s)
    if m and int(m.group(2)) != 0:
        return int(m.group(1)) / int(m.group(2))
    return None


def _numbers_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0) or (a == 0 == b)


def _values_close(a: Fraction, b: Fraction) -> bool:
    """The numeric rule on exact values: no underflow, no overflow."""
    return abs(a - b) <= _REL_TOL_EXACT * max(abs(a), abs(b))


def _split_top_level(s: str) -> list[str]:
    """Split at commas outside any (), [], {}."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _bracketed(s: str) -> tuple[str, str, str] | None:
    """(open, inner, close) for "(a,b)" / "[a,b)" / "\\{a,b\\}" spanning the whole string, else None."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "{", s[2:-2], "}"
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        depth = 0
        for c in inner:  # the outer pair must enclose everything: "(1)+(2)" is not a tuple
            depth += c in "(["
            depth -= c in ")]"
            if depth < 0:
                return None
        if depth == 0:
            return s[0], inner, s[-1]
    return None


def _sympy_equal(a: str, b: str) -> bool:
    from sympy import Eq, N, simplify

    x, y = _parse_latex(a), _parse_latex(b)
    if x is None or y is None:
        return False
    try:
        if x == y:
            return True
    except Exception:
        pass
    if isinstance(x, Eq) and isinstance(y, Eq):
        x, y = x.lhs - x.rhs, y.lhs - y.rhs
        try:
            return simplify(x - y) == 0 or simplify(x + y) == 0
        except Exception:
            return False
    try:
        if simplify(x - y) == 0:
            return True
    except Exception:
        pass
    try:
        fx, fy = complex(N(x)), complex(N(y))
    except Exception:
        return False
    return abs(fx - fy) <= REL_TOL * max(abs(fx), abs(fy)) or fx == fy


@functools.lru_cache(maxsize=4096)
def _parse_latex(s: str):
    """sympy expression for a normalised LaTeX string (cached per worker: golds recur), or None."""
    from latex2sympy2_extended import latex2sympy

    try:
        return latex2sympy(s)
    except Exception:
        return None


def answers_equal(gold: str, answer: str, *, _depth: int = 0) -> bool:
    """True when `answer` is equivalent to `gold` under the rules of the module docstring."""
    g, a = normalize_answer(gold), normalize_answer(answer)
    if not g or not a:
        return False
    if g == a:
        return True
    exact = compare_exact(g, a, _values_close)
    if exact is not None:
        return exact
    gn, an = _to_number(g), _to_number(a)
    if gn is not None and an is not None:  # numbers too large for the exact path (reward/exact.py MAX_BITS)
        return _numbers_close(gn, an)
    if _depth < 3:
        gb, ab = _bracketed(g), _bracketed(a)
        if gb and ab and gb[0] == ab[0] and gb[2] == ab[2]:
            gp, ap = _split_top_level(gb[1]), _split_top_level(ab[1])
            if len(gp) > 1 and len(gp) == len(ap):
                return all(answers_equal(x, y, _depth=_depth + 1) for x, y in zip(gp, ap))
        elif not gb and not ab:
            gp, ap = _split_top_level(g), _split_top_level(a)
            if len(gp) > 1 and len(gp) == len(ap):
                if all(answers_equal(x, y, _depth=_depth + 1) for x, y in zip(gp, ap)):
                    return True
                # unordered answer lists ("2, 3" vs "3, 2"), as multi-answer golds are sets of roots
                remaining = list(ap)
                for x in gp:
                    hit = next((i for i, y in enumerate(remaining) if answers_equal(x, y, _depth=_depth + 1)), None)
                    if hit is None:
                        return False
                    remaining.pop(hit)
                return True
    if gn is not None and an is None and _NUMBER_RE.match(a) is None and not re.search(r"[\\\d]", a):
        return False  # a number against plain words: nothing for sympy to find
    return _sympy_equal(g, a)


def qwen_math_grader(gold: str, answer: str) -> float:
    """1.0 when `answer` is equivalent to `gold` (Qwen-math-eval semantics), else 0.0."""
    return 1.0 if answers_equal(gold, answer) else 0.0


register_grader("qwen_math", qwen_math_grader)
