"""(prompt, response) pairs -> the right-padded token batch the actor consumes (see actor.py)."""

from __future__ import annotations

import torch


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
