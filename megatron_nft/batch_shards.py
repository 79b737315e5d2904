"""A step's batch as tensors, cut by data-parallel rank (issue #18 item 2).

Rank 0 turns the kept groups into one `RaggedBatch` once: every row's tokens end to end, no padding and
no Python object per token (4 bytes a token id, 4 a log-prob, where a pickled StepRollout costs dozens).
`train_rows` says which rows each data-parallel rank trains on, exactly as the actor's micro-batch plan
cuts each minibatch today (whole groups per minibatch; whole groups per micro-batch where the packed
plan keeps them, which InfoNCA needs). `scatter_shards` sends every rank only its data-parallel rank's
rows over the gloo control group (host tensors, point to point: no rank but 0 ever holds the whole
batch; ranks that share a data-parallel rank, its TP x PP x CP ranks, get it from one of them by a
broadcast within their group), and `RaggedBatch.padded` pads a shard to the whole batch's width,
giving row for row what `data.batching.pack_rows` gives for the whole batch.

The trainer's sync steps train on these shards (megatron_nft/sharded_train.py); bench/batch_distribution.py
measures the distribution against the broadcast it replaces.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_nft.algorithms import group_correct_rate, group_reward_std
from megatron_nft.runtime import broadcast_object, control_group


@dataclass(frozen=True)
class RaggedBatch:
    """Rows (prompt + response) without padding. Row i's prompt and response tokens are the i-th
    `prompt_lens[i] + response_lens[i]` tokens of `tokens`; its rollout log-probs (one per response
    token) the i-th `response_lens[i]` of `rollout_logprobs`. `row_ids` are the rows' indices in the
    whole batch, `width` the whole batch's longest row, so that a shard pads exactly as the batch.
    `old_logprobs`: log π_old laid out as `rollout_logprobs`, when computed before the batch was cut
    (async mode's rollouts scored ahead); None otherwise."""

    tokens: torch.Tensor  # [T] int32
    prompt_lens: torch.Tensor  # [B] int64
    response_lens: torch.Tensor  # [B] int64
    rollout_logprobs: torch.Tensor  # [R] float32, R = response_lens.sum()
    per_row: dict[str, torch.Tensor]  # name -> [B] float32
    row_ids: torch.Tensor  # [B] int64
    width: int
    old_logprobs: torch.Tensor | None = None  # [R] float32

    @property
    def rows(self) -> int:
        return int(self.prompt_lens.numel())

    def needed_lengths(self) -> list[int]:
        """batching.needed_lengths of the padded rows: up to the last response token, or 1 token for a
        row without a response (it has no loss position)."""
        lengths = self.prompt_lens + self.response_lens
        return torch.where(self.response_lens > 0, lengths, torch.ones_like(lengths)).tolist()

    def select(self, rows: Sequence[int]) -> RaggedBatch:
        """The given rows (indices into this batch), in that order; the width stays the batch's.
        (Row by row slices: no index tensor as long as the tokens, whose temporaries would cost more
        than the shard.)"""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return RaggedBatch(
            tokens=_pick_segments(self.tokens, self.prompt_lens + self.response_lens, index),
            prompt_lens=self.prompt_lens[index],
            response_lens=self.response_lens[index],
            rollout_logprobs=_pick_segments(self.rollout_logprobs, self.response_lens, index),
            per_row={k: v[index] for k, v in self.per_row.items()},
            row_ids=self.row_ids[index],
            width=self.width,
            old_logprobs=None if self.old_logprobs is None else _pick_segments(self.old_logprobs, self.response_lens, index),
        )

    def padded(self) -> dict:
        """The actor's right-padded batch of these rows, `width` columns: equal, row for row, to what
        pack_rows gives for the whole batch (tokens, loss_mask, rollout_logprobs aligned with the
        labels, the per-row values)."""
        rows, width = self.rows, self.width
        tokens = torch.zeros((rows, width), dtype=torch.long)
        at = 0
        for i, n in enumerate((self.prompt_lens + self.response_lens).tolist()):
            tokens[i, :n] = self.tokens[at : at + n]
            at += n
        logprobs = self.aligned(self.rollout_logprobs)
        start = (self.prompt_lens - 1)[:, None]
        columns = torch.arange(width)[None, :]
        loss_mask = ((columns >= start) & (columns < start + self.response_lens[:, None])).float()
        return {"tokens": tokens, "loss_mask": loss_mask, "rollout_logprobs": logprobs, **self.per_row}


    def aligned(self, values: torch.Tensor) -> torch.Tensor:
        """One value per response token (rows end to end, the layout of `rollout_logprobs`) ->
        [rows, width] float32 aligned like `padded()`'s labels, 0 elsewhere; answer_values' inverse."""
        out = torch.zeros((self.rows, self.width), dtype=torch.float32)
        at = 0
        for i, (p, r) in enumerate(zip(self.prompt_lens.tolist(), self.response_lens.tolist())):
            # label t scores token t+1: the response's labels sit at p - 1 .. p + r - 2
            out[i, p - 1 : p - 1 + r] = values[at : at + r]
            at += r
        return out

    def answer_values(self, padded: torch.Tensor) -> torch.Tensor:
        """[rows, width] values aligned like `padded()`'s labels -> one per response token, rows end to
        end (the layout of `rollout_logprobs`; the order `padded[loss_mask.bool()]` reads them in)."""
        parts = [padded[i, p - 1 : p - 1 + r] for i, (p, r) in
                 enumerate(zip(self.prompt_lens.tolist(), self.response_lens.tolist()))]
        return torch.cat(parts) if parts else padded.new_zeros(0)


def _pick_segments(flat: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Segments `index` (in that order) of `flat`, cut into segments of `lengths` laid end to end."""
    starts = (torch.cumsum(lengths, 0) - lengths).tolist()
    sizes = lengths.tolist()
    parts = [flat[starts[i] : starts[i] + sizes[i]] for i in index.tolist()]
    return torch.cat(parts) if parts else flat[:0].clone()


def ragged_batch(prompts: list[list[int]], responses: list[list[int]], rollout_logprobs: list[list[float]],
                 per_row: dict[str, list[float]]) -> RaggedBatch:
    """Rank 0's one conversion of Python lists into tensors; prompts must be non-empty."""
    empty = next((i for i, p in enumerate(prompts) if not p), None)
    if empty is not None:
        raise ValueError(f"ragged_batch: row {empty} has an empty prompt; expected at least one token "
                         f"(a row's first label is its prompt's last token)")
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    response_lens = torch.tensor([len(r) for r in responses], dtype=torch.long)
    # array: 4 bytes an item while it is filled, where a list of the flattened values would hold 8-byte
    # pointers to objects; float32 items are rounded from the Python floats as torch.tensor rounds them
    tokens = array("i", itertools.chain.from_iterable(itertools.chain(p, r) for p, r in zip(prompts, responses)))
    logprobs = array("f", itertools.chain.from_iterable(rollout_logprobs))
    rows = len(prompts)
    return RaggedBatch(
        tokens=_from_array(tokens, torch.int32),
        prompt_lens=prompt_lens,
        response_lens=response_lens,
        rollout_logprobs=_from_array(logprobs, torch.float32),
        per_row={k: torch.tensor(v, dtype=torch.float32) for k, v in per_row.items()},
        row_ids=torch.arange(rows),
        width=int((prompt_lens + response_lens).max()) if rows else 0,
    )


def _from_array(values: array, dtype: torch.dtype) -> torch.Tensor:
    if not len(values):
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(values, dtype=dtype)  # the array's memory, no copy (the tensor keeps it alive)


def rollout_ragged_batch(rollout, k: int, rewards: list[float]) -> RaggedBatch:
    """trainer.rollout_batch's batch as a RaggedBatch (its per-row values computed the same way)."""
    reward_tensor = torch.tensor(rewards)
    return ragged_batch(
        [p.ids for p in rollout.prompts for _ in range(k)],
        [c.token_ids for c in rollout.completions],
        [c.logprobs for c in rollout.completions],
        {
            "rewards": rewards,
            "correct_rate": group_correct_rate(reward_tensor, k).tolist(),
            "reward_std": group_reward_std(reward_tensor, k).tolist(),
        },
    )


def minibatch_rows(rows: int, group_size: int, num_minibatches: int) -> list[range]:
    """The rows of each of a step's minibatches, as trainer.train_on_rollout cuts them: at most
    `num_minibatches` runs of whole groups, ceil(groups / minibatches) groups each."""
    groups = rows // group_size
    num_mb = min(num_minibatches, groups)
    per_mb = math.ceil(groups / num_mb) if groups else 1
    return [range(start * group_size, min(groups, start + per_mb) * group_size) for start in range(0, groups, per_mb)]


def train_rows(plan, lengths: list[int], *, group_size: int, num_minibatches: int,
               whole_groups: Sequence[bool] | bool = False) -> list[list[int]]:
    """Per data-parallel rank, the rows (indices into the step's batch, increasing) its micro-batches
    hold over the step's minibatches, as trainer.train_on_rollout cuts them: minibatches of whole
    groups of `group_size` rows, each cut by `plan` (a MicroBatchPlan) with groups kept whole in
    packed micro-batches where `whole_groups` (per minibatch, or one flag for all) says the actor keeps
    them (a group-coupled loss whose groups fit). The zero rows the plan adds are not rows of the batch
    and are left out."""
    if len(lengths) % group_size:
        raise ValueError(f"train_rows: {len(lengths)} rows are not whole groups of {group_size}")
    spans = minibatch_rows(len(lengths), group_size, num_minibatches)
    whole = [whole_groups] * len(spans) if isinstance(whole_groups, bool) else list(whole_groups)
    if len(whole) != len(spans):
        raise ValueError(f"train_rows: whole_groups has {len(whole)} flags for {len(spans)} minibatches")
    mine: list[set[int]] = [set() for _ in range(plan.dp)]
    for span, keep in zip(spans, whole):
        first, end = span.start, span.stop
        cut = plan.rows_by_rank(lengths[first:end], group_size=group_size if keep else 1)
        for rank, rows in enumerate(cut):
            mine[rank].update(first + r for r in rows if first + r < end)
    return [sorted(rows) for rows in mine]


def scatter_shards(batch: RaggedBatch | None, rows_by_dp_rank: list[list[int]] | None, dp_rank: int, *,
                   replica_group=None) -> RaggedBatch:
    """Every rank gets the rows of its data-parallel rank (rank 0 holds `batch` and the assignment;
    the other ranks pass None). From rank 0 point to point over the gloo control group (host tensors,
    five messages: sizes, row lengths and ids, token ids, log-probs, per-row values; a sixth with old
    log-probs), so a rank never receives another data-parallel rank's rows.

    `replica_group`: the group of ranks that share this data-parallel rank (its TP x PP x CP ranks),
    when there are several. Rank 0 then sends only to the lowest rank of each such group, which
    broadcasts within it; that group is NCCL on GPUs, so there the tensors travel on its device.
    Log-probs already computed for the batch (`batch.old_logprobs`) travel with the rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch.select(rows_by_dp_rank[dp_rank])
    group, rank, world = control_group(), dist.get_rank(), dist.get_world_size()
    leader = min(dist.get_process_group_ranks(replica_group)) if replica_group is not None else rank
    # per rank: its data-parallel rank, and whether rank 0 sends to it (the lowest rank of its replicas)
    ranks = torch.zeros((world, 2), dtype=torch.long)
    ranks[rank] = torch.tensor([dp_rank, int(leader == rank)])
    dist.all_reduce(ranks, group=group)
    keys, assigned = broadcast_object((sorted(batch.per_row), len(rows_by_dp_rank)) if rank == 0 else None)
    highest = int(ranks[:, 0].max())
    if assigned <= highest:  # every rank stops, none is left waiting for its rows
        raise ValueError(f"scatter_shards: rows for {assigned} data-parallel ranks, but rank "
                         f"{int(ranks[:, 0].argmax())} is data-parallel rank {highest}")
    shard = None
    if rank == 0:
        for dst in range(1, world):
            if ranks[dst, 1]:
                for tensor in _encode(batch.select(rows_by_dp_rank[int(ranks[dst, 0])]), keys):
                    dist.send(tensor, dst, group=group)
        shard = batch.select(rows_by_dp_rank[dp_rank])
    elif leader == rank:
        sizes = torch.zeros(5, dtype=torch.long)
        dist.recv(sizes, 0, group=group)
        received = _buffers(sizes.tolist(), len(keys), torch.device("cpu"))
        for tensor in received:
            dist.recv(tensor, 0, group=group)
        shard = _decode(sizes.tolist(), received, keys)
    if replica_group is not None and dist.get_world_size(replica_group) > 1:
        shard = _broadcast_within(shard, keys, leader, replica_group)
    return shard


def _broadcast_within(shard: RaggedBatch | None, keys: list[str], src: int, group) -> RaggedBatch:
    """`src`'s shard to every rank of `group`, on the device the group's backend takes."""
    from megatron_nft.runtime import comm_device

    device = comm_device(group)
    sent = [t.to(device) for t in _encode(shard, keys)] if shard is not None else None
    sizes = sent[0] if sent is not None else torch.zeros(5, dtype=torch.long, device=device)
    dist.broadcast(sizes, src, group=group)
    payload = sent[1:] if sent is not None else _buffers(sizes.tolist(), len(keys), device)
    for tensor in payload:
        dist.broadcast(tensor, src, group=group)
    return _decode(sizes.tolist(), [t.cpu() for t in payload], keys)


def _buffers(sizes: list[int], keys: int, device) -> list[torch.Tensor]:
    rows, total, answers, _, with_old = sizes
    return [torch.empty(3 * rows, dtype=torch.long, device=device), torch.empty(total, dtype=torch.int32, device=device),
            torch.empty(answers, dtype=torch.float32, device=device),
            torch.empty((keys, rows) if keys else (0,), dtype=torch.float32, device=device),
            *([torch.empty(answers, dtype=torch.float32, device=device)] if with_old else [])]


def _decode(sizes: list[int], tensors: list[torch.Tensor], keys: list[str]) -> RaggedBatch:
    rows, _, _, width, with_old = sizes
    meta, tokens, logprobs, per_row = tensors[:4]
    prompt_lens, response_lens, row_ids = meta.view(3, rows)
    return RaggedBatch(tokens=tokens, prompt_lens=prompt_lens, response_lens=response_lens, rollout_logprobs=logprobs,
                       per_row=dict(zip(keys, per_row)), row_ids=row_ids, width=width,
                       old_logprobs=tensors[4] if with_old else None)


def _encode(shard: RaggedBatch, keys: list[str]) -> list[torch.Tensor]:
    with_old = shard.old_logprobs is not None
    sizes = torch.tensor([shard.rows, shard.tokens.numel(), shard.rollout_logprobs.numel(), shard.width, int(with_old)])
    meta = torch.cat([shard.prompt_lens, shard.response_lens, shard.row_ids])
    per_row = torch.stack([shard.per_row[k] for k in keys]) if keys else torch.zeros(0)
    return [sizes, meta, shard.tokens.contiguous(), shard.rollout_logprobs.contiguous(), per_row,
            *([shard.old_logprobs.float().contiguous()] if with_old else [])]


def gather_answer_values(shard: RaggedBatch, values: torch.Tensor, *, rows: int, sends: bool = True) -> torch.Tensor | None:
    """On rank 0: one value per response token of the whole batch's `rows` rows, in row order (the
    layout of RaggedBatch.rollout_logprobs), from the shards that hold them; None elsewhere. `values`
    holds one per response token of this rank's `shard` (e.g. its old log-probs, through
    `shard.answer_values`). `sends`: whether this rank sends its shard's values; exactly one rank of
    each data-parallel rank must (its replicas hold the same rows). So a metric over every token
    (the rollout vs actor log-prob gap) is computed on rank 0 over the very vector, in the very
    order, the whole batch would give, at 4 bytes a token. Host tensors over the control group."""
    if values.numel() != int(shard.response_lens.sum()):
        raise ValueError(f"gather_answer_values: {values.numel()} values for {int(shard.response_lens.sum())} response tokens")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    pieces = [(shard.row_ids, shard.response_lens, values.float().cpu())] if rank == 0 and sends else []
    if world > 1:
        senders = torch.zeros(world, dtype=torch.long)
        senders[rank] = int(sends)
        dist.all_reduce(senders, group=control_group())
        if rank != 0:
            if sends:
                sizes = torch.tensor([shard.rows, values.numel()])
                for tensor in (sizes, torch.cat([shard.row_ids, shard.response_lens]), values.float().cpu().contiguous()):
                    dist.send(tensor, 0, group=control_group())
            return None
        for src in range(1, world):
            if senders[src]:
                sizes = torch.zeros(2, dtype=torch.long)
                dist.recv(sizes, src, group=control_group())
                n, total = sizes.tolist()
                meta, got = torch.empty(2 * n, dtype=torch.long), torch.empty(total, dtype=torch.float32)
                dist.recv(meta, src, group=control_group())
                dist.recv(got, src, group=control_group())
                pieces.append((meta[:n], meta[n:], got))
    by_row: list[torch.Tensor | None] = [None] * rows
    for row_ids, lengths, got in pieces:
        for row, part in zip(row_ids.tolist(), got.split(lengths.tolist())):
            if by_row[row] is not None:
                raise ValueError(f"gather_answer_values: row {row} sent twice (one sender per data-parallel rank)")
            by_row[row] = part
    missing = [i for i, part in enumerate(by_row) if part is None]
    if missing:
        raise ValueError(f"gather_answer_values: no values for rows {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return torch.cat(by_row) if by_row else torch.zeros(0)
