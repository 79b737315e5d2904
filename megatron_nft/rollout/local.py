"""A local CPU rollout engine: transformers' Qwen2ForCausalLM fed by the actor's HF-named weight stream.

It receives exactly the (name, tensor) stream that an SGLang server would, so every weight sync
exercises the Megatron -> HF mapping; a mapping error shows up as a gap between the log-probs
recorded here and the ones the actor recomputes.

Decoding: prompts are left-padded into one batch (pad positions masked out of attention, position
ids counted from each row's first real token), the prompt is run once through the model and the
KV cache (transformers' DynamicCache) is then extended one token per step. The n samples of a
prompt share one prefill: its cache rows are repeated before the first sampled token. Rows that
finish are masked (their tokens ignored) and dropped from the batch once they are a quarter of it.

Log-probs follow SGLang's convention: logprobs[i] = log softmax(logits / temperature)[token_ids[i]]
over the full vocabulary, i.e. before top-p truncation, so they are the log-probs of the
temperature-scaled policy that the actor recomputes, not of the truncated sampling distribution.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch

from megatron_nft.rollout.base import FINISH_LENGTH, FINISH_STOP, Completion, RolloutEngine, SamplingParams

# Finished rows stay in the batch (masked) until they are this fraction of it; compacting the KV
# cache copies it, which costs about as much as one decoding step.
_COMPACT_FRACTION = 0.25


class LocalEngine(RolloutEngine):
    """transformers Qwen2ForCausalLM on CPU (eval, no grad); see the module docstring.

    `update_weights` must be called before the first `generate`: the model starts from transformers'
    random initialisation and `weight_version` is -1 until then.
    """

    def __init__(self, hf_config, *, dtype: torch.dtype = torch.float32, max_batch_size: int = 256, seed: int = 0):
        from transformers import Qwen2ForCausalLM

        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"LocalEngine.max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self._config = copy.deepcopy(hf_config)
        model = Qwen2ForCausalLM(self._config)
        model.to(device="cpu", dtype=dtype)
        model.eval()
        model.requires_grad_(False)
        self._model = model
        # named_parameters() lists a tied lm_head once, under model.embed_tokens.weight: the same set of
        # names the HF checkpoint (and SGLang's weight loader) uses.
        self._params: dict[str, torch.nn.Parameter] = dict(model.named_parameters())
        self._vocab_size = int(self._config.vocab_size)
        self._max_positions = getattr(self._config, "max_position_embeddings", None)
        self._max_batch_size = max_batch_size
        self._generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._version = -1
        self._loaded = False
        self._closed = False

    # ------------------------------------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def model(self):
        """The underlying transformers model (read-only use: reference computations, debugging)."""
        return self._model

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copies a stream of HF-named tensors in; every parameter exactly once, cast to the engine dtype.

        A missing, unknown, repeated or mis-shaped tensor raises ValueError naming it. Tensors are
        copied as they arrive (nothing is buffered), so after a failed update the weights are a mix:
        the engine then refuses to generate until a complete update succeeds.
        """
        self._check_open()
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"update_weights: version must be an integer, got {version!r}")
        self._loaded = False
        seen: set[str] = set()
        for item in named_tensors:
            name, tensor = item
            param = self._params.get(name)
            if param is None:
                hint = ""
                if name == "lm_head.weight" and getattr(self._config, "tie_word_embeddings", False):
                    hint = " (tie_word_embeddings=True: the output layer is model.embed_tokens.weight)"
                raise ValueError(f"update_weights: unknown tensor {name!r}{hint}")
            if name in seen:
                raise ValueError(f"update_weights: tensor {name!r} received twice")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(tensor)  # casts dtype and moves off any device
            seen.add(name)
        missing = [n for n in self._params if n not in seen]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8])
            if len(missing) > 8:
                shown += f", ... ({len(missing)} in all)"
            raise ValueError(f"update_weights: missing tensor(s) {shown}")
        self._version = version
        self._loaded = True

    # ------------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self._check_open()
        if not self._loaded:
            raise RuntimeError(
                "LocalEngine.generate: no complete set of weights loaded (call update_weights first"
                + ("; the last update failed part-way)" if self._version >= 0 else ")")
            )
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params must be a SamplingParams, got {type(params).__name__}")
        prompts = [self._check_prompt(i, p, params.max_new_tokens) for i, p in enumerate(prompts)]
        generator = self._generator
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        # Row r of the flat list is sample r % n of prompt r // n: the order the caller gets back.
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]
        out: list[Completion] = []
        for start in range(0, len(rows), self._max_batch_size):
            out.extend(self._generate_chunk(prompts, rows[start : start + self._max_batch_size], params, generator))
        return out

    def close(self) -> None:
        self._closed = True
        self._model = None
        self._params = {}

    # ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LocalEngine is closed")

    def _check_prompt(self, index: int, prompt, max_new_tokens: int) -> list[int]:
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise ValueError(f"generate: prompt {index} is not a list of token ids") from None
        if not ids:
            raise ValueError(f"generate: prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < self._vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {index} has token id {bad[0]} outside [0, {self._vocab_size})")
        if self._max_positions is not None and len(ids) + max_new_tokens > self._max_positions:
            raise ValueError(
                f"generate: prompt {index} ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_position_embeddings ({self._max_positions})"
            )
        return ids

    def _generate_chunk(
        self, prompts: list[list[int]], rows: list[int], params: SamplingParams, generator: torch.Generator
    ) -> list[Completion]:
        from transformers import DynamicCache

        model = self._model
        num_rows, max_new = len(rows), params.max_new_tokens

        # Prefill each distinct prompt once (rows of one prompt are contiguous), left-padded.
        unique: list[int] = []
        row_to_unique: list[int] = []
        for p in rows:
            if not unique or unique[-1] != p:
                unique.append(p)
            row_to_unique.append(len(unique) - 1)
        width = max(len(prompts[p]) for p in unique)
        input_ids = torch.zeros(len(unique), width, dtype=torch.long)
        mask = torch.zeros(len(unique), width, dtype=torch.long)
        for j, p in enumerate(unique):
            ids = prompts[p]
            input_ids[j, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[j, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self._config)
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        next_pos = positions[:, -1] + 1
        if len(unique) != num_rows:
            expand = torch.tensor(row_to_unique, dtype=torch.long)
            cache.reorder_cache(expand)
            logits, mask, next_pos = logits[expand], mask[expand], next_pos[expand]

        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long)
        tokens = torch.zeros(num_rows, max_new, dtype=torch.long)
        logprobs = torch.zeros(num_rows, max_new, dtype=torch.float64)
        lengths = torch.full((num_rows,), max_new, dtype=torch.long)
        stopped = torch.zeros(num_rows, dtype=torch.bool)
        present = torch.arange(num_rows)  # chunk row held by each batch row
        alive = torch.ones(num_rows, dtype=torch.bool)  # batch rows still generating

        for step in range(max_new):
            token, logprob = _sample(logits, params.temperature, params.top_p, generator)
            live_rows = present[alive]
            tokens[live_rows, step] = token[alive]
            logprobs[live_rows, step] = logprob[alive].double()
            if stop_ids.numel():
                hit = alive & torch.isin(token, stop_ids)
                if hit.any():
                    hit_rows = present[hit]
                    stopped[hit_rows] = True
                    lengths[hit_rows] = step + 1
                    alive &= ~hit
            if step == max_new - 1 or not alive.any():
                break
            dead = int((~alive).sum())
            if dead and dead >= _COMPACT_FRACTION * alive.numel():
                keep = alive.nonzero()[:, 0]
                cache.reorder_cache(keep)
                mask, next_pos, token, present = mask[keep], next_pos[keep], token[keep], present[keep]
                alive = alive[keep]
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            logits = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1

        version = self._version
        completions = []
        for r, prompt_index in enumerate(rows):
            n = int(lengths[r])
            completions.append(
                Completion(
                    prompt_index=prompt_index,
                    token_ids=tokens[r, :n].tolist(),
                    logprobs=logprobs[r, :n].tolist(),
                    finish_reason=FINISH_STOP if bool(stopped[r]) else FINISH_LENGTH,
                    weight_version=version,
                )
            )
        return completions


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator):
    """Samples one token per row from softmax(logits / T) truncated to its top-p nucleus.

    Returns (tokens [B], logprobs [B]) with logprobs under the full (untruncated) scaled distribution.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
        # The first token is always kept, so top_p -> 0 is greedy decoding.
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        choice = torch.multinomial(probs, 1, generator=generator)
        token = order.gather(-1, choice)[:, 0]
    else:
        token = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]
