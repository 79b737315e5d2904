"""One rank's stage of the Qwen2 model as a megatron-core GPTModel, and its ways in and out.

The one place where the model is built (for a shape, a parallel layout and execution options), filled
from Hugging Face tensors, exported back to Hugging Face tensors (tensor-parallel gather and pipeline
broadcast), saved and loaded as a torch_dist checkpoint (weights only), and run for full-vocabulary
logits. The actor wraps `bundle.model` in megatron-core's DDP and optimizer; the checkpoint tools
(hf_to_megatron, megatron_to_hf, verify) use a bundle alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_nft import megatron_workarounds, runtime
from megatron_nft.model import mapping
from megatron_nft.model.qwen2 import ModelOptions, Qwen2Shape, build_gpt_model, te_available, transformer_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_schedule(model, forward_step, micro: list, *, seq_length: int, micro_batch_size: int, forward_only: bool) -> list:
    """megatron-core's forward/backward schedule (pipelined when PP > 1) over the micro-batches;
    `model` is the GPTModel or its DDP wrapper."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with runtime.megatron_device_compat():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[model],
            num_microbatches=len(micro),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


@dataclass
class ModelBundle:
    shape: Qwen2Shape
    options: ModelOptions  # resolved for this machine ("auto" decided)
    dtype: torch.dtype
    tp: int
    pp: int
    cp: int
    tp_rank: int
    pp_rank: int
    first_stage: bool
    last_stage: bool
    config: object  # megatron-core TransformerConfig
    model: torch.nn.Module  # this rank's GPTModel stage
    device: torch.device

    @classmethod
    def build(
        cls,
        shape: Qwen2Shape,
        *,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        dtype: str = "fp32",
        options: ModelOptions = ModelOptions(),
        seed: int = 1234,
        initialize: bool = True,
    ) -> ModelBundle:
        """(Re)initialises Megatron's parallel state for the layout (which ends any model built before in
        this process) and builds this rank's stage. `initialize=False` skips the random init, for
        callers that overwrite every parameter (a load). A setting this machine cannot run is a
        ConfigError."""
        from megatron.core import parallel_state as ps

        shape.check_parallel(tp, pp)
        torch_dtype = DTYPES[dtype]
        resolved = options.resolved(cuda=runtime.CUDA, te=te_available(), dtype=torch_dtype,
                                    num_layers=shape.num_layers, pp=pp)
        runtime.init_model_parallel(runtime.ParallelLayout(tp=tp, pp=pp, cp=cp), seed)
        device = runtime.device()
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        with runtime.megatron_device_compat():
            config = transformer_config(shape, dtype=torch_dtype, tp=tp, pp=pp, cp=cp, options=resolved)
            if not initialize:
                config.perform_initialization = False
            model = build_gpt_model(shape, config, tp=tp, options=resolved, pre_process=first, post_process=last)
            model = model.to(device)
        return cls(shape=shape, options=resolved, dtype=torch_dtype, tp=tp, pp=pp, cp=cp,
                   tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                   first_stage=first, last_stage=last, config=config, model=model, device=device)

    @property
    def layers_per_stage(self) -> int:
        return self.shape.num_layers // self.pp

    @property
    def layer_offset(self) -> int:
        return self.pp_rank * self.layers_per_stage

    def _rule_table(self) -> dict:
        return mapping.rules_by_megatron_name(
            self.shape, use_te=self.options.use_te, layer_offset=self.layer_offset,
            num_local_layers=self.layers_per_stage, first_stage=self.first_stage, last_stage=self.last_stage,
        )

    # ------------------------------------------------------------------------------------------------
    # Hugging Face weights in and out
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_hf(self, fetch: Callable[[str], torch.Tensor]) -> None:
        """Fills this rank's stage from an HF Qwen2 checkpoint, one mapping rule at a time (a rank holds
        its stage plus about one layer of HF tensors); `fetch(name)` returns one HF tensor. Every
        parameter is filled, or this raises."""
        params = dict(self.model.named_parameters())
        unmapped = sorted(set(params) - set(self._rule_table()))
        if unmapped:
            raise RuntimeError(f"no HF mapping for Megatron parameters {unmapped}")
        filled = set()
        for name, shard in mapping.megatron_shard_state(
            self.shape, fetch, tp_rank=self.tp_rank, tp=self.tp, layer_offset=self.layer_offset,
            num_local_layers=self.layers_per_stage, first_stage=self.first_stage, last_stage=self.last_stage,
            use_te=self.options.use_te,
        ):
            param = params[name]
            if param.shape != shard.shape:
                raise ValueError(f"{name}: HF gives shape {tuple(shard.shape)}, Megatron expects {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))
            filled.add(name)
            del shard
        if set(params) - filled:
            raise RuntimeError(f"parameters left unfilled: {sorted(set(params) - filled)}")

    def _exported_params(self) -> list[tuple[torch.nn.Parameter, mapping.Rule, tuple[str, ...]]]:
        table = self._rule_table()
        out = []
        for name, param in self.model.named_parameters():
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

    def hf_tensors(self, device: str | torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for the whole model, on global rank 0; every rank calls this.

        On global rank 0 the result is a lazy stream: each tensor is gathered when the consumer asks
        for it, so no rank holds more than one gathered parameter beyond its own shard. The other ranks
        take part in every collective of the stream within this call and get an empty iterator, so no
        caller drains anything. Rank 0's consumer must read the stream to its end (the other ranks wait
        in the collectives until it does).

        Tensors are copies on `device`, by default the model's own: the GPU transports (NCCL
        broadcast, CUDA IPC) send from GPU memory, and a host round trip per tensor would only slow
        every sync; the disk transport moves each bucket to the host itself."""
        stream = self._export_stream(torch.device(device) if device is not None else self.device)
        if dist.get_rank() == 0:
            return stream
        for _ in stream:  # yields nothing here: this rank's part is the collectives
            pass
        return iter(())

    @property
    def stage_source(self) -> bool:
        """Whether this rank sends its pipeline stage's weights in a per-stage sync: tensor-, data-
        and context-parallel rank 0 of its stage (one rank per stage; global rank 0 for stage 0)."""
        from megatron.core import parallel_state as ps

        return self.tp_rank == 0 and ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0

    def stage_tensors(self, device: str | torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of this rank's pipeline stage only, on the stage's source rank
        (`stage_source`); every rank calls this. The stages together give `hf_tensors()`'s set, each
        tensor once (a tied output layer comes from the first stage's embedding).

        As `hf_tensors`, a lazy stream on the source (its consumer must read it to the end) and an
        empty iterator elsewhere, after this rank's part of the tensor-parallel gathers. Nothing
        crosses the pipeline: each stage's source can hand its own tensors to the transport while
        the other stages do the same."""
        stream = self._stage_stream(torch.device(device) if device is not None else self.device)
        if self.stage_source:
            return stream
        for _ in stream:  # yields nothing here: this rank's part is the tensor-parallel gathers
            pass
        return iter(())

    @torch.no_grad()
    def _stage_stream(self, target: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        from megatron.core import parallel_state as ps

        # only the tensor-parallel group of the stage's source gathers; other replicas hold the same
        if ps.get_data_parallel_rank() != 0 or ps.get_context_parallel_rank() != 0:
            return
        source = self.tp_rank == 0
        for item in self._exported_params():
            pairs = self._gathered(*item)
            if source:
                # copy: with TP=1 the "gathered" tensor is the live parameter, which training changes
                yield from ((n, t.to(target, copy=True)) for n, t in pairs)

    @torch.no_grad()
    def _export_stream(self, target: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """One parameter at a time is all-gathered over tensor parallelism and, with pipeline
        parallelism, sent from its stage to global rank 0, which yields it."""
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
    # torch_dist checkpoints, weights only (the actor adds its optimizer: Actor.save_checkpoint)
    # ------------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """All ranks call this; `directory` must exist and be empty."""
        from megatron.core import dist_checkpointing

        with runtime.megatron_device_compat():
            megatron_workarounds.results_queue_that_dies_with_us()
            dist_checkpointing.save(self.model.sharded_state_dict(), str(directory))

    def load(self, directory: str | Path) -> None:
        """The weights of a torch_dist checkpoint saved at any layout (its optimizer state, if any, is
        not read)."""
        from megatron.core import dist_checkpointing

        from megatron_nft.checkpoint_trust import check_torch_dist_index

        check_torch_dist_index(directory)  # before torch unpickles it
        with runtime.megatron_device_compat():
            loaded = dist_checkpointing.load(self.model.sharded_state_dict(), str(directory))
            self.model.load_state_dict(loaded)

    # ------------------------------------------------------------------------------------------------
    # full-vocabulary logits (checkpoints_tools.verify)
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits [B, S, vocab] of causal rows `tokens` [B, S] on global rank 0 (None elsewhere):
        one forward through megatron-core's schedule, the TP shards all-gathered on the last stage, then
        sent down the pipeline group. Every rank calls it with the same tokens."""
        from megatron.core import parallel_state as ps

        batch, seq = tokens.shape
        tokens = tokens.to(self.device)
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=self.device), diagonal=1)[None, None]
        positions = torch.arange(seq, device=self.device).expand(batch, seq)

        def forward_step(data_iterator, model):
            output = model(next(data_iterator), positions, causal)

            def collect(out):
                return out.sum() * 0.0, {"logits": out.detach().float().clone()}

            return output, collect

        was_training = self.model.training
        self.model.eval()
        try:
            outputs = run_schedule(self.model, forward_step, [tokens], seq_length=seq, micro_batch_size=batch,
                                   forward_only=True)
        finally:
            self.model.train(was_training)
        vocab = self.shape.vocab_size
        if self.last_stage:
            local = outputs[0]["logits"].contiguous()
            if self.tp > 1:
                parts = [torch.empty_like(local) for _ in range(self.tp)]
                dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
                local = torch.cat(parts, dim=-1)
            full = local[..., :vocab].contiguous()
        else:
            full = torch.empty(batch, seq, vocab, dtype=torch.float32, device=self.device)
        if self.pp > 1:
            dist.broadcast(full, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return full.cpu() if dist.get_rank() == 0 else None
