"""The rollout engine interface: what the trainer asks of any generator (local CPU engine, SGLang).

Field names follow SGLang's native API so that the HTTP backend is a thin translation:
`POST /generate` takes `input_ids`, `sampling_params` {temperature, top_p, max_new_tokens,
stop_token_ids, n} and `return_logprob`; its `meta_info.finish_reason.type` is "stop" or "length"
and its output log-probs are those of the temperature-scaled distribution before top-p truncation.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Iterable

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (SGLang's `sampling_params` names).

    temperature: > 0; the sampling distribution is softmax(logits / temperature).
    top_p: nucleus sampling, 0 < top_p <= 1 (1 disables it; a tiny value is greedy decoding).
    max_new_tokens: at most this many generated tokens per completion (>= 1).
    stop_token_ids: generation of a row ends after it emits one of these (the token is kept).
    n: completions per prompt (>= 1).
    seed: seeds this request's sampling; None uses (and advances) the engine's own generator.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if not (_is_number(t) and math.isfinite(t) and t > 0):
            raise ValueError(f"SamplingParams.temperature must be a finite number > 0, got {t!r}")
        if not (_is_number(p) and 0 < p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {p!r}")
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (_is_int(self.n) and self.n >= 1):
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        stop = _as_tuple(self.stop_token_ids)
        if stop is None or not all(_is_int(x) and x >= 0 for x in stop):
            raise ValueError(
                f"SamplingParams.stop_token_ids must be a sequence of token ids >= 0, got {self.stop_token_ids!r}"
            )
        object.__setattr__(self, "stop_token_ids", tuple(int(x) for x in stop))  # lists accepted; the dataclass stays hashable
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")

    def to_sglang(self) -> dict:
        """The `sampling_params` object of SGLang's /generate (seed travels as `sampling_seed`)."""
        out = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "stop_token_ids": list(self.stop_token_ids),
            "n": self.n,
        }
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy integers too


def _as_tuple(x) -> tuple | None:
    if isinstance(x, (str, bytes)):
        return None
    try:
        return tuple(x)
    except TypeError:
        return None


@dataclass
class Completion:
    """One generated answer.

    prompt_index: index of its prompt in the `prompts` list given to `generate`.
    token_ids: the generated tokens only (no prompt); ends with the stop token when finish_reason is "stop".
    logprobs: logprobs[i] = log softmax(logits / temperature)[token_ids[i]], the full temperature-scaled
        distribution before top-p truncation (SGLang's convention), one per token.
    finish_reason: "stop" (a stop token was produced) or "length" (max_new_tokens reached).
    weight_version: the engine's weight version that produced every token of it.
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    weight_version: int


class RolloutEngine(abc.ABC):
    """A generator serving the actor's current policy.

    `generate` returns `params.n` completions per prompt, grouped contiguously in prompt order
    (prompt 0's n, then prompt 1's n, ...). `update_weights` receives the actor's weights as a stream
    of (Hugging Face name, tensor) pairs, every parameter exactly once, and stamps them with `version`.
    """

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    @property
    @abc.abstractmethod
    def weight_version(self) -> int: ...

    def close(self) -> None:
        """Releases the engine's resources; the default has none."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
