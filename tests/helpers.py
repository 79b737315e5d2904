"""Shared test fixtures: random HF Qwen2 models (no download) and HF reference computations."""

from __future__ import annotations

import torch


def random_qwen2(*, vocab=101, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, tied=False, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
    )
    model = Qwen2ForCausalLM(config).eval()
    # transformers initialises biases to zero; random ones make the QKV-bias mapping observable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return config, model


@torch.no_grad()
def hf_token_logprobs(model, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) from transformers' own forward; [B, S], last column 0."""
    logits = model(tokens).logits.float() / temperature
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.cat([lp, torch.zeros_like(lp[:, :1])], dim=1)
