"""Qwen2 / Qwen2.5 as a megatron-core GPTModel: HF config -> TransformerConfig, layer spec, model.

Only what Megatron supports faithfully is accepted; anything else (rope scaling, sliding window, a
non-SiLU activation) is refused with the field named, because a silently different model wastes a run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from megatron_nft.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2",)


@dataclass(frozen=True)
class Qwen2Shape:
    """The architecture fields of an HF Qwen2 config that the Megatron model and the mapping need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float = 0.02

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Rows of the (vocab-parallel) embedding: the vocabulary rounded up to a multiple of TP.

        Padded rows are zero on import, stripped on export, and masked out of every log-softmax."""
        return int(math.ceil(self.vocab_size / tp) * tp)

    def parallel_problems(self, tp: int, pp: int, tp_name: str = "parallel.tp=", pp_name: str = "parallel.pp=") -> list[str]:
        """Why a TP x PP layout cannot split this model (megatron-core would refuse it); empty when it
        can. The one home of this rule: the config, the converters and the planner all ask here.
        `tp_name`/`pp_name` say how the caller spells the setting ("parallel.tp=", "--tp ", "TP ")."""
        out = [f"{name}{value}: expected a positive integer" for name, value in ((tp_name, tp), (pp_name, pp)) if value < 1]
        if out:
            return out
        for count, what in ((self.num_kv_heads, f"the model's {self.num_kv_heads} key/value heads"),
                            (self.num_heads, f"the model's {self.num_heads} attention heads"),
                            (self.intermediate_size, f"intermediate_size={self.intermediate_size}")):
            if count % tp:
                out.append(f"{tp_name}{tp} does not divide {what}")
        if self.num_layers % pp:
            out.append(f"{pp_name}{pp} does not divide the model's {self.num_layers} layers")
        return out

    def check_parallel(self, tp: int, pp: int, tp_name: str = "parallel.tp=", pp_name: str = "parallel.pp=") -> None:
        """A ConfigError with the first of parallel_problems."""
        problems = self.parallel_problems(tp, pp, tp_name, pp_name)
        if problems:
            raise ConfigError(problems[0])


def _get(cfg, name, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def shape_from_hf(cfg) -> Qwen2Shape:
    """Reads an HF Qwen2 config (a transformers PretrainedConfig or its dict) and refuses what Megatron
    would not reproduce exactly."""
    model_type = _get(cfg, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"HF config model_type={model_type!r}: supported are {list(SUPPORTED_MODEL_TYPES)}")
    if _get(cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"HF config hidden_act={_get(cfg, 'hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    if _get(cfg, "use_sliding_window", False):
        raise ConfigError("HF config use_sliding_window=true: sliding-window attention is not supported")
    rope = _get(cfg, "rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = _get(cfg, "rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ConfigError(f"HF config rope scaling {scaling or rope!r}: only the default RoPE is supported")
    if float(rope.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ConfigError("HF config partial_rotary_factor != 1: only full rotary embeddings are supported")
    # Qwen2 has biases on q/k/v only; a config asking for others (or for none) describes another model.
    if _get(cfg, "attention_bias") is not None and not _get(cfg, "attention_bias"):
        raise ConfigError("HF config attention_bias=false: Qwen2 (and this Megatron model) has q/k/v biases")
    if _get(cfg, "mlp_bias"):
        raise ConfigError("HF config mlp_bias=true: MLP biases are not supported (Qwen2 has none)")
    other = sorted({t for t in (_get(cfg, "layer_types") or []) if t != "full_attention"})
    if other:
        raise ConfigError(f"HF config layer_types contains {other}: only 'full_attention' layers are supported")
    if _get(cfg, "quantization_config"):
        raise ConfigError("HF config quantization_config is set: quantized checkpoints are not supported")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings"):
        value = _get(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"HF config {field}={value!r}: expected a positive integer")
    rope_theta = rope.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    hidden, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    kv_heads = _get(cfg, "num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"HF config num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return Qwen2Shape(
        vocab_size=_get(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_get(cfg, "intermediate_size"),
        num_layers=_get(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_get(cfg, "head_dim") or hidden // heads,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        max_position_embeddings=_get(cfg, "max_position_embeddings"),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        initializer_range=float(_get(cfg, "initializer_range", 0.02)),
    )


def te_available() -> bool:
    """Transformer Engine layers are used only with CUDA and an importable TE (the NGC container)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


IMPLEMENTATIONS = ("auto", "te", "local")
PACKED_ATTENTION = ("auto", "flex", "dense")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
# The names megatron_nft.plan models; each maps to Megatron's recompute settings in _recompute_fields.
RECOMPUTE = ("none", "core_attn", "mlp", "full")


@dataclass(frozen=True)
class ModelOptions:
    """How the Megatron model executes: which layers, which packed-attention kernel, FP8, activation
    recompute. None of it changes the model's function beyond FP8's rounding (tests compare them).

    impl: "te" is Megatron's Transformer Engine layer spec (fused kernels, THD attention, FP8), needs
    CUDA and TE; "local" is megatron-core's own layers with model.attention.SdpaAttention as core
    attention; "auto" takes te where it can run. packed_attention (local impl, packed sequences):
    "flex" (FlexAttention with a block-sparse document mask, for GPUs) or "dense" (an explicit
    [t, t] mask, for CPU tests); "auto": flex on CUDA, dense elsewhere. fp8: None, or the TE format
    ("hybrid": e4m3 forward, e5m2 gradients) with fp8_recipe; fp8_bf16_layers keeps that many layers at
    each end of the model in bf16. The output layer and the log-probs never run in FP8 (the actor's
    fused log-probs read the output weight directly)."""

    impl: str = "auto"
    packed_attention: str = "auto"
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    fp8_bf16_layers: int = 0
    recompute: str = "none"

    def check(self, *, bf16: bool) -> None:
        """What no machine can run: unknown values, FP8 without bf16 or on Megatron's own layers, a
        negative layer count. A ConfigError naming the key; config.validate calls it at load (once: the
        actor's `resolved` decides only what depends on the machine)."""
        for key, allowed in (("model.impl", IMPLEMENTATIONS), ("model.packed_attention", PACKED_ATTENTION),
                             ("model.fp8_recipe", FP8_RECIPES), ("parallel.recompute", RECOMPUTE)):
            value = getattr(self, key.split(".")[1])
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(allowed)}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ConfigError(f"model.fp8={self.fp8!r}: allowed values are null, {', '.join(FP8_FORMATS)}")
        if self.fp8 is not None:
            if self.impl == "local":
                self._fp8_needs_te("local")
            if not bf16:
                raise ConfigError(f"model.fp8={self.fp8} needs model.dtype=bf16 (FP8 GEMMs keep bf16 master activations)")
        if self.fp8_bf16_layers < 0:
            raise ConfigError(f"model.fp8_bf16_layers={self.fp8_bf16_layers}: must be >= 0")
        # megatron-core's TransformerConfig refuses this (delayed scaling's amax history would be
        # reduced across the per-layer FP8 contexts that bf16 layers need); refused here at load
        # instead of when the actor builds its model
        if self.fp8 is not None and self.fp8_bf16_layers > 0 and self.fp8_recipe == "delayed":
            raise ConfigError(f"model.fp8_bf16_layers={self.fp8_bf16_layers} needs model.fp8_recipe tensorwise or "
                              f"blockwise: megatron-core's delayed scaling keeps no layers in bf16")

    def _fp8_needs_te(self, impl: str):
        raise ConfigError(f"model.fp8={self.fp8} needs Transformer Engine layers (model.impl=te, CUDA and "
                          f"transformer_engine); this run uses model.impl={impl}")

    def resolved(self, *, cuda: bool, te: bool, dtype: torch.dtype, num_layers: int, pp: int) -> ModelOptions:
        """The options with "auto" decided for this machine; a ConfigError for what it cannot run.
        What no machine can run is `check`'s, which config.validate runs once per run at load; callers
        that build options themselves call it first."""
        if self.impl == "te" and not te:
            raise ConfigError("model.impl=te needs CUDA and an importable transformer_engine (the NGC image); "
                              "this machine has " + ("no transformer_engine" if cuda else "no CUDA"))
        impl = self.impl if self.impl != "auto" else ("te" if te else "local")
        if self.fp8 is not None and impl != "te":
            self._fp8_needs_te(impl)
        stage_layers = num_layers // pp
        if self.fp8 is not None and self.fp8_bf16_layers > stage_layers:  # without FP8 every layer is bf16
            raise ConfigError(f"model.fp8_bf16_layers={self.fp8_bf16_layers}: expected 0..{stage_layers} "
                              f"(the layers of one pipeline stage)")
        if self.packed_attention == "flex" and not cuda:
            raise ConfigError("model.packed_attention=flex needs CUDA: torch's FlexAttention has no CPU backward "
                              "(use dense or auto)")
        attention = self.packed_attention if self.packed_attention != "auto" else ("flex" if cuda else "dense")
        return dataclasses.replace(self, impl=impl, packed_attention=attention)

    @property
    def use_te(self) -> bool:
        return self.impl == "te"


def _recompute_fields(recompute: str) -> dict:
    if recompute == "none":
        return {}
    if recompute == "full":
        # every layer's input kept, the layer recomputed in backward, one layer per checkpoint
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return dict(recompute_granularity="selective", recompute_modules=[recompute])


def _fp8_fields(options: ModelOptions) -> dict:
    if options.fp8 is None:
        return {}
    fields = dict(fp8=options.fp8, fp8_recipe=options.fp8_recipe)
    if options.fp8_bf16_layers:
        fields.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=options.fp8_bf16_layers,
                      num_layers_at_end_in_bf16=options.fp8_bf16_layers)
    return fields


def transformer_config(shape: Qwen2Shape, *, dtype: torch.dtype, tp: int, pp: int, cp: int = 1,
                       options: ModelOptions = ModelOptions(impl="local", packed_attention="dense")):
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # On CPU: build full weights and split them (the CUDA init path needs a GPU), and turn off
        # every fusion that needs CUDA kernels. On GPU, megatron-core's torch-scripted fusions stand.
        # persist_layer_norm is apex's FusedLayerNorm only: the local spec without apex uses
        # WrappedTorchNorm, which asserts it off, and TE's norms do not read it.
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **_recompute_fields(options.recompute),
        **_fp8_fields(options),
    )


def layer_spec(options: ModelOptions):
    if options.use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_nft.model.attention import SdpaAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # Megatron's local DotProductAttention refuses packed (THD) sequences and context parallel;
    # SdpaAttention does both, and equals it on padded rows (tests/test_packing.py).
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SdpaAttention, params={"packed_backend": options.packed_attention}
    )
    return spec


def build_gpt_model(shape: Qwen2Shape, config, *, tp: int, options: ModelOptions, pre_process: bool, post_process: bool):
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(options),
        vocab_size=shape.padded_vocab_size(tp),
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta) if float(shape.rope_theta).is_integer() else shape.rope_theta,
    )
