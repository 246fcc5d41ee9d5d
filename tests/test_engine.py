"""The generation engine on a tiny random model: streaming, greedy determinism, end-of-turn, stop, trimming."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from chatbot.chat_format import render_prompt
from chatbot.engine import FairLock, GenerationOptions, PromptTooLongError, Usage, trim_history
from chatbot.hf_engine import StopOnLoop
from chatbot.hf_engine import TransformersEngine as Engine
from tests.tiny import tiny_model


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_stream_matches_greedy_generate(engine):
    messages = [{"role": "system", "content": "Be brief."}, user("What is the capital of France?")]
    options = GenerationOptions(max_new_tokens=12)
    pieces = list(engine.stream(messages, options))
    ids = render_prompt(engine.tokenizer, messages)
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=12, do_sample=False, eos_token_id=engine.eos_token_ids,
                                    pad_token_id=engine.tokenizer.pad_token_id)
    expected = engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert len(pieces) > 1, "the reply should arrive in several pieces"
    assert "".join(pieces) == expected


def test_greedy_is_reproducible_and_sampling_follows_seed(engine):
    messages = [user("hello")]
    greedy = GenerationOptions(max_new_tokens=10)
    assert "".join(engine.stream(messages, greedy)) == "".join(engine.stream(messages, greedy))
    sampled = [GenerationOptions(max_new_tokens=10, temperature=1.5, seed=s) for s in (1, 1, 2)]
    a, b, c = ("".join(engine.stream(messages, o)) for o in sampled)
    assert a == b
    assert a != c


def test_stops_at_end_of_turn(tokenizer):
    model = tiny_model(tokenizer)
    # With the final norm zeroed every logit is 0, so greedy decoding picks id 0, which is <|im_end|>.
    torch.nn.init.zeros_(model.model.norm.weight)
    assert tokenizer.convert_ids_to_tokens(0) == "<|im_end|>"
    engine = Engine(model, tokenizer, context_tokens=256)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    assert "".join(engine.stream([user("hello")], GenerationOptions(max_new_tokens=50))) == ""
    assert len(calls) == 1, "generation should end right after the end-of-turn token"


def test_closing_the_stream_stops_generation(engine):
    calls = []
    engine.model.register_forward_hook(lambda *args: calls.append(1))
    stream = engine.stream([user("hello")], GenerationOptions(max_new_tokens=200))
    next(stream)
    stream.close()  # what a stop button or Ctrl-C does
    assert len(calls) < 200
    assert not [t for t in threading.enumerate() if "_generate" in t.name and t.is_alive()]


def test_stop_event_ends_the_answer_early(engine):
    stop = threading.Event()
    pieces = []
    for piece in engine.stream([user("hello")], GenerationOptions(max_new_tokens=200), stop=stop):
        pieces.append(piece)
        stop.set()
    full = list(engine.stream([user("hello")], GenerationOptions(max_new_tokens=200)))
    assert 0 < len(pieces) < len(full)


def words(messages) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_trim_history_drops_oldest_turns_first():
    messages = [{"role": "system", "content": "sys"},
                user("one one one"), {"role": "assistant", "content": "a1 a1 a1"},
                user("two two"), {"role": "assistant", "content": "a2 a2"},
                user("now")]
    assert trim_history(messages, words, budget=100) == messages
    kept = trim_history(messages, words, budget=7)
    assert kept == [messages[0], *messages[3:]]
    kept = trim_history(messages, words, budget=2)
    assert kept == [messages[0], messages[-1]], "the system prompt and the question always stay"


def test_trim_history_refuses_a_question_that_cannot_fit():
    with pytest.raises(PromptTooLongError, match="too long"):
        trim_history([{"role": "system", "content": "sys"}, user("a b c d e")], words, budget=3)


def test_engine_trims_long_history_to_context(engine):
    long = " ".join(["Paris"] * 40)
    history = []
    for i in range(10):
        history += [user(f"{i} {long}"), {"role": "assistant", "content": long}]
    messages = [{"role": "system", "content": "sys"}, *history, user("last question")]
    fitted = engine.fit(messages, max_new_tokens=32)
    assert fitted[0]["role"] == "system" and fitted[-1]["content"] == "last question"
    assert len(fitted) < len(messages)
    assert engine.count_tokens(fitted) <= engine.context_tokens - 32
    usage = Usage()
    options = GenerationOptions(max_new_tokens=32)
    reply = "".join(engine.stream(messages, options, usage=usage))
    assert usage.prompt_tokens == engine.count_tokens(fitted), "the model must see the trimmed prompt"
    assert reply == "".join(engine.stream(fitted, options))


def loops(generated: list[int], size: int) -> bool:
    """The loop rule, written the slow and obvious way: the tail occurs twice before it, without overlap."""
    if len(generated) < 3 * size:
        return False
    tail, earlier = generated[-size:], generated[:-size]
    return sum(earlier[i:i + size] == tail for i in range(len(earlier) - size + 1)) >= 2


def feed(criterion: StopOnLoop, prompt: list[int], generated: list[int]) -> int | None:
    """Call the criterion after each generated token, as generate() does; the length at which it stops."""
    for length in range(1, len(generated) + 1):
        if criterion(torch.tensor([prompt + generated[:length]]), None):
            return length
    return None


def test_a_reply_caught_in_a_loop_is_ended():
    assert feed(StopOnLoop(2, size=3), [9, 9], [5, 6, 7, 8, 1, 2, 3, 5, 6, 7]) is None, "a repeat is allowed"
    assert feed(StopOnLoop(2, size=3), [9, 9], [5, 6, 7, 8] * 5) == 11, "the third time is a loop"
    assert feed(StopOnLoop(2, size=3), [9, 9], list(range(20, 60))) is None


def test_loop_check_agrees_with_the_plain_rule_on_random_replies():
    rng = torch.Generator().manual_seed(0)
    for trial in range(200):
        size = 2 + trial % 4
        generated = torch.randint(0, 4, (60,), generator=rng).tolist()  # a small alphabet repeats often
        expected = next((n for n in range(1, 61) if loops(generated[:n], size)), None)
        assert feed(StopOnLoop(3, size=size), [1, 2, 3], generated) == expected


def test_a_model_that_repeats_itself_is_stopped(tokenizer):
    model = tiny_model(tokenizer)
    # An output layer that ignores its input and always prefers one ordinary token: the reply loops forever.
    token = tokenizer.convert_tokens_to_ids("a")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[token] = 1.0
    model.lm_head = head
    usage = Usage()
    reply = "".join(Engine(model, tokenizer, context_tokens=256).stream([user("hello")],
                                                                      GenerationOptions(max_new_tokens=200),
                                                                      usage=usage))
    assert set(reply.replace(" ", "")) == {"a"}
    assert usage.completion_tokens == 24, "three times the 8-token window, not max_new_tokens"


def test_waiting_requests_get_the_engine_in_arrival_order():
    lock, order = FairLock(), []

    def take(number: int) -> None:
        with lock:
            order.append(number)

    threads = []
    with lock:  # another request's answer holds the engine; five more arrive one after another
        for number in range(5):
            threads.append(threading.Thread(target=take, args=(number,)))
            threads[-1].start()
            while len(lock._waiting) < number + 1:  # queued before the next one arrives
                time.sleep(0.001)
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1, 2, 3, 4]


def test_the_compiled_models_fingerprint_follows_the_weights_not_the_model_card(tmp_path):
    import os
    import shutil

    from chatbot.onnx_engine import _fingerprint

    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "metrics.json",
                 "chatbot_model.json"):
        (tmp_path / name).write_text("1")
    first = _fingerprint(str(tmp_path))
    for name in ("README.md", "metrics.json", "chatbot_model.json"):
        (tmp_path / name).write_text("edited")
    assert _fingerprint(str(tmp_path)) == first, "editing what only describes the model does not recompile it"
    clone = shutil.copytree(tmp_path, tmp_path.parent / "fresh-clone" / tmp_path.name)
    os.utime(clone / "adapter_model.safetensors", ns=(1, 1))
    assert _fingerprint(str(clone)) == first, "the same adapter in a fresh clone (new times) is not compiled again"
    (tmp_path / "adapter_model.safetensors").write_text("retrained")
    assert _fingerprint(str(tmp_path)) != first


def test_a_large_checkpoint_is_identified_by_its_size_and_time_not_hashed(tmp_path, monkeypatch):
    import os

    from chatbot import onnx_engine

    monkeypatch.setattr(onnx_engine, "HASHED_UP_TO", 4)  # every file below counts as large
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"12345678")
    os.utime(weights, ns=(1, 1))
    first = onnx_engine._fingerprint(str(tmp_path))
    weights.write_bytes(b"87654321")  # same size: only its time says it changed
    os.utime(weights, ns=(1, 1))
    assert onnx_engine._fingerprint(str(tmp_path)) == first, "its bytes are not read"
    os.utime(weights, ns=(2, 2))
    assert onnx_engine._fingerprint(str(tmp_path)) != first


def test_compiling_a_new_version_removes_the_copies_of_that_model_nobody_used_lately(tmp_path):
    import os

    from chatbot.onnx_engine import CONFIG_FILE, STALE_AFTER_S, prune_stale

    def compiled(name: str, used: float) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_FILE).write_text("{}")
        os.utime(tmp_path / name / CONFIG_FILE, (used, used))

    now = 1_000_000.0
    compiled("run-int8-aaaaaaaaaaaa", now)  # the one just compiled
    compiled("run-int8-bbbbbbbbbbbb", now - STALE_AFTER_S - 1)  # an old version: removed
    compiled("run-int8-cccccccccccc", now - 5)  # handed to another process a moment ago: kept
    compiled("run-int4-dddddddddddd", now - STALE_AFTER_S - 1)  # another precision
    compiled("run-int8-kq-eeeeeeeeeeee", now - STALE_AFTER_S - 1)  # another model whose name ends like this one
    compiled("other-int8-ffffffffffff", now - STALE_AFTER_S - 1)  # another model
    (tmp_path / "run-int8-aaaaaaaaaaaa.tmp-x1").mkdir()  # another process's build in progress
    removed = prune_stale(tmp_path / "run-int8-aaaaaaaaaaaa", now=now)
    assert [p.name for p in removed] == ["run-int8-bbbbbbbbbbbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other-int8-ffffffffffff", "run-int4-dddddddddddd", "run-int8-aaaaaaaaaaaa", "run-int8-aaaaaaaaaaaa.tmp-x1",
        "run-int8-cccccccccccc", "run-int8-kq-eeeeeeeeeeee"]
