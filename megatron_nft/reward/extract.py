"""Final-answer extraction from a model response: DAPO's ``Answer: ...`` line and LaTeX ``\\boxed{...}``.

Everything here is linear in the length of the response (regex scans and one brace walk, no
backtracking over the whole text), so a 10^6-character runaway generation costs milliseconds.
Pure Python, no third-party imports: the trainer process and the grading workers both use it.
"""

from __future__ import annotations

import re

ANSWER_FORMATS = ("auto", "boxed", "dapo")
# Longest answer taken from a response; a longer one is treated as no answer (it is never a real final
# answer, and it would only feed the grader a huge expression).
MAX_ANSWER_CHARS = 10_000

# `\boxed{`, `\boxed {`, `\fbox{`, and the brace-less `\boxed 5` form. The negative look-ahead keeps
# `\boxedfoo` (another macro) from matching.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Only backslash escapes and braces matter when balancing: `\{`, `\}` and `\\` are skipped as pairs.
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
# "Answer:" anywhere on a line (DAPO asks for a last line "Answer: $Answer"; models also write
# "Final Answer:", "**Answer:**"). `[ \t]*` (not `\s*`) keeps the match on one line.
_ANSWER_RE = re.compile(r"\banswer[ \t]*:", re.IGNORECASE)
_BLANKS_RE = re.compile(r"[ \t]*")
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


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
    # A real answer is short; giving up after MAX_ANSWER_CHARS bounds the cost of a runaway box.
    for m in _BRACE_RE.finditer(text, i, min(n, i + MAX_ANSWER_CHARS + 2)):
        tok = m.group(0)
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : m.start()].strip()
                return content or None
    return None  # unbalanced (the box never closes) or longer than MAX_ANSWER_CHARS


def _strip_wrappers(ans: str) -> str:
    ans = ans.strip().strip("*").strip()  # markdown bold around the answer
    changed = True
    while changed and ans:
        changed = False
        if ans.endswith("."):
            ans = ans[:-1].rstrip()
            changed = True
        for left, right in _WRAPPERS:
            if len(ans) >= len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
                inner = ans[len(left) : len(ans) - len(right)]
                if right in inner:  # "$x$ and $y$" is two formulas, not one wrapped answer
                    continue
                ans = inner.strip()
                changed = True
                break
    return ans


def dapo_answer(text: str) -> str | None:
    """The text after ``Answer:`` on the last line that has one (DAPO-Math's ``Answer: $Answer``).

    Surrounding ``$...$`` / ``$$...$$`` / ``\\(...\\)`` / ``\\[...\\]``, markdown ``**`` and a trailing
    period are removed; an answer written as ``\\boxed{x}`` on that line gives ``x``.
    """
    last = None
    for last in _ANSWER_RE.finditer(text):
        pass
    if last is None:
        return None
    end = text.find("\n", last.end())
    line = text[last.end() : end if end >= 0 else len(text)]
    if len(line) > MAX_ANSWER_CHARS:
        return None
    ans = _strip_wrappers(line)
    if ans.startswith(("\\boxed", "\\fbox")):
        boxed = last_boxed(ans)
        if boxed is not None:
            ans = boxed
    return ans or None


def extract_answer(text: str, answer_format: str = "auto") -> str | None:
    """The final answer of a response as a LaTeX/plain string, or None when there is none.

    answer_format:
      "boxed" -- content of the last ``\\boxed{}`` / ``\\fbox{}`` (braces balanced);
      "dapo"  -- the last ``Answer: x`` line (DAPO-Math prompt style);
      "auto"  -- "boxed" when the response has a complete ``\\boxed{}``, else "dapo".
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r}: allowed values are {', '.join(ANSWER_FORMATS)}")
    if not text:
        return None
    if answer_format == "boxed":
        return last_boxed(text)
    if answer_format == "dapo":
        return dapo_answer(text)
    boxed = last_boxed(text)
    return boxed if boxed is not None else dapo_answer(text)
