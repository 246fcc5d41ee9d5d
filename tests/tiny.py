"""A tiny randomly initialised chat model built from a config, so tests run in seconds without downloads.

The tokenizer is a byte-level BPE trained here on a few sentences (any text, Chinese included, encodes), with
ChatML special tokens and a ChatML chat template like SmolLM2's. `<|im_end|>` is id 0 and the end of a turn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
TRAINING_TEXT = [
    "The capital of France is Paris. Paris is a city on the Seine.",
    "LoRA trains two small low-rank matrices while the base model stays frozen.",
    "Retrieval-augmented generation cites the passages it uses [1] [2].",
    "法国的首都是巴黎。检索增强生成会引用文档中的段落。",
    "user assistant system Hello! How can I help you today?",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    """hidden_size 64 gives heads of 16, the smallest onnxruntime's attention kernel takes."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a tiny model + tokenizer folder that `--model FOLDER` loads like any local checkpoint."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, seed, hidden_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TURN_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def turn_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer shaped like Gemma 3 base's: <bos>, <eos>, <pad>, single tokens for <start_of_turn> and
    <end_of_turn> (ordinary ones, not marked special), and no chat template."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=TURN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def save_tiny_base_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Gemma 3 text model with `turn_tokenizer`: a base model that has never seen a conversation."""
    tokenizer = turn_tokenizer()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                              sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    Gemma3ForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class TinyEmbedder:
    """A stand-in for `knowledge.embedder.Embedder` with no model: each text is a normalised bag of its hashed
    index terms (`knowledge.lexical.tokenize`). Deterministic and instant, for tests of the store's bookkeeping;
    retrieval quality is tested with the real embedder (`slow`)."""

    name = "tiny-hash"
    dimension = 64

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        import zlib

        from knowledge.lexical import tokenize

        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for term in tokenize(text) or [text]:
                vectors[row, zlib.crc32(term.encode()) % self.dimension] += 1.0
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)

    def queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)


def slow_down(model: torch.nn.Module, seconds: float) -> list[int]:
    """Make every forward pass of `model` take `seconds` longer; returns the list that counts the passes."""
    import time

    calls: list[int] = []
    original = model.forward

    def slowly(*args, **kwargs):
        calls.append(1)
        time.sleep(seconds)
        return original(*args, **kwargs)

    model.forward = slowly
    return calls
