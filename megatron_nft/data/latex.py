"""LaTeX helpers shared by the benchmark loaders (golds inside worked solutions) and answer extraction.

`last_boxed(text)`: the content of the last ``\\boxed{...}`` / ``\\fbox{...}``, braces balanced, in time
linear in the length of the text (a 10^6-character runaway generation costs milliseconds). It lives in
the data layer because data (minerva_math's gold is the last box of its solution) comes before reward
in the data flow; megatron_nft.reward.extract builds on it. Pure Python, no third-party imports.
"""

from __future__ import annotations

import re

# Longest box content returned; a longer one is treated as no box (no real answer is that long, and
# the bound keeps the brace walk short on a runaway box).
MAX_BOXED_CHARS = 10_000

# `\boxed{`, `\boxed {`, `\fbox{`, and the brace-less `\boxed 5` form. The negative look-ahead keeps
# `\boxedfoo` (another macro) from matching.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Only backslash escapes and braces matter when balancing: `\{`, `\}` and `\\` are skipped as pairs.
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_BLANKS_RE = re.compile(r"[ \t]*")


def _last_box_start(text: str) -> int:
    """Index just after the last `\\boxed` / `\\fbox` command, or -1."""
    # rfind finds the usual last box without scanning the whole response; when a few candidates in a
    # row are other macros (`\\boxedfoo`), one regex pass over the rest stays linear.
    best = -1
    for name in ("\\boxed", "\\fbox"):
        pos = text.rfind(name)
        tries = 0
        while pos != -1 and not _BOX_RE.match(text, pos):
            tries += 1
            if tries > 8:
                last = None
                for last in _BOX_RE.finditer(text):
                    pass
                return -1 if last is None else last.end()
            pos = text.rfind(name, 0, pos)
        if pos != -1:
            best = max(best, pos + len(name))
    return best


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces balanced.

    Only the last box is considered: when it is unclosed (a truncated response) the result is None
    rather than an earlier box, which keeps the scan linear and never credits a superseded answer.
    ``\\boxed 5`` (no braces) yields the token after the space.
    """
    start = _last_box_start(text)
    if start < 0:
        return None
    n = len(text)
    i = _BLANKS_RE.match(text, start).end()
    if i >= n:
        return None
    if text[i] != "{":
        if i == start:  # `\boxed` directly followed by something else (e.g. `\boxed\frac`): unsupported
            return None
        m = re.match(r"[^\s$]+", text[i : i + 1000])
        return m.group(0) if m else None
    depth = 0
    # A real answer is short; giving up after MAX_BOXED_CHARS bounds the cost of a runaway box.
    for m in _BRACE_RE.finditer(text, i, min(n, i + MAX_BOXED_CHARS + 2)):
        tok = m.group(0)
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : m.start()].strip()
                return content or None
    return None  # unbalanced (the box never closes) or longer than MAX_BOXED_CHARS


# A control word with the spaces after it (kept as one space only before a letter: `\pi r` is not
# `\pir`), a control symbol (`\\`, `\ `, `\{`: kept whole, so the space of `\ ` survives), or spaces.
_SPACES_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|(\\.)|\s+", re.DOTALL)


def _keep_significant(m: re.Match) -> str:
    if m.group(1):
        return m.group(1) + " "
    return m.group(2) or ""


def drop_insignificant_spaces(text: str) -> str:
    """`text` without the whitespace that LaTeX math mode ignores: all of it but one space between a
    control word and a following letter. `\\frac{4 A}{3+3 i} e^{i t}` -> `\\frac{4A}{3+3i}e^{it}`.
    (Inside `\\text{}` spaces do matter; answers are compared with both sides treated alike.)"""
    return _SPACES_RE.sub(_keep_significant, text)
