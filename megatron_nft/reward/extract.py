"""Final-answer extraction from a model response: DAPO's ``Answer: ...`` line and LaTeX ``\\boxed{...}``.

Everything here is linear in the length of the response (regex scans and one brace walk, no
backtracking over the whole text), so a 10^6-character runaway generation costs milliseconds.
Pure Python, no third-party imports: the trainer process and the grading workers both use it.
"""

from __future__ import annotations

import re

from megatron_nft.data.latex import MAX_BOXED_CHARS, last_boxed

ANSWER_FORMATS = ("auto", "boxed", "dapo")
# Longest answer taken from a response; a longer one is treated as no answer (it is never a real final
# answer, and it would only feed the grader a huge expression). last_boxed applies the same bound.
MAX_ANSWER_CHARS = MAX_BOXED_CHARS

# "Answer:" anywhere on a line (DAPO asks for a last line "Answer: $Answer"; models also write
# "Final Answer:", "**Answer:**"). `[ \t]*` (not `\s*`) keeps the match on one line.
_ANSWER_RE = re.compile(r"\banswer[ \t]*:", re.IGNORECASE)
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


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
