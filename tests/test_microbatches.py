"""The actor's micro-batch plan (microbatches.MicroBatchPlan), on its own: every data-parallel rank's
micro-batches together are the global batch, each row exactly once, against the batch itself."""

from __future__ import annotations

import pytest
import torch

from megatron_nft.data.batching import pack_rows
from megatron_nft.microbatches import MicroBatchPlan


def _batch(lengths=(7, 3, 9, 4, 6, 2), prompt=2):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 50, (prompt,), generator=g).tolist() for _ in lengths]
    responses = [torch.randint(1, 50, (n - prompt,), generator=g).tolist() for n in lengths]
    batch = pack_rows(prompts, responses)
    batch["rewards"] = torch.arange(len(lengths), dtype=torch.float32)
    return batch


@pytest.mark.parametrize("dp,mbs,align", [(1, 4, 1), (2, 2, 1), (2, 4, 8)])
def test_padded_plan_is_the_batch_cut_and_padded(dp, mbs, align):
    batch = _batch()
    rows, width = batch["tokens"].shape
    parts = [MicroBatchPlan(dp=dp, dp_rank=r, micro_batch_size=mbs, align=align).split(batch) for r in range(dp)]
    total = -(-rows // (dp * mbs)) * (dp * mbs)
    assert {p.rows for p in parts} == {total} and not parts[0].packed
    padded_width = -(-width // align) * align
    for key, value in batch.items():
        got = torch.cat([mb[key] for p in parts for mb in p.micro])  # ranks in order, micro-batches in order
        assert all(mb[key].shape[0] == mbs for p in parts for mb in p.micro)
        assert torch.equal(got[:rows, :width] if value.dim() == 2 else got[:rows], value), key
        if value.dim() == 2:
            assert got.shape[1] == padded_width and not got[:, width:].any() and not got[rows:].any(), key
    assert not torch.cat([mb["loss_mask"] for p in parts for mb in p.micro])[rows:].any()


def test_packed_plan_holds_every_row_once_and_groups_whole():
    batch = _batch(lengths=(7, 3, 9, 4, 6, 2, 8, 5))
    parts = [MicroBatchPlan(dp=2, dp_rank=r, max_tokens=20, align=4).split(batch, group_size=2) for r in range(2)]
    assert all(p.packed and p.rows == 8 for p in parts)
    seen = []
    for p in parts:
        for mb in p.micro:
            rows = list(mb["packed"].micro.rows)
            assert mb["packed"].total_tokens <= 20
            assert all(n % 4 == 0 for n in mb["packed"].micro.padded_lengths)
            assert {r // 2 for r in rows} == {r // 2 for r in rows[::2]} and len(rows) % 2 == 0  # whole pairs
            assert torch.equal(mb["tokens"], batch["tokens"][torch.tensor(rows)])
            assert torch.equal(mb["rewards"], batch["rewards"][torch.tensor(rows)])
            seen += rows
    assert sorted(seen) == list(range(8))


def test_groups_fit():
    batch = _batch(lengths=(7, 3, 9, 4))  # needed lengths 7, 3, 9, 4
    assert MicroBatchPlan(micro_batch_size=4).groups_fit(batch, 2)
    assert not MicroBatchPlan(micro_batch_size=3).groups_fit(batch, 2)
    # packed: groups of 2 need 7+3 = 10 and 9+4 = 13 tokens, or 8+4 = 12 and 12+4 = 16 at alignment 4
    assert MicroBatchPlan(max_tokens=13).groups_fit(batch, 2)
    assert not MicroBatchPlan(max_tokens=12).groups_fit(batch, 2)
    assert not MicroBatchPlan(max_tokens=15, align=4).groups_fit(batch, 2)
    assert MicroBatchPlan(max_tokens=16, align=4).groups_fit(batch, 2)
