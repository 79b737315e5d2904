"""The embedded default: NFT teaches a tiny Megatron model arithmetic, on CPU, in minutes.

1. a synthetic arithmetic task in DAPO prompt format, split into train and held-out problems;
2. a byte-level BPE tokenizer trained on it, offline;
3. a random Qwen2 model, warmed up with a short supervised phase on the Megatron actor so that it
   answers correctly sometimes (NFT learns from groups that are neither all right nor all wrong);
4. that model saved as a Hugging Face checkpoint (the "base model" a real run would download);
5. NFT from that checkpoint with the ordinary trainer: rollouts, verification, dynamic sampling,
   minibatch steps, weight sync, held-out evaluation, metrics, plot and checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_nft.config import TrainConfig, model_options


def build_base_model(cfg: TrainConfig, out_dir: Path, *, quiet: bool = False) -> Path:
    """Steps 1-4: writes an HF checkpoint (config, safetensors, tokenizer) to `out_dir`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.data.arithmetic import arithmetic_splits, reference_response
    from megatron_nft.data.batching import pack_rows
    from megatron_nft.data.prompts import encode_prompts
    from megatron_nft.data.templates import render_prompt
    from megatron_nft.data.tokenizer import train_bpe_tokenizer
    from megatron_nft.model.hf_io import save_hf_checkpoint
    from megatron_nft.model.qwen2 import shape_from_hf
    from megatron_nft.runtime import is_main_rank

    d, m, w = cfg.data, cfg.model, cfg.warmup
    train_rows, _ = arithmetic_splits(d.n_train, d.n_eval, seed=d.seed, max_operand=d.max_operand)
    responses = [reference_response(r["answer"]) for r in train_rows]
    corpus = [render_prompt(r["problem"], d.template) for r in train_rows] + responses
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=m.vocab_size)

    torch.manual_seed(cfg.run.seed)
    hf_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    initial = Qwen2ForCausalLM(hf_config).state_dict()

    # Supervised warm-up on the reference answers, through the same Megatron actor NFT uses: RFT's
    # loss with every answer correct and old log-probs 0 is exactly the token-mean NLL.
    actor = Actor(
        shape_from_hf(hf_config),
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        micro_batch_size=cfg.parallel.micro_batch_size,
        optim=OptimConfig(lr=w.lr, warmup_steps=min(10, w.steps), weight_decay=0.0),
        algo=AlgoConfig(name="rft", agg="token_mean"),
        total_steps=max(w.steps, 1),
        seed=cfg.run.seed,
        options=model_options(cfg),
    )
    actor.load_hf(lambda name: initial[name])
    prompt_ids = encode_prompts(tokenizer, train_rows, template=d.template, chat=d.chat, max_prompt_len=d.max_prompt_len)
    response_ids = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in responses]
    rng = random.Random(cfg.run.seed)
    order = list(range(len(train_rows)))
    bar = tqdm(range(w.steps), desc="warm-up (SFT)", disable=quiet or not is_main_rank())
    for step in bar:
        if step * w.batch_size % len(order) < w.batch_size:
            rng.shuffle(order)
        start = step * w.batch_size % len(order)
        idx = [order[(start + i) % len(order)] for i in range(w.batch_size)]
        batch = pack_rows(
            [prompt_ids[i] for i in idx],
            [response_ids[i] for i in idx],
            pad_id=tokenizer.pad_token_id,
            extra={"rewards": [1.0] * len(idx), "correct_rate": [1.0] * len(idx)},
        )
        batch["old_logprobs"] = torch.zeros_like(batch["loss_mask"])
        metrics = actor.train_step(batch)
        bar.set_postfix(nll=f"{metrics['loss']:.3f}")
    tensors = actor.hf_tensors()  # the other ranks' part of the gather is done within this call
    if is_main_rank():
        save_hf_checkpoint(out_dir, tensors, hf_config, tokenizer, overwrite=True)
    actor.close()
    return out_dir


def run_demo(cfg: TrainConfig, *, quiet: bool = False) -> dict:
    """The whole demo; returns the trainer's final metrics (accuracy before and after NFT)."""
    from megatron_nft import runtime
    from megatron_nft.run_dir import prepare_run_dir, remove_failed_start
    from megatron_nft.trainer import train

    runtime.init_process_group()
    base = Path(cfg.run.dir) / "base"
    nft_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=str(base)))
    run_dir, made = prepare_run_dir(cfg, resumes_as=nft_cfg)
    try:
        if not (base / "config.json").is_file():
            build_base_model(cfg, base, quiet=quiet)
        runtime.barrier()
        return train(nft_cfg, quiet=quiet)
    except BaseException:
        remove_failed_start(run_dir, made)
        raise
