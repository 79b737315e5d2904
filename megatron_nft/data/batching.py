"""(prompt, response) pairs -> the right-padded token batch the actor consumes (see actor.py), and the
packing of such rows into THD (packed-sequence) micro-batches."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

from megatron_nft.errors import ConfigError


def pack_rows(prompts: list[list[int]], responses: list[list[int]], *, pad_id: int = 0, extra: dict | None = None) -> dict:
    """tokens [B, S] = prompt + response + padding; loss_mask [B, S] = 1 where the label (the next
    token) belongs to the response. `extra` per-row lists become tensors; per-token lists in `extra`
    whose key ends in `_logprobs` are aligned like the labels (position t scores token t+1)."""
    rows = len(prompts)
    seq = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((rows, seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((rows, seq), dtype=torch.float32)
    aligned = {k: torch.zeros((rows, seq), dtype=torch.float32) for k in (extra or {}) if k.endswith("_logprobs")}
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        start, end = len(p) - 1, len(p) + len(r) - 1
        loss_mask[i, start:end] = 1.0
        for key in aligned:
            aligned[key][i, start:end] = torch.tensor(extra[key][i], dtype=torch.float32)
    batch = {"tokens": tokens, "loss_mask": loss_mask, **aligned}
    for key, values in (extra or {}).items():
        if key not in aligned:
            batch[key] = torch.tensor(values, dtype=torch.float32)
    return batch


def select_rows(batch: dict, index) -> dict:
    return {k: v[index] for k, v in batch.items()}


def pad_width(batch: dict, align: int) -> dict:
    """The [B, S] tensors of a right-padded batch widened with zeros to a multiple of `align` columns
    ([B] tensors unchanged). The new columns come after every real token and have loss_mask 0, so
    under causal attention they change nothing the loss or the log-probs read."""
    width = batch["tokens"].shape[1]
    extra = -width % align
    if not extra:
        return batch
    return {k: torch.nn.functional.pad(v, (0, extra)) if v.dim() == 2 else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Packed (THD) micro-batches: whole rows laid end to end, by a token budget, balanced over DP ranks
# --------------------------------------------------------------------------------------------------


def sequence_alignment(*, tp: int = 1, cp: int = 1, fp8: bool = False, blockwise: bool = False,
                       sequence_parallel: bool = False) -> int:
    """The multiple every packed sequence's length (and a right-padded row's width) is padded to.

    - Context parallel cuts each sequence into 2*cp equal chunks (rank r holds chunks r and
      2*cp-1-r, see data/context_parallel.py), and with sequence parallel each rank's share is cut
      again over TP: tp * cp * 2 when cp > 1.
    - Without CP, sequence parallel cuts the packed stream over TP: tp.
    - FP8 GEMMs (Transformer Engine) need every rank's token count to be a multiple of 16, and the
      blockwise recipe quantises in 128-token blocks. A rank holds 1/cp of each sequence, and under
      sequence parallel 1/tp of that, so a sequence of a multiple of cp * block tokens (cp * tp *
      block under sequence parallel) leaves every rank whole blocks; combined with the rules above
      by lcm. (lcm(tp * cp * 2, block), the rule before, leaves 4 tokens per rank at cp = 4.)"""
    align = tp * cp * 2 if cp > 1 else tp
    if not fp8:
        return align
    return math.lcm(align, cp * (tp if sequence_parallel else 1) * (128 if blockwise else 16))


def needed_lengths(loss_mask: torch.Tensor) -> list[int]:
    """Per row, the tokens a forward needs: up to the token after the last loss-mask position (its
    label). A row with no loss position keeps one token (it still occupies its place in the batch)."""
    rows, seq = loss_mask.shape
    positions = torch.arange(1, seq + 1).expand(rows, seq)
    last = torch.where(loss_mask > 0, positions, torch.zeros_like(positions)).amax(dim=1)
    return [min(int(n) + 1, seq) if n > 0 else 1 for n in last]


@dataclass(frozen=True)
class PackedMicroBatch:
    """Whole rows of a right-padded [B, S] batch laid end to end as one THD token stream.

    Sequence i is batch row `rows[i]`; its first `lengths[i]` tokens are real and it occupies
    `padded_lengths[i]` stream slots. The padding sits after the real tokens, so under causal
    attention it never changes them. `total_tokens` >= sum(padded_lengths): any excess is a trailing
    padding segment (pipeline stages need one stream length for all micro-batches)."""

    rows: tuple[int, ...]
    lengths: tuple[int, ...]
    padded_lengths: tuple[int, ...]
    total_tokens: int

    def __post_init__(self):
        if self.total_tokens < sum(self.padded_lengths):
            raise ValueError(f"total_tokens={self.total_tokens} < {sum(self.padded_lengths)} packed slots")

    def padded_to(self, total_tokens: int) -> "PackedMicroBatch":
        return dataclasses.replace(self, total_tokens=total_tokens)

    def segment_lengths(self) -> list[int]:
        """Stream segments: the padded sequences, then the trailing padding segment if any."""
        tail = self.total_tokens - sum(self.padded_lengths)
        return list(self.padded_lengths) + ([tail] if tail else [])

    def cu_seqlens(self, device=None) -> torch.Tensor:
        """Segment boundaries [n + 1] (int32, as PackedSeqParams and Transformer Engine expect)."""
        bounds = [0] + list(itertools.accumulate(self.segment_lengths()))
        return torch.tensor(bounds, dtype=torch.int32, device=device)

    def max_seqlen(self) -> int:
        return max(self.segment_lengths())

    def positions(self) -> torch.Tensor:
        """[T] position of each stream slot within its own segment (RoPE restarts per sequence)."""
        return torch.cat([torch.arange(n) for n in self.segment_lengths()])

    def _index(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream slot, flat [rows, S] index) of every real token."""
        starts = itertools.accumulate([0] + list(self.padded_lengths[:-1]))
        slots, flat = [], []
        for i, (start, n) in enumerate(zip(starts, self.lengths)):
            slots.append(torch.arange(start, start + n))
            flat.append(torch.arange(i * seq_len, i * seq_len + n))
        return torch.cat(slots), torch.cat(flat)

    def pack(self, rows: torch.Tensor, fill=0) -> torch.Tensor:
        """[n, S] per-row values (row i = sequence i) -> [T] stream; padding slots get `fill`."""
        slots, flat = self._index(rows.shape[1])
        stream = torch.full((self.total_tokens,), fill, dtype=rows.dtype, device=rows.device)
        stream[slots.to(rows.device)] = rows.reshape(-1)[flat.to(rows.device)]
        return stream

    def unpack(self, stream: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[..., T] per-slot values -> [..., n, S], zero outside each row's real tokens; differentiable."""
        slots, flat = (i.to(stream.device) for i in self._index(seq_len))
        lead = stream.shape[:-1]
        out = stream.new_zeros((*lead, len(self.rows) * seq_len))
        out = out.index_copy(-1, flat, stream.index_select(-1, slots))
        return out.view(*lead, len(self.rows), seq_len)


def plan_packing(
    lengths: list[int], *, max_tokens: int, dp: int = 1, align: int = 1, group_size: int = 1
) -> list[list[PackedMicroBatch]]:
    """Packs rows of the given token lengths into THD micro-batches: result[dp_rank] is that rank's list.

    Rows stay whole, and so do units of `group_size` consecutive rows (a loss that contrasts a
    prompt's answers needs them in one micro-batch). Each row is padded to a multiple of `align`
    (see sequence_alignment). Balance: units, longest first, go to the data-parallel rank with the
    fewest tokens so far (greedy LPT: the ranks' totals differ by at most the longest unit); within
    a rank, first-fit decreasing into micro-batches of at most `max_tokens` (no two micro-batches end
    up half empty). Needs at least `dp` units, so that every rank has work."""
    if max_tokens < 1 or dp < 1 or align < 1 or group_size < 1:
        raise ValueError(f"max_tokens={max_tokens}, dp={dp}, align={align}, group_size={group_size}: expected >= 1")
    if len(lengths) % group_size:
        raise ValueError(f"{len(lengths)} rows are not whole groups of group_size={group_size}")
    padded = [-(-n // align) * align for n in lengths]
    units = [list(range(u, u + group_size)) for u in range(0, len(lengths), group_size)]
    if len(units) < dp:
        raise ValueError(f"{len(units)} units of {group_size} rows cannot feed dp={dp} data-parallel ranks")
    size = [sum(padded[r] for r in unit) for unit in units]
    for unit, tokens in zip(units, size):
        if tokens > max_tokens:
            what = f"row {unit[0]}" if group_size == 1 else f"the group of rows {unit[0]}..{unit[-1]}"
            raise ConfigError(
                f"parallel.max_tokens_per_micro_batch={max_tokens}: {what} needs {tokens} tokens "
                f"(each row padded to a multiple of {align}); raise the budget"
            )
    longest_first = sorted(range(len(units)), key=lambda u: (-size[u], u))
    per_rank: list[list[int]] = [[] for _ in range(dp)]
    load = [0] * dp
    for u in longest_first:
        rank = min(range(dp), key=lambda r: (load[r], r))
        per_rank[rank].append(u)
        load[rank] += size[u]
    plan = []
    for units_of_rank in per_rank:
        bins: list[list[int]] = []
        fill: list[int] = []
        for u in units_of_rank:  # already longest first
            b = next((i for i, used in enumerate(fill) if used + size[u] <= max_tokens), None)
            if b is None:
                bins.append([])
                fill.append(0)
                b = len(bins) - 1
            bins[b].append(u)
            fill[b] += size[u]
        plan.append(
            [
                PackedMicroBatch(
                    rows=tuple(r for u in b for r in units[u]),
                    lengths=tuple(lengths[r] for u in b for r in units[u]),
                    padded_lengths=tuple(padded[r] for u in b for r in units[u]),
                    total_tokens=used,
                )
                for b, used in zip(bins, fill)
            ]
        )
    return plan
