"""Prompt templates: how a bare problem statement becomes the text the policy is asked to continue.

    dapo   DAPO-Math's instruction prefix and suffix; the answer goes on a last line "Answer: ..."
    boxed  the Qwen2.5-Math convention; the answer goes in \\boxed{...}
    raw    the problem unchanged (datasets whose prompts already carry their instructions, such as
           the DAPO-Math-17k parquet)

Any of them can additionally be wrapped in the tokenizer's chat template (one user turn plus the
generation prompt) with `chat=True`.
"""

from __future__ import annotations

from megatron_nft.errors import ConfigError

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

TEMPLATES = {
    "dapo": lambda problem: DAPO_PREFIX + problem + DAPO_SUFFIX,
    "boxed": lambda problem: problem + BOXED_SUFFIX,
    "raw": lambda problem: problem,
}


class TemplateError(ConfigError, ValueError):
    """An unknown template name, or a chat wrap the tokenizer cannot do. A ValueError for library
    callers, and a UserError so that the CLI prints it as one line."""


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise TemplateError(f"unknown prompt template {template!r}; expected one of: {', '.join(TEMPLATES)}")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(problem: str, template: str, tokenizer=None, chat: bool = False) -> str:
    """The prompt text for `problem` under `template` ("dapo", "boxed" or "raw"); with `chat=True`,
    wrapped in `tokenizer`'s chat template as one user message followed by the assistant's turn
    opener (add_generation_prompt). Asking for `chat` from a tokenizer without a chat template is an
    error rather than a silent fall-back to plain text: the model would see a different format."""
    check_template(template)
    text = TEMPLATES[template](problem)
    if not chat:
        return text
    if tokenizer is None:
        raise TemplateError("chat=True needs the tokenizer whose chat template wraps the prompt")
    if not has_chat_template(tokenizer):
        raise TemplateError(
            f"chat=True but the tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) "
            "has no chat_template; use chat=False"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
