"""The synthetic task of the CPU demo: small-integer arithmetic, "What is 23 + 17?" -> "40".

A ~1M-parameter transformer gets a few of these right after a short supervised warm-up on
`reference_response` texts and more after RL, which is what the demo needs (NFT learns only from
groups that are neither all right nor all wrong). Difficulty is set by `max_operand` and `ops`.

Problems are drawn without replacement from the finite space of distinct problems, so a draw has no
duplicates until that space is exhausted; beyond it the draw continues with fresh shuffles of the
space (every problem appears k or k+1 times). Each op contributes all its operand pairs in
[min_operand, max_operand]; "-" keeps the result non-negative unless `allow_negative=True`.
"""

from __future__ import annotations

import math
import random

OPS = ("+", "-", "*")
ANSWER_FORMATS = ("dapo", "boxed")


class _Space:
    """The distinct problems, indexed 0..size-1 without materialising them (max_operand may be large)."""

    def __init__(self, max_operand: int, ops, min_operand: int, allow_negative: bool):
        if isinstance(ops, str):
            ops = (ops,)
        ops = tuple(ops)
        if not ops:
            raise ValueError(f"ops is empty; expected a non-empty subset of {OPS}")
        for op in ops:
            if op not in OPS:
                raise ValueError(f"unknown arithmetic op {op!r}; expected some of {OPS}")
        if len(set(ops)) != len(ops):
            raise ValueError(f"ops {ops} repeats an op")
        if not (isinstance(min_operand, int) and isinstance(max_operand, int)) or not 0 <= min_operand <= max_operand:
            raise ValueError(f"operands must satisfy 0 <= min_operand <= max_operand; got {min_operand}, {max_operand}")
        self.lo, self.width = min_operand, max_operand - min_operand + 1
        self.allow_negative = allow_negative
        self.blocks = []  # (op, first index, size)
        start = 0
        for op in ops:
            triangular = op == "-" and not allow_negative
            size = self.width * (self.width + 1) // 2 if triangular else self.width**2
            self.blocks.append((op, start, size, triangular))
            start += size
        self.size = start

    def problem(self, index: int) -> dict:
        for op, start, size, triangular in self.blocks:
            if index < start + size:
                k = index - start
                if triangular:  # k enumerates pairs (i, j) with j <= i, i.e. a >= b
                    i = (math.isqrt(8 * k + 1) - 1) // 2
                    j = k - i * (i + 1) // 2
                else:
                    i, j = divmod(k, self.width)
                a, b = self.lo + i, self.lo + j
                value = a + b if op == "+" else a - b if op == "-" else a * b
                return {"problem": f"What is {a} {op} {b}?", "answer": str(value)}
        raise IndexError(index)

    def draw(self, rng: random.Random, n: int, exclude: frozenset = frozenset()) -> list[int]:
        """n indices outside `exclude`: a random sample without replacement, then, once the space
        (less `exclude`) is used up, further independent shuffles of it."""
        available = self.size - len(exclude)
        if n <= 0:
            return []
        if available <= 0:
            raise ValueError("no arithmetic problems are left outside the held-out set; raise max_operand or add ops")
        if n <= available and not exclude:
            return rng.sample(range(self.size), n)
        if n <= available and n + len(exclude) <= self.size // 2:
            # sparse: rejection sampling costs little and avoids enumerating the space
            out, seen = [], set(exclude)
            while len(out) < n:
                k = rng.randrange(self.size)
                if k not in seen:
                    seen.add(k)
                    out.append(k)
            return out
        pool = [k for k in range(self.size) if k not in exclude]
        out = []
        while len(out) < n:
            out.extend(rng.sample(pool, len(pool)))
        return out[:n]


def make_arithmetic_problems(
    n: int,
    seed: int,
    *,
    max_operand: int = 30,
    ops=("+",),
    min_operand: int = 0,
    allow_negative: bool = False,
) -> list[dict]:
    """n problems {"problem": "What is a op b?", "answer": "c"}, the same for the same arguments;
    distinct while n does not exceed the number of distinct problems."""
    space = _Space(max_operand, ops, min_operand, allow_negative)
    rng = random.Random(f"arithmetic:{seed}")
    return [space.problem(k) for k in space.draw(rng, n)]


def arithmetic_splits(
    n_train: int,
    n_eval: int,
    seed: int,
    *,
    max_operand: int = 30,
    ops=("+",),
    min_operand: int = 0,
    allow_negative: bool = False,
) -> tuple[list[dict], list[dict]]:
    """(train, held_out): `n_eval` distinct held-out problems, and `n_train` training problems none of
    which is a held-out one. When n_train exceeds the distinct problems left, the training list
    repeats them (each as evenly as possible) rather than shrinking: e.g. max_operand=50, "+" has
    51*51 = 2601 problems, so n_train=4000 with n_eval=200 repeats the other 2401."""
    space = _Space(max_operand, ops, min_operand, allow_negative)
    if n_eval >= space.size:
        raise ValueError(
            f"n_eval={n_eval} leaves no training problems: there are only {space.size} distinct problems "
            f"for max_operand={max_operand}, ops={tuple(ops)}"
        )
    rng = random.Random(f"arithmetic-splits:{seed}")
    held_out = rng.sample(range(space.size), n_eval) if n_eval > 0 else []
    train = space.draw(rng, n_train, exclude=frozenset(held_out))
    return [space.problem(k) for k in train], [space.problem(k) for k in held_out]


def reference_response(answer: str, answer_format: str = "dapo") -> str:
    """The short response the supervised warm-up teaches, in the form the verifier reads:
    "Answer: 42" (dapo) or "\\boxed{42}" (boxed). No reasoning: the demo generates ~8-16 tokens."""
    if answer_format == "dapo":
        return f"Answer: {answer}"
    if answer_format == "boxed":
        return f"\\boxed{{{answer}}}"
    raise ValueError(f"unknown answer_format {answer_format!r}; expected one of: {', '.join(ANSWER_FORMATS)}")
