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
that many tokens, balanced over data-parallel ranks (microbatches.MicroBatchPlan, model.packed_stream);
each micro-batch's per-token outputs are put back to [rows, S] before its loss function sees them, so
losses are computed the same way on both paths. Context parallel (cp > 1) runs on packed micro-batches.

Parts: the model itself (build, HF weights in and out, logits) is a model.bundle.ModelBundle, the
micro-batching a microbatches.MicroBatchPlan (`actor.microbatches`), the state beside a checkpoint an
actor_state.ActorState. An actor lives until close() (or the end of a `with` block): Megatron's
parallel state is per process, so building another actor ends this one's process groups, and close()
frees its model (see megatron_workarounds.release_ddp).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_nft import megatron_workarounds, runtime
from megatron_nft.actor_state import ActorState
from megatron_nft.algorithms import LossOptions, MicroBatchReduction, StepStats, algorithm, policy_loss, token_stats
from megatron_nft.config import AlgoConfig, OptimConfig
from megatron_nft.errors import ConfigError
from megatron_nft.microbatches import LocalRows, MicroBatchPlan, alignment
from megatron_nft.model.bundle import DTYPES, ModelBundle, run_schedule  # noqa: F401 - DTYPES: the actor's dtypes
from megatron_nft.model.qwen2 import ModelOptions, Qwen2Shape

FINITE_CHECK_CHUNK = 1 << 24  # gradient elements per isfinite call in grads_finite (~112 MiB of temporaries)
# what a minibatch's micro-batches carry into the loss (reward_std only when the batch has it)
_TRAIN_KEYS = ("tokens", "loss_mask", "old_logprobs", "rewards", "correct_rate", "reward_std")


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

        check_packing(cp, max_tokens_per_micro_batch)  # the layout's divisibility: ModelBundle.build
        self.shape, self.algo, self.temperature = shape, algo, temperature
        # "auto" options settle here, for this machine; a setting it cannot run is a ConfigError
        self.bundle = ModelBundle.build(shape, tp=tp, pp=pp, cp=cp, dtype=dtype, options=options, seed=seed)
        bundle = self.bundle
        self.dtype, self.device, self.options = bundle.dtype, bundle.device, bundle.options
        self.use_te = self.options.use_te
        self.tp, self.pp, self.cp = tp, pp, cp
        self.tp_rank, self.pp_rank = bundle.tp_rank, bundle.pp_rank
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.first_stage, self.last_stage = bundle.first_stage, bundle.last_stage
        self.config = bundle.config
        self.micro_batch_size = micro_batch_size
        # how every batch becomes this rank's micro-batches: right-padded rows, micro_batch_size at a
        # time, or (with a token budget) packed THD micro-batches
        self.microbatches = MicroBatchPlan(
            dp=self.dp, dp_rank=self.dp_rank, micro_batch_size=micro_batch_size,
            max_tokens=max_tokens_per_micro_batch,
            align=alignment(tp=tp, cp=cp, fp8=self.options.fp8, fp8_recipe=self.options.fp8_recipe,
                            sequence_parallel=self.config.sequence_parallel),
            pp=pp, cp_group=ps.get_context_parallel_group() if cp > 1 else None, device=self.device,
        )
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch

        with runtime.megatron_device_compat():
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
            )
            self.model = DistributedDataParallel(self.config, ddp_config, bundle.model)
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
        self.closed = False

    def close(self) -> None:
        """Frees this actor's model, gradient buffers and process-group handles as soon as nothing else
        refers to them (megatron_workarounds.release_ddp); the actor is unusable afterwards. Idempotent."""
        if not self.closed:
            megatron_workarounds.release_ddp(self.model, self.config)
            self.closed = True

    def __enter__(self) -> Actor:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_hf(self, fetch: Callable[[str], torch.Tensor]) -> None:
        """Loads this rank's shard of an HF Qwen2 checkpoint; `fetch(name)` returns one HF tensor."""
        self.bundle.load_hf(fetch)
        # The distributed optimizer keeps fp32 main copies of bf16/fp16 params: refresh them.
        self.optimizer.reload_model_params()

    def hf_tensors(self, device: str | torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for the whole model on global rank 0, an empty iterator elsewhere.

        Every rank calls it; the other ranks' part of the collectives is done within the call, so
        callers never drain anything, and rank 0 reads the stream to its end (ModelBundle.hf_tensors).
        Tensors are copies on `device`, by default the actor's own."""
        return self.bundle.hf_tensors(device)

    @torch.no_grad()
    def weights_snapshot(self) -> list[torch.Tensor]:
        """A copy of this rank's model weights (its TP/PP shard, as the forward uses them), for log-probs
        under this version after the weights have moved on (`weights_swapped`). Costs one model copy."""
        return [p.detach().clone() for p in self.model.parameters()]

    @contextlib.contextmanager
    def weights_swapped(self, snapshot: list[torch.Tensor]):
        """Inside the block the model runs with `snapshot`'s weights; its own come back bit for bit after
        (the optimizer's fp32 main copies are never touched, so the next step is as if nothing happened).
        Exchanged in place, one parameter's temporary at a time: no second model copy."""

        @torch.no_grad()
        def exchange():
            for param, saved in zip(self.model.parameters(), snapshot, strict=True):
                current = param.detach().clone()
                param.detach().copy_(saved)
                saved.copy_(current)

        exchange()
        try:
            yield
        finally:
            exchange()

    # ------------------------------------------------------------------------------------------------
    # forward / backward
    # ------------------------------------------------------------------------------------------------

    def _run(self, micro: list[dict], loss_func_for: Callable[[dict], Callable], *, forward_only: bool) -> list[dict]:
        if self.closed:  # its gradient hooks are gone: a step would silently reduce no gradient
            raise RuntimeError("this Actor is closed: build a new one")
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

        return run_schedule(self.model, forward_step, micro, seq_length=seq_len, micro_batch_size=self.micro_batch_size,
                            forward_only=forward_only)

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
        return run_schedule(self.model, forward_step, micro, seq_length=total, micro_batch_size=1, forward_only=forward_only)

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
        micro, total = self.microbatches.split({k: batch[k] for k in ("tokens", "loss_mask") if k in batch})

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

    @torch.no_grad()
    def compute_logprobs_local(self, local: LocalRows, *, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies [n, S] of this rank's rows of a minibatch (`local`: its
        rows, their places in the minibatch, every row's needed length), under the current weights,
        on the micro-batches `train_step_local` cuts for them (`group_size` as its whole groups): no
        data-parallel communication, every rank of this data-parallel rank gets them."""
        self.model.eval()
        rows, seq_len = local.batch["tokens"].shape
        if not rows:  # no forward: this rank's replicas hold the same (no) rows, and nothing here is collective over DP
            empty = torch.zeros((0, seq_len))
            return empty, empty.clone()
        # 1-based row numbers ride along, so that outputs find their rows (0: a zero row of the plan)
        numbered = {"tokens": local.batch["tokens"], "loss_mask": local.batch["loss_mask"],
                    "local_row": torch.arange(1, rows + 1)}
        micro, _ = self.microbatches.split_local(LocalRows(numbered, local.positions, local.lengths), group_size=group_size)

        def loss_func_for(mb):
            def collect(output):
                return output.sum() * 0.0, {"logprobs_entropy": output.detach().clone()}

            return collect

        outputs = self._run(micro, loss_func_for, forward_only=True) if micro else []
        full = torch.zeros((2, rows, seq_len), dtype=torch.float32, device=self.device) if self.last_stage else None
        if self.last_stage:
            for mb, out in zip(micro, outputs):
                real = mb["local_row"] > 0
                full[:, mb["local_row"][real] - 1] = out["logprobs_entropy"][:, real, :seq_len].float()
        full = self._broadcast_from_last_stage(full, (2, rows, seq_len), torch.float32).cpu()
        full[:, :, -1] = 0.0
        return full[0], full[1]

    @property
    def replica_leader(self) -> bool:
        """Whether this rank is the first of the ranks that hold its data-parallel rank's rows (its
        TP x PP x CP ranks): the one that reports them, once."""
        from megatron.core import parallel_state as ps

        cp_rank = ps.get_context_parallel_rank() if self.cp > 1 else 0
        return self.tp_rank == 0 and self.pp_rank == 0 and cp_rank == 0

    @property
    def replica_group(self):
        """The group of the ranks that hold this data-parallel rank's rows, for batch_shards to
        broadcast them within: megatron-core's model-parallel group (TP x PP). None when this rank is
        alone in it, and under context parallel (that group leaves the CP ranks out: rank 0 then
        sends to each of them itself)."""
        from megatron.core import parallel_state as ps

        if self.cp > 1 or self.tp * self.pp == 1:
            return None
        return ps.get_model_parallel_group()

    def keeps_groups_whole(self, lengths, group_size: int) -> bool:
        """Whether a minibatch of rows of these needed lengths trains with whole groups per
        micro-batch (a group-coupled loss whose groups fit), rather than through the split pre-pass."""
        return algorithm(self.algo.resolved().name).couples_group and self.microbatches.groups_fit_lengths(lengths, group_size)

    def aggregation_norm(self, loss_mask: torch.Tensor, group_size: int | None) -> float:
        """The divisor that makes the step's sum the algorithm's aggregation over a whole minibatch of
        this `loss_mask` (token_mean: its token count; group_mean: its groups with tokens), additive
        over micro-batches and ranks; see algorithms.policy_loss."""
        algo = self.algo.resolved()
        if algo.agg == "token_sum_norm":
            return algo.agg_norm * algo.reference_dp_world  # the official trainer's DP gradient averaging
        if algo.agg == "token_mean":
            return max(float(loss_mask.sum()), 1.0)
        return max(float(self._groups_with_tokens(loss_mask, group_size)), 1.0)

    @property
    def needs_aggregation_norm(self) -> bool:
        """Whether aggregation_norm reads the minibatch (else it is a constant)."""
        return self.algo.resolved().agg != "token_sum_norm"

    @staticmethod
    def _groups_with_tokens(loss_mask: torch.Tensor, group_size: int | None) -> int:
        if group_size is None or loss_mask.shape[0] % group_size:
            raise ValueError(f"agg=group_mean needs whole groups: {loss_mask.shape[0]} rows, group_size={group_size}")
        return int((loss_mask.view(-1, group_size, loss_mask.shape[1]).sum(dim=(1, 2)) > 0).sum())

    def train_step_local(self, local: LocalRows, *, group_size: int, norm: float,
                         split_loss: float | None = None) -> dict[str, float]:
        """train_step on a minibatch of which this data-parallel rank holds only its rows (`local`,
        as train_step's batch: tokens, loss_mask, old_logprobs, rewards, correct_rate, optional
        reward_std), with what needs the whole minibatch given: `norm` (aggregation_norm of the whole
        minibatch's loss mask, the same on every rank). The micro-batches, and so the update, are
        train_step's on the whole minibatch. A group-coupled loss whose groups do not fit
        (keeps_groups_whole false) needs the split pre-pass's result, which reads the whole
        minibatch: its rows' coefficients as `coef` in the batch and the loss's value `split_loss`
        (split_coefficients, on rank 0)."""
        algo = self.algo.resolved()
        couples_group = algorithm(algo.name).couples_group
        whole = couples_group and self.keeps_groups_whole(local.lengths, group_size)
        split = None
        if couples_group and not whole:
            if "coef" not in local.batch or split_loss is None:
                raise ValueError(f"train_step_local: {algo.name} with groups that do not fit a micro-batch needs "
                                 f"the split pre-pass's coef and split_loss")
            split = {"loss": split_loss}
        keys = [k for k in _TRAIN_KEYS if k in local.batch] + (["coef"] if split is not None else [])
        micro, _ = self.microbatches.split_local(LocalRows({k: local.batch[k] for k in keys}, local.positions, local.lengths),
                                                 group_size=group_size if whole else None)
        return self._train_on(micro, norm=norm, group_size=group_size, split=split)

    def train_step(self, batch: dict, *, group_size: int | None = None) -> dict[str, float]:
        """One optimizer step on a minibatch: returns loss, grad norm, lr and the loss stats.

        `group_size` (K answers per prompt, rows grouped contiguously) is needed by a loss that couples a
        prompt's answers (InfoNCA): micro-batches hold whole groups when they fit, else the step is
        split (see _split_group_coefficients). An optional `reward_std` [B] in the batch feeds
        GRPO/DAPO's advantage when rewards are shaped. The stats are algorithms.StepStats' fields,
        reduced over micro-batches and data-parallel ranks as it declares."""
        self.model.train()
        algo = self.algo.resolved()
        couples_group = algorithm(algo.name).couples_group
        # token_mean (group_mean) over the whole minibatch == a sum divided by the minibatch's token
        # (group) count, which is additive over micro-batches and ranks; see algorithms.policy_loss.
        norm = self.aggregation_norm(batch["loss_mask"], group_size)
        if couples_group and group_size is None:
            raise ValueError(f"{algo.name} needs group_size (the K answers of a prompt are contrasted)")
        keys = [k for k in _TRAIN_KEYS if k in batch]
        # Only a group-coupled loss contrasts a prompt's rows: micro-batches keep its groups whole when
        # they fit, else every row gets its exact per-token loss gradient from a forward pass first.
        whole_groups = group_size if couples_group and self.microbatches.groups_fit(batch, group_size) else None
        split = None
        if couples_group and whole_groups is None:
            split = self._split_group_coefficients(batch, group_size, norm)
            batch = {**batch, "coef": split["coef"]}
            keys.append("coef")
        micro, _ = self.microbatches.split({k: batch[k] for k in keys}, group_size=whole_groups)
        return self._train_on(micro, norm=norm, group_size=group_size, split=split)

    def _train_on(self, micro: list[dict], *, norm: float, group_size: int | None, split: dict | None = None) -> dict[str, float]:
        """The optimizer step on this rank's micro-batches of a minibatch (train_step, train_step_local)."""
        self.model.train()
        algo = self.algo.resolved()
        # Megatron's schedule divides each micro-batch loss by the number of micro-batches and DDP
        # averages gradients over data-parallel ranks; undo both so the gradient is that of the
        # minibatch loss itself, whatever the micro-batching and parallel layout.
        undo = len(micro) * self.dp
        options = LossOptions.from_config(algo, agg="token_sum_norm", agg_norm=norm, group_size=group_size)

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
                    reward_std=mb["reward_std"].float() if "reward_std" in mb else None,
                    **options.kwargs(),
                )
                return loss * undo, {**stats, "entropy_sum": (entropy.detach() * mb["loss_mask"].float()).sum()}

            return loss_func

        with runtime.megatron_device_compat():
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            outputs = self._run(micro, loss_func_for, forward_only=False)
        totals = self._reduce_step_stats(outputs)
        if split is not None:
            totals["loss"] = split["loss"]  # the surrogate's value is not the loss; the pre-pass's is
        # A non-finite loss or gradient skips the update on every rank (they all see the same totals and
        # the same all-reduced gradient check), as Megatron-LM skips an fp16 step that overflowed; the
        # scheduler does not advance either. The caller decides when too many skips end the run.
        finite = math.isfinite(totals["loss"]) and self.grads_finite()
        update_ok, grad_norm = False, float("nan")
        if finite:
            with runtime.megatron_device_compat():
                update_ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.steps += 1
        stats = StepStats(
            **totals,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
        )
        return {**stats.as_dict(), "update_ok": bool(update_ok), "nonfinite": not finite, "tokens": totals["num_tokens"]}

    def _split_group_coefficients(self, batch: dict, group_size: int, norm: float) -> dict:
        """A group-coupled loss (InfoNCA) when a group does not fit a micro-batch: its loss L couples the K
        answers of a prompt only through their sequence log-probs, so with the per-token log-probs l of the whole minibatch
        under the current weights (one forward pass, no activations kept), c = dL/dl (autograd through
        policy_loss, on CPU) gives sum(c * l) whose gradient in the weights is exactly L's at this
        point; micro-batches of any rows then train on that per-token surrogate. Costs one more
        forward than whole-group micro-batches. Returns the coefficients [B, S] and L's value."""
        current, _ = self.compute_logprobs({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]})
        self.model.train()
        return self.split_coefficients(current, batch, group_size, norm)

    def split_coefficients(self, current: torch.Tensor, batch: dict, group_size: int, norm: float) -> dict:
        """_split_group_coefficients from the minibatch's log-probs `current` [B, S] under the current
        weights (pure CPU autograd: where the rows are spread over ranks, rank 0 runs it on values
        gathered to it). The loss reads `current` at loss positions only."""
        algo = self.algo.resolved()
        current = current.double().requires_grad_()
        options = LossOptions.from_config(algo, agg="token_sum_norm", agg_norm=norm, group_size=group_size)
        loss, _ = policy_loss(
            algo.name, current, batch["old_logprobs"].double(), batch["rewards"].double(),
            batch["correct_rate"].double(), batch["loss_mask"].double(),
            reward_std=batch["reward_std"].double() if "reward_std" in batch else None, **options.kwargs(),
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
        positive = mb["rewards"].float()[:, None] > 0.5
        stats = token_stats(surrogate, ratio, valid, valid & positive, valid & ~positive)
        return surrogate * undo, {**stats, "entropy_sum": (entropy.detach() * mask).sum()}

    def grads_finite(self) -> bool:
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

    def _reduce_step_stats(self, outputs: list[dict]) -> dict[str, float]:
        """The micro-batches' stats reduced over micro-batches and data-parallel ranks as StepStats
        declares (sums and means summed, min / max as maxima), the same on every rank."""
        reduction = MicroBatchReduction(StepStats)
        local, local_max = reduction.local(outputs if self.last_stage else [], device=self.device)
        local = self._broadcast_from_last_stage(local, tuple(local.shape), torch.float64)
        local_max = self._broadcast_from_last_stage(local_max, tuple(local_max.shape), torch.float64)
        if self.dp > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(local, group=ps.get_data_parallel_group())
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return reduction.finish(local, local_max)

    # ------------------------------------------------------------------------------------------------
    # checkpoints (megatron-core dist_checkpointing, torch_dist format: loadable at another TP/PP)
    # ------------------------------------------------------------------------------------------------

    def _sharded_state_dict(self, *, is_loading: bool, with_optimizer: bool) -> dict:
        model_sd = self.bundle.model.sharded_state_dict()
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
            megatron_workarounds.materialize_adam_state(self.optimizer)  # a run saved before its first update
        with runtime.megatron_device_compat():
            megatron_workarounds.results_queue_that_dies_with_us()
            dist_checkpointing.save(self._sharded_state_dict(is_loading=False, with_optimizer=with_optimizer), str(directory))
        if runtime.is_main_rank():
            ActorState.capture(steps=self.steps, optimizer=self.optimizer, scheduler=self.scheduler).write(directory)

    def load_checkpoint(self, directory: str | Path, *, with_optimizer: bool = True) -> None:
        from megatron.core import dist_checkpointing

        from megatron_nft.checkpoint_trust import check_torch_dist_index

        state = ActorState.read(directory, with_optimizer=with_optimizer)  # before any tensor is read
        check_torch_dist_index(directory)  # before torch unpickles it
        if with_optimizer:
            megatron_workarounds.materialize_adam_state(self.optimizer)  # the states to load into
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
        self.steps = state.steps
        if with_optimizer:
            state.restore_optimizer(self.optimizer, self.scheduler)
