"""DAPO's over-long reward shaping ("soft over-long punishment", DAPO paper eq. 13).

With L_max = the response budget (rollout.max_new_tokens) and a buffer of L_cache tokens before it, an
answer of |y| tokens gets, on top of its correctness reward:

    0                                   |y| <= L_max - L_cache
    -factor · (|y| - (L_max - L_cache)) / L_cache   L_max - L_cache < |y| <= L_max
    -factor                             |y| > L_max (cannot happen here: generation stops at L_max)

so answers drift away from the truncation cliff before they fall off it. Pure python.
"""

from __future__ import annotations

from typing import Sequence


def overlong_penalty(length: int, *, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """The (non-positive) penalty of one answer of `length` tokens; buffer = 0 disables it."""
    if buffer < 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [0, max_len={max_len}]; got {buffer}")
    if factor < 0:
        raise ValueError(f"overlong penalty factor must be >= 0; got {factor}")
    if buffer == 0:
        return 0.0
    excess = length - (max_len - buffer)
    return -factor * min(max(excess, 0) / buffer, 1.0)


def shape_overlong(
    scores: Sequence[float], lengths: Sequence[int], *, max_len: int, buffer: int, factor: float = 1.0
) -> list[float]:
    """Correctness scores plus the over-long penalty of each answer's length."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths")
    return [float(s) + overlong_penalty(n, max_len=max_len, buffer=buffer, factor=factor) for s, n in zip(scores, lengths)]
