"""The Megatron actor: a megatron-core GPTModel with DDP, the distributed optimizer and Megatron's
pipeline schedules, computing per-token log-probs and taking policy-loss steps.

Every rank calls the same methods with the same global batch; the actor takes its data-parallel slice,
runs `get_forward_backward_func()` over micro-batches, and returns results replicated on all ranks.

Batch layout (all tensors on CPU, rows = responses, right-padded):
  tokens        [B, S]  prompt + response token ids
  loss_mask     [B, S]  1 where labels[:, t] = tokens[:, t+1] is a response token
  old_logprobs  [B, S]  log pi_old at the same positions (train_step only)
  rewards       [B]     r in {0, 1}                          (train_step only)
  correct_rate  [B]     the response's group mean reward r^  (train_step only)
Per-token outputs are aligned with labels: position t scores tokens[:, t+1]; the last column is 0.

With `max_tokens_per_micro_batch`, whole rows are instead packed into THD micro-batches of at most
that many tokens, balanced over data-parallel ranks (data.batching.plan_packing, model.packed_stream);
each micro-batch's per-token outputs are put back to [rows, S] before its loss function sees them, so
losses are computed the same way on both paths. Context parallel (cp > 1) runs on packed micro-batches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_nft import runtime
from megatron_nft.algorithms import policy_loss
from megatron_nft.config import AlgoConfig, OptimConfig
from megatron_nft.data.batching import needed_lengths, pad_width, plan_packing, sequence_alignment
from megatron_nft.errors import ConfigError
from megatron_nft.model import mapping
from megatron_nft.model.qwen2 import ModelOptions, Qwen2Shape, build_gpt_model, te_available, transformer_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The newest actor's DDP model and TransformerConfig, held until the next actor releases them.
_latest: tuple | None = None


def _release(model, config) -> None:
    """megatron-core's DistributedDataParallel registers hooks on the parameters' gradient accumulators
    whose closures hold it: a reference cycle through C++ autograd nodes, which Python's gc cannot see,
    and the TransformerConfig holds its bound methods. Without breaking both, every actor built in a
    process keeps its model, gradient buffers and ~80 gloo file descriptors until exit (measured)."""
    model.grad_accs.clear()
    for name in ("no_sync_func", "finalize_model_grads_func", "grad_scale_func"):
        setattr(config, name, None)


FINITE_CHECK_CHUNK = 1 << 24  # gradient elements per isfinite call in _grads_finite (~112 MiB of temporaries)


def check_packing(cp: int, max_tokens_per_micro_batch: int | None) -> None:
    """Packed micro-batches need a positive token budget; context parallel runs only on them."""
    if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < 1:
        raise ConfigError(f"parallel.max_tokens_per_micro_batch={max_tokens_per_micro_batch}: expected a positive integer or null")
    if cp < 1:
        raise ConfigError(f"parallel.cp={cp}: expected >= 1")
    if cp > 1 and max_tokens_per_micro_batch is None:
        raise ConfigError(
            f"parallel.cp={cp} needs parallel.max_tokens_per_micro_batch: context parallel runs on packed sequences"
        )


class Actor:
    def __init__(
        self,
        shape: Qwen2Shape,
        *,
        tp: int = 1,
        pp: int = 1,
        dtype: str = "fp32",
        micro_batch_size: int = 8,
        optim: OptimConfig = OptimConfig(),
        algo: AlgoConfig = AlgoConfig(),
        total_steps: int = 1000,
        temperature: float = 1.0,
        seed: int = 1234,
        cp: int = 1,
        max_tokens_per_micro_batch: int | None = None,
        options: ModelOptions = ModelOptions(),
    ):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        shape.check_parallel(tp, pp)
        check_packing(cp, max_tokens_per_micro_batch)
        # Megatron's parallel state is per process: a new actor re-initialises it, which ends the
        # previous one (its process groups are destroyed), so free that one now (see _release).
        global _latest
        if _latest is not None:
            _release(*_latest)
            _latest = None
        self.shape, self.algo, self.temperature = shape, algo, temperature
        # None: right-padded rows, micro_batch_size at a time; else packed THD micro-batches of at most
        # this many tokens (see _packed_microbatches)
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.micro_batch_size = micro_batch_size
        self.dtype = DTYPES[dtype]
        self.device = runtime.device()
        # "auto" settles here, for this machine; a setting it cannot run is a ConfigError
        self.options = options.resolved(
            cuda=runtime.CUDA, te=te_available(), dtype=self.dtype, num_layers=shape.num_layers, pp=pp
        )
        self.use_te = self.options.use_te
        runtime.init_model_parallel(runtime.ParallelLayout(tp=tp, pp=pp, cp=cp), seed)
        self.tp, self.pp, self.cp = tp, pp, cp
        self.cp_group = ps.get_context_parallel_group() if cp > 1 else None
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.first_stage = ps.is_pipeline_first_stage()
        self.last_stage = ps.is_pipeline_last_stage()
        self.layers_per_stage = shape.num_layers // pp
        self.layer_offset = self.pp_rank * self.layers_per_stage

        with runtime.megatron_device_compat():
            self.config = transformer_config(shape, dtype=self.dtype, tp=tp, pp=pp, cp=cp, options=self.options)
            model = build_gpt_model(
                shape,
                self.config,
                tp=tp,
                options=self.options,
                pre_process=self.first_stage,
                post_process=self.last_stage,
            ).to(self.device)
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
            )
            self.model = DistributedDataParallel(self.config, ddp_config, model)
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam",
                    lr=optim.lr,
                    min_lr=optim.lr if optim.min_lr is None else optim.min_lr,
                    weight_decay=optim.weight_decay,
                    adam_beta1=optim.adam_beta1,
                    adam_beta2=optim.adam_beta2,
                    adam_eps=optim.adam_eps,
                    clip_grad=optim.grad_clip,
                    bf16=self.dtype == torch.bfloat16,
                    fp16=self.dtype == torch.float16,
                    params_dtype=self.dtype,
                    use_distributed_optimizer=True,
                ),
                [self.model],
            )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.lr if optim.min_lr is None else optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
            lr_decay_style="constant" if optim.min_lr is None else "cosine",
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        # What Megatron-LM's training loop wires up: gradient all-reduce over DP (and the tied
        # embedding's all-reduce across pipeline stages) after the last micro-batch, and no_sync for
        # the others.
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.steps = 0
        _latest = (self.model, self.config)

    def close(self) -> None:
        """Lets this actor's model be freed now rather than when the next actor is built (see
        _release); the actor is unusable afterwards."""
        global _latest
        _release(self.model, self.config)
        if _latest is not None and _latest[0] is self.model:
            _latest = None

    # ------------------------------------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------------------------------------

    def _rule_table(self):
        return mapping.rules_by_megatron_name(
            self.shape,
            use_te=self.use_te,
            layer_offset=self.layer_offset,
            num_local_layers=self.layers_per_stage,
            first_stage=self.first_stage,
            last_stage=self.last_stage,
        )

    @torch.no_grad()
    def load_hf(self, fetch: Callable[[str], torch.Tensor]) -> None:
        """Loads this rank's shard of an HF Qwen2 checkpoint; `fetch(name)` returns one HF tensor."""
        params = dict(self.model.module.named_parameters())
        table = self._rule_table()
        missing = sorted(set(params) - set(table))
        if missing:
            raise RuntimeError(f"no HF mapping for Megatron parameters {missing}")
        for name, shard in mapping.megatron_shard_state(
            self.shape,
            fetch,
            tp_rank=self.tp_rank,
            tp=self.tp,
            layer_offset=self.layer_offset,
            num_local_layers=self.layers_per_stage,
            first_stage=self.first_stage,
            last_stage=self.last_stage,
            use_te=self.use_te,
        ):
            param = params[name]
            if param.shape != shard.shape:
                raise ValueError(f"{name}: HF gives shape {tuple(shard.shape)}, Megatron expects {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
        # The distributed optimizer keeps fp32 main copies of bf16/fp16 params: refresh them.
        self.optimizer.reload_model_params()

    def _exported_params(self) -> list[tuple[torch.nn.Parameter, mapping.Rule, tuple[str, ...]]]:
        table = self._rule_table()
        out = []
        for name, param in self.model.module.named_parameters():
            if name == "output_layer.weight" and self.shape.tie_word_embeddings:
                continue  # the first stage exports the tied embedding
            rule, hf_names = table[name]
            out.append((param, rule, hf_names))
        return out

    def _gathered(self, param, rule, hf_names) -> list[tuple[str, torch.Tensor]]:
        """One parameter as HF tensors: a collective over this rank's tensor-parallel group."""
        from megatron.core import parallel_state as ps

        if self.tp > 1 and rule.split != mapping.REPLICATED:
            shards = [torch.empty_like(param) for _ in range(self.tp)]
            dist.all_gather(shards, param.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        else:
            shards = [param.detach()]
        return list(zip(hf_names, mapping.hf_from_shards(self.shape, rule, shards)))

    @torch.no_grad()
    def hf_tensors(self, device: str | torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (HF name, full tensor) for the whole model on global rank 0 (nothing elsewhere).

        Every rank must iterate it to the end (it runs collectives). One parameter at a time is
        all-gathered over tensor parallelism and, with pipeline parallelism, sent from its stage to
        rank 0, so no rank holds more than one gathered parameter beyond its own shard.

        Tensors are copies on `device`, by default the actor's own: the GPU transports (NCCL
        broadcast, CUDA IPC) send from GPU memory, and a host round trip per tensor would only
        slow every sync; the disk transport moves each bucket to the host itself."""
        target = torch.device(device) if device is not None else torch.device(self.device)
        from megatron.core import parallel_state as ps

        exported = self._exported_params()
        is_rank0 = dist.get_rank() == 0
        if self.pp == 1:
            for item in exported:
                pairs = self._gathered(*item)
                if is_rank0:
                    # copy: with TP=1 the "gathered" tensor is the live parameter, which training changes
                    yield from ((n, t.to(target, copy=True)) for n, t in pairs)
            return
        # Pipeline stages: the data-parallel rank 0 of each stage gathers over TP; its TP rank 0 (the
        # "holder") broadcasts each tensor over the pipeline group, whose rank 0 is global rank 0.
        pp_group = ps.get_pipeline_model_parallel_group()
        if ps.get_data_parallel_rank() != 0:
            return
        holder = self.tp_rank == 0
        for stage in range(self.pp):
            mine = stage == self.pp_rank
            if not (mine or holder):
                continue
            src = dist.get_global_rank(pp_group, stage)
            count = [len(exported)] if mine else [None]
            if holder:
                dist.broadcast_object_list(count, src=src, group=pp_group)
            for i in range(count[0]):
                pairs = self._gathered(*exported[i]) if mine else None
                if not holder:
                    continue
                meta = [[(n, tuple(t.shape), t.dtype) for n, t in pairs]] if mine else [None]
                dist.broadcast_object_list(meta, src=src, group=pp_group)
                for j, (n, shape, dtype) in enumerate(meta[0]):
                    t = pairs[j][1].contiguous() if mine else torch.empty(shape, dtype=dtype, device=self.device)
                    dist.broadcast(t, src=src, group=pp_group)
                    if is_rank0:
                        yield n, t.to(target, copy=True)

    # ------------------------------------------------------------------------------------------------
    # forward / backward
    # ------------------------------------------------------------------------------------------------

    def _padded_rows(self, batch_size: int) -> int:
        unit = self.dp * self.micro_batch_size
        return int(math.ceil(batch_size / unit) * unit)

    def _local_microbatches(self, batch: dict, *, group_size: int | None = None) -> tuple[list[dict], int]:
        """Pads rows to a multiple of dp * micro_batch_size (padding rows have loss_mask 0), takes this
        rank's contiguous slice, and cuts it into micro-batches. With a token budget, packed
        micro-batches instead (see _packed_microbatches). Columns are padded to the packed path's
        alignment too (FP8 GEMMs need token counts in whole blocks); outputs keep the padded width."""
        if self.max_tokens_per_micro_batch is not None:
            return self._packed_microbatches(batch, group_size=group_size or 1)
        batch = pad_width(batch, self._alignment)
        rows = batch["tokens"].shape[0]
        total = self._padded_rows(rows)
        padded = {}
        for key, value in batch.items():
            if total > rows:
                filler = torch.zeros((total - rows, *value.shape[1:]), dtype=value.dtype)
                value = torch.cat([value, filler])
            per_rank = total // self.dp
            padded[key] = value[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        per_rank = total // self.dp
        micro = [
            {k: v[i : i + self.micro_batch_size].to(self.device) for k, v in padded.items()}
            for i in range(0, per_rank, self.micro_batch_size)
        ]
        return micro, total

    def _packed_microbatches(self, batch: dict, *, group_size: int) -> tuple[list[dict], int]:
        """Whole rows (whole groups of `group_size` rows) packed into THD micro-batches of at most
        max_tokens_per_micro_batch tokens, balanced over data-parallel ranks (data.batching.plan_packing).

        Each micro-batch dict holds its rows' ordinary [n, S] tensors (what loss functions read) and,
        under "packed", the model's stream (model.packed_stream). Row lengths come from loss_mask when
        given (tokens past the last scored label are not needed), else the full width S. Returns the
        micro-batches of this rank and the row count after padding (zero rows while fewer rows than
        data-parallel ranks, as the padded path does)."""
        from megatron_nft.model.packed_stream import build_stream

        rows, seq_len = batch["tokens"].shape
        units = -(-rows // group_size)
        total = max(units, self.dp) * group_size
        if total > rows:
            batch = {k: torch.cat([v, torch.zeros((total - rows, *v.shape[1:]), dtype=v.dtype)]) for k, v in batch.items()}
        lengths = needed_lengths(batch["loss_mask"]) if "loss_mask" in batch else [seq_len] * total
        plan = plan_packing(
            lengths,
            max_tokens=self.max_tokens_per_micro_batch,
            dp=self.dp,
            align=self._alignment,
            group_size=group_size,
        )[self.dp_rank]
        if self.pp > 1:
            # pipeline stages exchange activations of one fixed shape: pad every stream to the longest
            longest = max(m.total_tokens for m in plan)
            plan = [m.padded_to(longest) for m in plan]
        micro = []
        for packed in plan:
            index = torch.tensor(packed.rows)
            mb = {k: v[index].to(self.device) for k, v in batch.items()}
            mb["packed"] = build_stream(packed, batch["tokens"][index], cp_group=self.cp_group, device=self.device)
            micro.append(mb)
        return micro, total

    def _run(self, micro: list[dict], loss_func_for: Callable[[dict], Callable], *, forward_only: bool) -> list[dict]:
        if "packed" in micro[0]:
            return self._run_packed(micro, loss_func_for, forward_only=forward_only)
        seq_len = micro[0]["tokens"].shape[1]
        causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=self.device), diagonal=1)
        causal = causal[None, None]  # Megatron's convention: True = masked out
        positions = torch.arange(seq_len, device=self.device)
        # Labels for position t are the token at t+1; the last position gets a dummy label (masked).
        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            tokens = mb["tokens"]
            labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
            output = model(
                tokens,
                positions.expand_as(tokens),
                causal,
                labels=labels,
                output_processor=self._logprob_processor,
            )
            return output, loss_func_for(mb)

        return self._schedule(forward_step, micro, seq_length=seq_len, micro_batch_size=self.micro_batch_size, forward_only=forward_only)

    def _schedule(self, forward_step, micro: list[dict], *, seq_length: int, micro_batch_size: int, forward_only: bool) -> list[dict]:
        """Megatron's forward/backward schedule (pipelined when PP > 1) over the micro-batches."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        with runtime.megatron_device_compat():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro),
                model=[self.model],
                num_microbatches=len(micro),
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )

    def _run_packed(self, micro: list[dict], loss_func_for: Callable[[dict], Callable], *, forward_only: bool) -> list[dict]:
        """_run on packed micro-batches: the model sees one THD stream ([1, T/cp] tokens with
        PackedSeqParams), and each micro-batch's per-token outputs are put back to its rows' [n, S]
        layout before its loss function sees them, so loss functions are the same in both paths."""
        seq_len = micro[0]["tokens"].shape[1]

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            stream = mb["packed"]
            output = model(
                stream.tokens,
                stream.positions,
                None,  # the document mask comes from packed_seq_params
                labels=stream.labels,
                packed_seq_params=stream.params,
                output_processor=self._logprob_processor,
            )
            loss_func = loss_func_for(mb)
            return output, lambda out: loss_func(stream.rows(out, seq_len))

        # one stream per micro-batch; its full length (the schedule divides by cp itself)
        total = micro[0]["packed"].total_tokens
        return self._schedule(forward_step, micro, seq_length=total, micro_batch_size=1, forward_only=forward_only)

    def _logprob_processor(self, *, hidden_states, output_layer, output_weight, labels, **_):
        """Replaces GPTModel's loss on the last stage: per-token log-probs and entropy, [b, s] each.

        Bypasses output_layer's forward: model.logprobs.token_logprobs goes from the hidden states and
        this rank's vocab slice of the weight to both, token chunk by chunk, never holding [s*b, V/TP]
        logits, and all-reduces the hidden states' gradient over TP itself (the job of the layer's
        copy_to_tensor_model_parallel_region, for hidden states replicated over TP)."""
        from megatron.core import parallel_state as ps

        from megatron_nft.model.logprobs import token_logprobs

        if output_layer.sequence_parallel:
            raise NotImplementedError("fused log-probs under sequence parallel (hidden states split over TP)")
        s, b, h = hidden_states.shape
        logprobs, entropy = token_logprobs(
            hidden_states.reshape(s * b, h),
            output_weight if output_weight is not None else output_layer.weight,
            labels.transpose(0, 1).reshape(s * b),
            tp_group=ps.get_tensor_model_parallel_group() if self.tp > 1 else None,
            temperature=self.temperature,
            with_entropy=True,
            vocab_size=self.shape.vocab_size,
        )
        # Entropy is a metric here: detached, so the backward skips its gradient term.
        return torch.stack([logprobs.view(s, b).t(), entropy.detach().view(s, b).t()], dim=0)

    def _broadcast_from_last_stage(self, tensor: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if self.pp == 1:
            return tensor
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return tensor

    def _gather_dp(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if self.dp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.dp)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_data_parallel_group())
        return torch.cat(parts, dim=dim)

    def _packed_rows_everywhere(self, outputs: list[dict], micro: list[dict], total: int, seq_len: int) -> torch.Tensor:
        """[2, total, S] on every rank from each rank's packed micro-batch outputs, put back at their
        batch rows. Data-parallel ranks hold disjoint rows (zeros elsewhere): a sum assembles them."""
        from megatron.core import parallel_state as ps

        full = torch.zeros((2, total, seq_len), dtype=torch.float32, device=self.device)
        if self.last_stage:
            for mb, out in zip(micro, outputs):
                full[:, torch.tensor(mb["packed"].micro.rows, device=self.device)] = out["logprobs_entropy"].float()
        full = self._broadcast_from_last_stage(full, full.shape, full.dtype)
        if self.dp > 1:
            dist.all_reduce(full, group=ps.get_data_parallel_group())
        return full

    @torch.no_grad()
    def compute_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies [B, S] under the current weights, on every rank.

        With packed micro-batches, a `loss_mask` in the batch lets each row stop at its last scored
        label (positions past it come back 0); without one, rows are packed at full width."""
        self.model.eval()
        rows, seq_len = batch["tokens"].shape
        micro, total = self._local_microbatches({k: batch[k] for k in ("tokens", "loss_mask") if k in batch})

        def loss_func_for(mb):
            def collect(output):
                return output.sum() * 0.0, {"logprobs_entropy": output.detach().clone()}

            return collect

        outputs = self._run(micro, loss_func_for, forward_only=True)
        if "packed" in micro[0]:
            full = self._packed_rows_everywhere(outputs, micro, total, seq_len)[:, :rows].cpu()
        else:
            local = torch.cat([o["logprobs_entropy"] for o in outputs], dim=1) if self.last_stage else None
            width = micro[0]["tokens"].shape[1]  # seq_len, padded to the alignment
            local = self._broadcast_from_last_stage(local, (2, total // self.dp, width), torch.float32)
            full = self._gather_dp(local, dim=1)[:, :rows, :seq_len].cpu()
        full[:, :, -1] = 0.0
        return full[0], full[1]

    @staticmethod
    def _groups_with_tokens(loss_mask: torch.Tensor, group_size: int | None) -> int:
        if group_size is None or loss_mask.shape[0] % group_size:
            raise ValueError(f"agg=group_mean needs whole groups: {loss_mask.shape[0]} rows, group_size={group_size}")
        return int((loss_mask.view(-1, group_size, loss_mask.shape[1]).sum(dim=(1, 2)) > 0).sum())

    def train_step(self, batch: dict, *, group_size: int | None = None) -> dict[str, float]:
        """One optimizer step on a minibatch: returns loss, grad norm, lr and the loss stats.

        `group_size` (K answers per prompt, rows grouped contiguously) is needed by InfoNCA, whose loss
        contrasts a prompt's answers: micro-batches hold whole groups when they fit, else the step is
        split (see _split_group_coefficients). An optional `reward_std` [B] in the batch feeds
        GRPO/DAPO's advantage when rewards are shaped."""
        self.model.train()
        algo = self.algo.resolved()
        # token_mean (group_mean) over the whole minibatch == a sum divided by the minibatch's token
        # (group) count, which is additive over micro-batches and ranks; see algorithms.policy_loss.
        if algo.agg == "token_sum_norm":
            norm = algo.agg_norm * algo.reference_dp_world  # the official trainer's DP gradient averaging
        elif algo.agg == "token_mean":
            norm = max(float(batch["loss_mask"].sum()), 1.0)
        else:
            norm = max(float(self._groups_with_tokens(batch["loss_mask"], group_size)), 1.0)
        if algo.name == "infonca" and group_size is None:
            raise ValueError("infonca needs group_size (the K answers of a prompt are contrasted)")
        keys = ["tokens", "loss_mask", "old_logprobs", "rewards", "correct_rate"] + (["reward_std"] if "reward_std" in batch else [])
        # Only InfoNCA's loss contrasts a prompt's rows: micro-batches keep its groups whole when they
        # fit, else every row gets its exact per-token loss gradient from a forward pass first.
        whole_groups = group_size if algo.name == "infonca" and self._groups_fit(batch, group_size) else None
        split = None
        if algo.name == "infonca" and whole_groups is None:
            split = self._split_group_coefficients(batch, group_size, norm)
            batch = {**batch, "coef": split["coef"]}
            keys.append("coef")
        micro, _ = self._local_microbatches({k: batch[k] for k in keys}, group_size=whole_groups)
        # Megatron's schedule divides each micro-batch loss by the number of micro-batches and DDP
        # averages gradients over data-parallel ranks; undo both so the gradient is that of the
        # minibatch loss itself, whatever the micro-batching and parallel layout.
        undo = len(micro) * self.dp

        def loss_func_for(mb):
            def loss_func(output):
                logprobs, entropy = output[0], output[1]
                if split is not None:
                    return self._surrogate_loss(mb, logprobs, entropy, undo)
                loss, stats = policy_loss(
                    algo.name,
                    logprobs,
                    mb["old_logprobs"].float(),
                    mb["rewards"].float(),
                    mb["correct_rate"].float(),
                    mb["loss_mask"].float(),
                    prompt_weight=algo.prompt_weight,
                    neg_clip=algo.eps,
                    clip_low=algo.clip_low,
                    clip_high=algo.clip_high,
                    agg="token_sum_norm",
                    agg_norm=norm,
                    reward_std=mb["reward_std"].float() if "reward_std" in mb else None,
                    group_size=group_size,
                    beta=algo.beta,
                    sft_coef=algo.sft_coef,
                    target_temperature=algo.target_temperature,
                    adv_std=algo.adv_std,
                    max_log_ratio=algo.max_log_ratio,
                    rhat_clamp=algo.rhat_clamp,
                )
                mask = mb["loss_mask"].float()
                sums = {
                    "loss": loss.detach().clone(),
                    "entropy_sum": (entropy.detach() * mask).sum(),
                    "tokens": stats["num_tokens"],
                    "ratio_sum": stats["ratio_mean"] * stats["num_tokens"],
                    "neg_tokens": stats["neg_tokens"],
                    "neg_floor_tokens": stats["neg_floor_tokens"],
                    "clip_tokens": stats["clip_tokens"],
                    # min / max reduce as -max(-x) / max(x) after the sum below: kept as separate maxima
                    "neg_ratio_min": -stats["ratio_min"] if stats["num_tokens"] > 0 else torch.tensor(-math.inf),
                    "ratio_max": stats["ratio_max"] if stats["num_tokens"] > 0 else torch.tensor(-math.inf),
                }
                return loss * undo, sums

            return loss_func

        with runtime.megatron_device_compat():
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            outputs = self._run(micro, loss_func_for, forward_only=False)
        totals, maxima = self._reduce_step_stats(outputs)
        if split is not None:
            totals["loss"] = split["loss"]  # the surrogate's value is not the loss; the pre-pass's is
        # A non-finite loss or gradient skips the update on every rank (they all see the same totals and
        # the same all-reduced gradient check), as Megatron-LM skips an fp16 step that overflowed; the
        # scheduler does not advance either. The caller decides when too many skips end the run.
        finite = math.isfinite(totals["loss"]) and self._grads_finite()
        update_ok, grad_norm = False, float("nan")
        if finite:
            with runtime.megatron_device_compat():
                update_ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.steps += 1
        tokens = max(totals["tokens"], 1.0)
        return {
            "loss": totals["loss"],
            "entropy": totals["entropy_sum"] / tokens,
            "ratio_mean": totals["ratio_sum"] / tokens,
            "ratio_min": -maxima["neg_ratio_min"],
            "ratio_max": maxima["ratio_max"],
            "neg_floor_frac": totals["neg_floor_tokens"] / max(totals["neg_tokens"], 1.0),
            "clip_frac": totals["clip_tokens"] / tokens,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": bool(update_ok),
            "nonfinite": not finite,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens": totals["tokens"],
        }

    @property
    def _alignment(self) -> int:
        """The multiple packed sequences and padded rows are padded to (TP x CP zigzag; under FP8, whole
        GEMM blocks on every rank: data.batching.sequence_alignment)."""
        return sequence_alignment(tp=self.tp, cp=self.cp, fp8=self.options.fp8 is not None,
                                  blockwise=self.options.fp8_recipe == "blockwise",
                                  sequence_parallel=self.config.sequence_parallel)

    def _groups_fit(self, batch: dict, group_size: int) -> bool:
        """Whether micro-batches can hold whole groups: rows per micro-batch a multiple of K, or every
        group within the packed token budget (rows padded as the packer pads them)."""
        if self.max_tokens_per_micro_batch is None:
            return self.micro_batch_size % group_size == 0
        align = self._alignment
        padded = torch.tensor([-(-n // align) * align for n in needed_lengths(batch["loss_mask"])])
        return int(padded.view(-1, group_size).sum(dim=1).max()) <= self.max_tokens_per_micro_batch

    def _split_group_coefficients(self, batch: dict, group_size: int, norm: float) -> dict:
        """InfoNCA when a group does not fit a micro-batch: its loss L couples the K answers of a prompt
        only through their sequence log-probs, so with the per-token log-probs l of the whole minibatch
        under the current weights (one forward pass, no activations kept), c = dL/dl (autograd through
        policy_loss, on CPU) gives sum(c * l) whose gradient in the weights is exactly L's at this
        point; micro-batches of any rows then train on that per-token surrogate. Costs one more
        forward than whole-group micro-batches. Returns the coefficients [B, S] and L's value."""
        algo = self.algo.resolved()
        current, _ = self.compute_logprobs({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]})
        self.model.train()
        current = current.double().requires_grad_()
        loss, _ = policy_loss(
            "infonca", current, batch["old_logprobs"].double(), batch["rewards"].double(),
            batch["correct_rate"].double(), batch["loss_mask"].double(), agg="token_sum_norm", agg_norm=norm,
            group_size=group_size, beta=algo.beta, sft_coef=algo.sft_coef, target_temperature=algo.target_temperature,
        )
        (coef,) = torch.autograd.grad(loss, current)
        return {"coef": coef.float(), "loss": float(loss)}

    def _surrogate_loss(self, mb: dict, logprobs: torch.Tensor, entropy: torch.Tensor, undo: int):
        """A micro-batch's share of the split-group surrogate sum(c * l), with the per-token stats the
        step reports (ratios to the old policy, entropy, token counts)."""
        mask = mb["loss_mask"].float()
        valid = mask > 0
        surrogate = (mb["coef"] * torch.where(valid, logprobs.float(), 0.0)).sum()
        ratio = torch.exp(torch.where(valid, logprobs.detach().float() - mb["old_logprobs"].float(), 0.0))
        none = torch.tensor(-math.inf, device=mask.device)
        sums = {
            "loss": surrogate.detach().clone(),
            "entropy_sum": (entropy.detach() * mask).sum(),
            "tokens": valid.sum().float(),
            "ratio_sum": (ratio * valid).sum(),
            "neg_tokens": (valid & (mb["rewards"].float()[:, None] <= 0.5)).sum().float(),
            "neg_floor_tokens": torch.zeros((), device=mask.device),
            "clip_tokens": torch.zeros((), device=mask.device),
            "neg_ratio_min": -ratio[valid].min() if valid.any() else none,
            "ratio_max": ratio[valid].max() if valid.any() else none,
        }
        return surrogate * undo, sums

    def _grads_finite(self) -> bool:
        """Whether every gradient on every rank is finite (one all-reduce over the world).

        The buffer is checked FINITE_CHECK_CHUNK elements at a time: torch.isfinite on a whole
        multi-GB buffer would hold ~7 bytes of temporaries per element (megatron_nft.plan models
        this phase). The flag stays on the device until the one all-reduce, so no per-chunk sync."""
        bad = torch.zeros(1, device=self.device)
        for buffer in self.model.buffers:
            for chunk in buffer.grad_data.view(-1).split(FINITE_CHECK_CHUNK):
                bad += ~torch.isfinite(chunk).all()
        if dist.is_initialized():
            dist.all_reduce(bad)
        return bad.item() == 0

    def _reduce_step_stats(self, outputs: list[dict]) -> tuple[dict, dict]:
        """The micro-batches' loss stats summed (and maxed) over micro-batches and data-parallel ranks,
        the same on every rank."""
        keys = ["loss", "entropy_sum", "tokens", "ratio_sum", "neg_tokens", "neg_floor_tokens", "clip_tokens"]
        max_keys = ["neg_ratio_min", "ratio_max"]
        local = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        local_max = torch.full((len(max_keys),), -math.inf, dtype=torch.float64, device=self.device)
        if self.last_stage:
            for o in outputs:
                for i, k in enumerate(keys):
                    local[i] += o[k].double()
                for i, k in enumerate(max_keys):
                    local_max[i] = torch.maximum(local_max[i], o[k].double())
        local = self._broadcast_from_last_stage(local, (len(keys),), torch.float64)
        local_max = self._broadcast_from_last_stage(local_max, (len(max_keys),), torch.float64)
        if self.dp > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(local, group=ps.get_data_parallel_group())
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return dict(zip(keys, local.tolist())), dict(zip(max_keys, local_max.tolist()))

    # ------------------------------------------------------------------------------------------------
    # checkpoints (megatron-core dist_checkpointing, torch_dist format: loadable at another TP/PP)
    # ------------------------------------------------------------------------------------------------

    def _sharded_state_dict(self, *, is_loading: bool, with_optimizer: bool) -> dict:
        model_sd = self.model.module.sharded_state_dict()
        state = {"model": model_sd}
        if with_optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
            )
        return state

    def save_checkpoint(self, directory: str | Path, *, with_optimizer: bool = True) -> None:
        """All ranks call this; `directory` must exist and be empty."""
        from megatron.core import dist_checkpointing

        if with_optimizer:
            self._materialize_optimizer_state()  # a run saved before its first update
        with runtime.megatron_device_compat():
            dist_checkpointing.save(self._sharded_state_dict(is_loading=False, with_optimizer=with_optimizer), str(directory))
        if runtime.is_main_rank():
            (Path(directory) / "actor_state.json").write_text(
                json.dumps({"steps": self.steps, "adam_step": self._adam_step(), "scheduler": self.scheduler.state_dict()})
            )

    def _materialize_optimizer_state(self) -> None:
        """A fresh torch Adam has no per-parameter state until its first step, and the distributed
        optimizer's state_dict() (distrib_optimizer.py, the path without apex/TE) reads each state's
        'step' to save or to build the sharded dict to load into. Give every parameter the state
        Adam's first step would create (zero moments, step 0): numerically the same optimizer."""
        for torch_opt in self._torch_optimizers():
            for group in torch_opt.param_groups:
                for p in group["params"]:
                    state = torch_opt.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p.data)
                        state["exp_avg_sq"] = torch.zeros_like(p.data)

    def _torch_optimizers(self):
        return [inner.optimizer for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]

    def _adam_step(self) -> int:
        steps = {int(st["step"]) for opt in self._torch_optimizers() for st in opt.state.values() if "step" in st}
        return steps.pop() if len(steps) == 1 else 0

    def _restore_adam_steps(self, step: int) -> None:
        """Without apex/TE, DistributedOptimizer.load_state_dict gives every parameter's torch-Adam
        state one shared 'step' tensor, and the parameter-state copy that follows can overwrite it;
        torch's Adam would then increment the shared tensor once per parameter. The step count is
        saved beside the checkpoint and restored here, one tensor per parameter."""
        for opt in self._torch_optimizers():
            for state in opt.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(float(step))

    def load_checkpoint(self, directory: str | Path, *, with_optimizer: bool = True) -> None:
        from megatron.core import dist_checkpointing

        from megatron_nft.checkpoint_trust import check_torch_dist_index

        check_torch_dist_index(directory)  # before torch unpickles it
        if with_optimizer:
            self._materialize_optimizer_state()
        with runtime.megatron_device_compat():
            loaded = dist_checkpointing.load(
                self._sharded_state_dict(is_loading=True, with_optimizer=with_optimizer), str(directory)
            )
            self.model.module.load_state_dict(loaded["model"])
            if with_optimizer:
                # Copies into views of the fp32 parameters: must not be recorded by autograd.
                with torch.no_grad():
                    self.optimizer.load_state_dict(loaded["optimizer"])
            else:
                self.optimizer.reload_model_params()
        meta = json.loads((Path(directory) / "actor_state.json").read_text())
        self.steps = meta["steps"]
        if with_optimizer:
            self._restore_adam_steps(meta["adam_step"])
            self.scheduler.load_state_dict(meta["scheduler"])
