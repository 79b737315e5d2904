"""How the actor cuts a global batch into this data-parallel rank's micro-batches.

Two plans, chosen by `max_tokens`:
  - padded (None): rows padded to a multiple of dp x micro_batch_size (padding rows have loss_mask 0),
    this rank's contiguous slice, micro_batch_size rows at a time; columns padded to `align`;
  - packed: whole rows (whole groups of `group_size` rows) packed into THD micro-batches of at most
    `max_tokens` tokens, balanced over data-parallel ranks (data.batching.plan_packing), each carrying
    the model's stream under "packed" (model.packed_stream) beside its rows' ordinary [n, S] tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from megatron_nft.data.batching import needed_lengths, pad_width, plan_packing, sequence_alignment


def alignment(*, tp: int, cp: int, fp8: str | None, fp8_recipe: str, sequence_parallel: bool) -> int:
    """The multiple packed sequences and padded rows are padded to for a layout and its FP8 setting
    (TP x CP zigzag; under FP8, whole GEMM blocks on every rank: data.batching.sequence_alignment)."""
    return sequence_alignment(tp=tp, cp=cp, fp8=fp8 is not None, blockwise=fp8_recipe == "blockwise",
                              sequence_parallel=sequence_parallel)


class MicroBatches(NamedTuple):
    micro: list[dict]  # this rank's micro-batches, tensors on the plan's device
    rows: int  # the global batch's row count after padding (>= its rows)

    @property
    def packed(self) -> bool:
        return bool(self.micro) and "packed" in self.micro[0]


@dataclass(frozen=True)
class LocalRows:
    """This data-parallel rank's rows of a minibatch it does not hold whole (batch_shards): `batch`
    holds them ([n] / [n, S] tensors, S the whole batch's width), `positions[i]` is row i's index in
    the minibatch, and `lengths` are the needed lengths of every row of the minibatch (what the
    packed plan balances on), so that every rank cuts the same plan."""

    batch: dict
    positions: Sequence[int]
    lengths: Sequence[int]


@dataclass(frozen=True)
class MicroBatchPlan:
    dp: int = 1
    dp_rank: int = 0
    micro_batch_size: int = 8
    max_tokens: int | None = None  # None: padded rows; else packed micro-batches of at most this many tokens
    align: int = 1
    pp: int = 1
    cp_group: object = None  # the context-parallel group when cp > 1 (packed streams are split over it)
    device: torch.device | str = "cpu"

    @property
    def packed(self) -> bool:
        return self.max_tokens is not None

    def padded_rows(self, rows: int) -> int:
        """Rows of the padded plan: a multiple of dp x micro_batch_size."""
        unit = self.dp * self.micro_batch_size
        return -(-rows // unit) * unit

    def split(self, batch: dict, *, group_size: int | None = None) -> MicroBatches:
        """This rank's micro-batches of the global `batch` (every tensor [B] or [B, S], B rows).

        `group_size`: keep units of that many consecutive rows in one micro-batch (packed plan; the
        padded plan keeps them whole when micro_batch_size is a multiple of it, see groups_fit).
        Columns are padded to `align` (FP8 GEMMs need token counts in whole blocks); outputs keep the
        padded width."""
        if self.packed:
            return self._packed(batch, group_size=group_size or 1)
        batch = pad_width(batch, self.align)
        rows = batch["tokens"].shape[0]
        total = self.padded_rows(rows)
        per_rank = total // self.dp
        mine = {}
        for key, value in batch.items():
            if total > rows:
                filler = torch.zeros((total - rows, *value.shape[1:]), dtype=value.dtype)
                value = torch.cat([value, filler])
            mine[key] = value[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        micro = [
            {k: v[i : i + self.micro_batch_size].to(self.device) for k, v in mine.items()}
            for i in range(0, per_rank, self.micro_batch_size)
        ]
        return MicroBatches(micro, total)

    def split_local(self, local: LocalRows, *, group_size: int | None = None) -> MicroBatches:
        """`split`'s micro-batches for this rank of a minibatch of which it holds only `local`: the
        same rows in the same places, zero rows where `split` adds them (equal, tensor for tensor, to
        `split` of the whole minibatch). A row the plan gives this rank that `local` lacks is an error."""
        rows = len(local.lengths)
        index_of = {p: i for i, p in enumerate(local.positions)}
        zero = len(index_of)  # the zero row appended below
        batch = {k: torch.cat([v, torch.zeros((1, *v.shape[1:]), dtype=v.dtype)]) for k, v in local.batch.items()}

        def index(positions) -> torch.Tensor:
            missing = [p for p in positions if p < rows and p not in index_of]
            if missing:
                raise ValueError(f"split_local: data-parallel rank {self.dp_rank} trains on rows {missing[:8]} of the "
                                 f"minibatch, which it was not sent")
            return torch.tensor([index_of.get(p, zero) if p < rows else zero for p in positions], dtype=torch.long)

        if self.packed:
            group_size = group_size or 1
            total = max(-(-rows // group_size), self.dp) * group_size
            plan = plan_packing(list(local.lengths) + [1] * (total - rows), max_tokens=self.max_tokens, dp=self.dp,
                                align=self.align, group_size=group_size)[self.dp_rank]
            return MicroBatches(self._packed_micro(batch, plan, index), total)
        batch = pad_width(batch, self.align)
        total = self.padded_rows(rows)
        per_rank = total // self.dp
        mine = index(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        micro = [{k: v[mine[i : i + self.micro_batch_size]].to(self.device) for k, v in batch.items()}
                 for i in range(0, per_rank, self.micro_batch_size)]
        return MicroBatches(micro, total)

    def _packed_micro(self, batch: dict, plan: list, index) -> list[dict]:
        """The micro-batches of a rank's packing `plan`; `index(rows)` -> their indices in `batch`."""
        from megatron_nft.model.packed_stream import build_stream

        if self.pp > 1:
            # pipeline stages exchange activations of one fixed shape: pad every stream to the longest
            longest = max(m.total_tokens for m in plan)
            plan = [m.padded_to(longest) for m in plan]
        micro = []
        for packed in plan:
            rows = index(packed.rows)
            mb = {k: v[rows].to(self.device) for k, v in batch.items()}
            mb["packed"] = build_stream(packed, batch["tokens"][rows], cp_group=self.cp_group, device=self.device)
            micro.append(mb)
        return micro

    def _packed(self, batch: dict, *, group_size: int) -> MicroBatches:
        """Row lengths come from loss_mask when given (tokens past the last scored label are not
        needed), else the full width S. While there are fewer units than data-parallel ranks, zero rows
        are added, as the padded plan does."""
        rows, seq_len = batch["tokens"].shape
        units = -(-rows // group_size)
        total = max(units, self.dp) * group_size
        if total > rows:
            batch = {k: torch.cat([v, torch.zeros((total - rows, *v.shape[1:]), dtype=v.dtype)]) for k, v in batch.items()}
        lengths = needed_lengths(batch["loss_mask"]) if "loss_mask" in batch else [seq_len] * total
        plan = plan_packing(lengths, max_tokens=self.max_tokens, dp=self.dp, align=self.align,
                            group_size=group_size)[self.dp_rank]
        return MicroBatches(self._packed_micro(batch, plan, lambda rows: torch.tensor(rows)), total)

    def rows_by_rank(self, lengths: list[int], *, group_size: int = 1) -> list[list[int]]:
        """Which rows of a batch each data-parallel rank's micro-batches hold (what `split` gives rank
        r, in its order), from the rows' needed lengths alone, so that rows can be sent to the rank
        that trains on them before any rank holds the batch. Indices >= len(lengths) are the zero
        rows `split` adds. `group_size` as in `split` (packed plan only)."""
        rows = len(lengths)
        if not self.packed:
            per_rank = self.padded_rows(rows) // self.dp
            return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(self.dp)]
        total = max(-(-rows // group_size), self.dp) * group_size
        # split's zero rows have no loss position: needed_lengths gives them 1 token
        plan = plan_packing(list(lengths) + [1] * (total - rows), max_tokens=self.max_tokens, dp=self.dp,
                            align=self.align, group_size=group_size)
        return [[row for micro in rank for row in micro.rows] for rank in plan]

    def groups_fit(self, batch: dict, group_size: int) -> bool:
        """Whether micro-batches can hold whole groups of `group_size` rows: rows per micro-batch a
        multiple of it, or every group within the token budget (rows padded as the packer pads them)."""
        return self.groups_fit_lengths(needed_lengths(batch["loss_mask"]) if self.packed else [], group_size)

    def groups_fit_lengths(self, lengths: Sequence[int], group_size: int) -> bool:
        """groups_fit from the rows' needed lengths (the padded plan does not read them)."""
        if not self.packed:
            return self.micro_batch_size % group_size == 0
        padded = torch.tensor([-(-n // self.align) * self.align for n in lengths])
        return int(padded.view(-1, group_size).sum(dim=1).max()) <= self.max_tokens
