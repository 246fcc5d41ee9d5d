"""Rendering conversations into token ids with the model's own chat template.

Serving and fine-tuning both go through here, so a tuned model sees exactly the format it is served with.
Messages are dicts {"role": "system" | "user" | "assistant", "content": str}.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

# The turn format this project teaches a base model that has none (Gemma 3 270M: its tokenizer has single tokens for
# <start_of_turn> and <end_of_turn> but no chat template). Every message, the system one included, is one turn;
# the assistant's turns are the model's.
TURN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


def message_text(content: object) -> str:
    """Plain text of a message's content: a string, or a list of parts as Gradio and OpenAI send them."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list | tuple):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def add_turn_format(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a tokenizer that knows Gemma's turn tokens `TURN_TEMPLATE`, with <end_of_turn> as the token that ends a
    reply (generation stops there, and fine-tuning teaches it as the end of each reply). False, and nothing
    changed, for a tokenizer without those tokens."""
    if any(tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id) for token in TURN_TOKENS):
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": list(TURN_TOKENS)}, replace_extra_special_tokens=False)
    tokenizer.eos_token = TURN_TOKENS[1]
    tokenizer.chat_template = TURN_TEMPLATE
    return True


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` followed by the assistant header, ready for generation."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # The template already wrote the special tokens as text; adding BOS again would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]
                        ) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask for fine-tuning.

    The mask is 1 on what the model must learn to write: each assistant reply and the end-of-turn token that
    closes it (so a tuned model learns to stop), 0 elsewhere. Any chat template works because the template
    renders growing prefixes of the conversation: each message's text is what its rendering adds, and a reply
    starts where `render_prompt` stops at serving time, after the assistant header.
    """
    messages = list(messages)
    pieces: list[tuple[str, bool]] = []  # (text, whether it is the assistant's own words)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            pieces.append((_added(done, header, i), False))
            done = header
        text = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        pieces.append((_added(done, text, i + 1), message["role"] == "assistant"))
        done = text
    ids: list[int] = []
    mask: list[int] = []
    special = set(tokenizer.all_special_ids)
    for text, learn in pieces:
        # Pieces are tokenised separately, so a reply's prompt is exactly the ids render_prompt gives.
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += _reply_mask(piece, special) if learn else [0] * len(piece)
    return ids, mask


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _added(before: str, after: str, count: int) -> str:
    """The text that rendering more of the conversation appended; the template must only ever append."""
    if not after.startswith(before):
        raise ValueError(f"The chat template does not render conversations incrementally: the rendering up to "
                         f"message {count} does not start with the rendering of the messages before it.")
    return after[len(before):]


def _reply_mask(piece: list[int], special: set[int]) -> list[int]:
    """1 up to and including the first special token after the reply (the template's end of turn, such as
    ChatML's <|im_end|>), 0 after it (a newline the model never generates); all 1 if the turn ends in text."""
    for position, token in enumerate(piece):
        if token in special:
            return [1] * (position + 1) + [0] * (len(piece) - position - 1)
    return [1] * len(piece)
