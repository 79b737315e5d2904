"""Rollout engines: the interface the trainer uses, and the local CPU engine (SGLang backend: later).

    engine.update_weights(actor.hf_tensors(), version)   # HF-named stream, every tensor once
    completions = engine.generate(prompt_ids, SamplingParams(temperature=1.0, n=16, max_new_tokens=...))
"""

from megatron_nft.rollout.base import FINISH_LENGTH, FINISH_STOP, Completion, RolloutEngine, SamplingParams
from megatron_nft.rollout.local import LocalEngine

__all__ = ["Completion", "FINISH_LENGTH", "FINISH_STOP", "LocalEngine", "RolloutEngine", "SamplingParams"]
