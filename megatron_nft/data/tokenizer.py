"""A small byte-level BPE tokenizer trained offline with the `tokenizers` library (no download).

Used by the embedded task: the demo's "base model" needs a tokenizer, and tests need a real Hugging
Face tokenizer directory. Shaped like Qwen2's: byte-level BPE, every digit its own pre-token (so a
number is always spelled digit by digit, which is what makes arithmetic learnable by a tiny model),
"<|endoftext|>" as eos and pad, "<|im_start|>"/"<|im_end|>" and a ChatML chat template.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)

# Pre-token boundaries (then byte-level encoding, without a second regex pass):
#   contractions | optional space + letters | one digit | optional space + punctuation run (+ newlines)
#   | newline runs | trailing spaces before a non-space | other whitespace
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"| ?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# ChatML, as the Qwen family uses it; the assistant turn opener is added with add_generation_prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_bpe_tokenizer(texts, vocab_size: int, out_dir: str | Path | None = None):
    """Trains a byte-level BPE on `texts` (an iterable of strings) and returns it as a
    transformers.PreTrainedTokenizerFast; the same texts give the same tokenizer. `vocab_size` is an
    upper bound: the vocabulary is 3 special tokens + 256 bytes + as many merges as fit and as the
    corpus supports (merges never cross pre-token boundaries, so a repetitive corpus saturates early;
    use len(tokenizer) for the model's vocabulary). With `out_dir`, the tokenizer is also saved there
    so that AutoTokenizer.from_pretrained(out_dir) loads it."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_backend(texts, vocab_size),
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,  # decode(encode(x)) must give x back exactly
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def train_bpe_backend(texts, vocab_size: int):
    """The bare `tokenizers.Tokenizer` that train_bpe_tokenizer wraps (no transformers import)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below the byte-level minimum of {minimum} (3 special tokens + 256 bytes)")
    texts = list(texts)
    if not texts:
        raise ValueError("train_bpe_tokenizer needs at least one text")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend
