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


def tiny_hf_checkpoint(out, *, hidden=32, layers=2, seed=0):
    """A random HF Qwen2 checkpoint with an offline-trained tokenizer, written to `out` (a folder)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_nft.data.tokenizer import train_bpe_tokenizer
    from megatron_nft.model.hf_io import save_hf_checkpoint

    torch.manual_seed(seed)
    tok = train_bpe_tokenizer([f"What is {i} + {i + 1}?" for i in range(200)] + ["Answer: 12"], vocab_size=300)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    save_hf_checkpoint(out, ((n, p) for n, p in model.named_parameters()), config, tok)
    return out
