"""Rendering conversations into token ids with the model's own chat template.

Serving and fine-tuning both go through here, so a tuned model sees exactly the format it is served with.
Messages are dicts {"role": "system" | "user" | "assistant", "content": str}.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


def message_text(content: object) -> str:
    """Plain text of a message's content: a string, or a list of parts as Gradio and OpenAI send them."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list | tuple):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` followed by the assistant header, ready for generation."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # The template already wrote the special tokens as text; adding BOS again would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]
