"""Typed statistics records: every field declares how it reduces, so that the actor (over micro-batches
and data-parallel ranks) and the trainer (over a rollout's optimizer steps) combine them from the
declaration instead of lists of names.

A field reduces by one of:
  sum   added up (token counts, the loss of a minibatch: additive over any split of its rows);
  mean  the mean over the count field ``over``: combined as Σ sum / max(Σ count, 1), where a record's
        sum is its field ``of`` when it carries one (exact), else value x count;
  min / max.
``log=True`` marks the fields logged as ``actor/<name>`` metrics; ``step=True`` the fields an optimizer
step sets once (grad norm, learning rate) rather than each micro-batch. Over a rollout's optimizer steps
min / max fields take the min / max and every other logged field the mean over steps (each step's
value is already its minibatch's total or mean). Pure torch, no Megatron.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import Tensor

REDUCTIONS = ("sum", "mean", "min", "max")


@dataclass(frozen=True)
class Reduction:
    how: str
    over: str | None = None
    of: str | None = None
    log: bool = False
    step: bool = False


def stat(how: str, *, over: str | None = None, of: str | None = None, log: bool = False, step: bool = False):
    """A statistics field reducing by `how` (see the module docstring)."""
    if how not in REDUCTIONS:
        raise ValueError(f"a statistic reduces by one of {', '.join(REDUCTIONS)}; got {how!r}")
    if (how == "mean") != (over is not None or step) or (of is not None and how != "mean"):
        raise ValueError("a mean statistic names its count (over=...); only a mean names its sum (of=...)")
    return field(default=None, metadata={"reduction": Reduction(how, over, of, log, step)})


@dataclass
class Stats:
    """Base of the statistics records (dataclasses of 0-dim tensors, or floats once reduced)."""

    @classmethod
    def reductions(cls) -> dict[str, Reduction]:
        return {f.name: f.metadata["reduction"] for f in dataclasses.fields(cls)}

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class LossStats(Stats):
    """What a policy loss reports about one (micro-)batch; fields an algorithm has no use for are 0."""

    loss: Tensor = stat("sum", log=True)  # the returned loss (additive over row splits with token_sum_norm)
    num_tokens: Tensor = stat("sum")  # tokens with mask > 0
    pos_tokens: Tensor = stat("sum")  # of those, tokens of responses with r > 0.5
    neg_tokens: Tensor = stat("sum")  # of those, tokens of responses with r <= 0.5
    ratio_mean: Tensor = stat("mean", over="num_tokens", log=True)  # R = π_θ / π_old per token
    ratio_min: Tensor = stat("min", log=True)  # +inf when there are no tokens (the identity of min)
    ratio_max: Tensor = stat("max", log=True)  # -inf when there are no tokens
    neg_floor_tokens: Tensor = stat("sum")  # NFT: negative tokens at the ε floor
    neg_floor_frac: Tensor = stat("mean", over="neg_tokens", of="neg_floor_tokens", log=True)
    clip_tokens: Tensor = stat("sum")  # GRPO family: tokens where the PPO clip is active
    clip_frac: Tensor = stat("mean", over="num_tokens", of="clip_tokens", log=True)
    adv_mean: Tensor = stat("mean", over="num_tokens")  # GRPO family: the advantage per token
    num_groups: Tensor = stat("sum")  # group losses (InfoNCA): groups with a valid token


@dataclass
class StepStats(LossStats):
    """What one optimizer step reports: its micro-batches' loss stats reduced, the entropy of its
    tokens, and the step's own values."""

    entropy_sum: Tensor = stat("sum")
    entropy: Tensor = stat("mean", over="num_tokens", of="entropy_sum", log=True)
    grad_norm: float = stat("mean", step=True, log=True)
    lr: float = stat("mean", step=True, log=True)


def token_stats(loss: Tensor, ratio: Tensor, valid: Tensor, pos: Tensor, neg: Tensor, **extra: Tensor) -> dict:
    """The token fields of a LossStats for per-token ratios ``ratio`` [B, T] over ``valid`` tokens, as
    0-dim detached tensors; ``extra`` sets the algorithm's own fields (counts; their fractions follow),
    the others are 0."""
    dtype = ratio.dtype
    zero = torch.zeros((), dtype=dtype, device=ratio.device)
    with torch.no_grad():
        num = valid.sum().to(dtype)
        num_neg = neg.sum().to(dtype)
        ratio_d = ratio.detach()
        if ratio_d.numel():
            ratio_min = ratio_d.masked_fill(~valid, math.inf).amin()
            ratio_max = ratio_d.masked_fill(~valid, -math.inf).amax()
        else:
            ratio_min, ratio_max = zero + math.inf, zero - math.inf
        neg_floor_tokens = extra.get("neg_floor_tokens", zero)
        clip_tokens = extra.get("clip_tokens", zero)
        return {
            "loss": loss.detach().clone(),
            "num_tokens": num,
            "pos_tokens": pos.sum().to(dtype),
            "neg_tokens": num_neg,
            "ratio_mean": (ratio_d * valid).sum() / num.clamp_min(1.0),
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "neg_floor_tokens": neg_floor_tokens,
            "neg_floor_frac": neg_floor_tokens / num_neg.clamp_min(1.0),
            "clip_tokens": clip_tokens,
            "clip_frac": clip_tokens / num.clamp_min(1.0),
            "adv_mean": extra.get("adv_sum", zero) / num.clamp_min(1.0),
            "num_groups": extra.get("num_groups", zero),
        }


class MicroBatchReduction:
    """The reduction of a record type's micro-batch fields over micro-batches and ranks, as two float64
    vectors: one summed (sum fields and the sums behind the means), one maxed (max fields, and min
    fields negated). Reduce the vectors over ranks with SUM / MAX, then ``finish`` them."""

    def __init__(self, record: type[Stats]):
        self.reductions = {k: r for k, r in record.reductions().items() if not r.step}
        self.sum_keys = [k for k, r in self.reductions.items() if r.how == "sum"]
        self.sum_keys += [f"{k}*{r.over}" for k, r in self.reductions.items() if r.how == "mean" and r.of is None]
        self.max_keys = [k for k, r in self.reductions.items() if r.how in ("min", "max")]

    def local(self, records: Iterable[Mapping[str, Tensor]], device=None) -> tuple[Tensor, Tensor]:
        sums = torch.zeros(len(self.sum_keys), dtype=torch.float64, device=device)
        maxima = torch.full((len(self.max_keys),), -math.inf, dtype=torch.float64, device=device)
        for record in records:
            for i, key in enumerate(self.sum_keys):
                name, _, over = key.partition("*")
                # the product in the record's own precision, as the mean was computed
                sums[i] += (record[name] * record[over] if over else record[name]).double()
            for i, key in enumerate(self.max_keys):
                value = record[key] if self.reductions[key].how == "max" else -record[key]
                maxima[i] = torch.maximum(maxima[i], value.double())
        return sums, maxima

    def finish(self, sums: Tensor, maxima: Tensor) -> dict[str, float]:
        total = dict(zip(self.sum_keys, sums.tolist()))
        top = dict(zip(self.max_keys, maxima.tolist()))
        out = {}
        for k, r in self.reductions.items():
            if r.how == "sum":
                out[k] = total[k]
            elif r.how == "mean":
                out[k] = total[r.of or f"{k}*{r.over}"] / max(total[r.over], 1.0)
            else:
                out[k] = top[k] if r.how == "max" else -top[k]
        return out


def average_steps(record: type[Stats], steps: list[Mapping[str, float]]) -> dict[str, float]:
    """The logged fields of a rollout's optimizer steps combined: min / max over the steps, every
    other field the mean over steps."""
    out = {}
    for k, r in record.reductions().items():
        if not r.log:
            continue
        values = [s[k] for s in steps]
        out[k] = min(values) if r.how == "min" else max(values) if r.how == "max" else sum(values) / len(values)
    return out
