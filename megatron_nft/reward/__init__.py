"""Rewards for verifiable math: final-answer extraction and grading in a process pool.

    from megatron_nft.reward import score_batch, apply_truncation
    scores = apply_truncation(score_batch(responses, golds), [f == "length" for f in finish_reasons])

Importing this package is cheap (no torch, no sympy); math-verify loads in the grading workers.
"""

from megatron_nft.reward.extract import ANSWER_FORMATS, MAX_ANSWER_CHARS, extract_answer
from megatron_nft.reward.grading import (
    GradingPool,
    GradingPoolBroken,
    apply_truncation,
    get_grader,
    grader_names,
    math_verify_grader,
    register_grader,
    score_batch,
)
from megatron_nft.reward.shaping import overlong_penalty, shape_overlong
from megatron_nft.reward import qwen_grader as _qwen_grader  # noqa: F401 -- registers grader="qwen_math"

__all__ = [
    "ANSWER_FORMATS",
    "MAX_ANSWER_CHARS",
    "GradingPool",
    "GradingPoolBroken",
    "apply_truncation",
    "extract_answer",
    "get_grader",
    "grader_names",
    "math_verify_grader",
    "overlong_penalty",
    "register_grader",
    "score_batch",
    "shape_overlong",
]
