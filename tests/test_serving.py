"""Serving: the compiled onnx backend with several sessions at once, the OpenAI-compatible API through the real
`openai` client, and a second app instance answering through the first one's /v1 (the `openai` backend).

The onnx tests compile a tiny random model (heads of 16, the smallest the runtime takes) once per session."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from gradio_client import Client

from app import build_app
from chatbot.assistant import Assistant
from chatbot.config import ChatConfig
from chatbot.engine import GenerationOptions, Usage, load_engine, pick_backend
from chatbot.hf_engine import TransformersEngine
from chatbot.models import ModelNotFoundError, ModelProfile
from chatbot.onnx_engine import OnnxEngine
from chatbot.openai_engine import OpenAIEngine, estimate_tokens, split_model
from tests.test_app import launched
from tests.tiny import save_tiny_model

PROMPTS = ["hello", "What is the capital of France?", "LoRA trains two small matrices.", "法国的首都是巴黎。",
           "Tell me about retrieval.", "user assistant system"]


@pytest.fixture(scope="session")
def onnx_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-onnx"), hidden_size=64)


@pytest.fixture
def onnx_engine(onnx_model_dir):
    return OnnxEngine.load(str(onnx_model_dir), "fp32", context_tokens=256)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_onnx_backend_is_the_cpu_default_and_matches_pytorch(onnx_model_dir, onnx_engine):
    assert pick_backend("auto", None, "cpu") == "onnx"
    assert pick_backend("auto", "openai:http://host/v1", None) == "openai"
    assert pick_backend("auto", None, "cuda:0") == "transformers"
    torch_engine = TransformersEngine.load(str(onnx_model_dir), "cpu", 256)
    options = GenerationOptions(max_new_tokens=12, min_new_tokens=12)
    for prompt in PROMPTS[:3]:
        usage, torch_usage = Usage(), Usage()
        reply = "".join(onnx_engine.stream(user(prompt), options, usage=usage))
        expected = "".join(torch_engine.stream(user(prompt), options, usage=torch_usage))
        assert usage == torch_usage == Usage(torch_engine.count_tokens(user(prompt)), 12)
        assert reply == expected and len(reply) > 3, "the same greedy reply, cut into the same text"


def test_sessions_decoded_together_get_what_each_gets_alone(onnx_engine):
    options = GenerationOptions(max_new_tokens=16)
    alone = ["".join(onnx_engine.stream(user(prompt), options)) for prompt in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda prompt: "".join(onnx_engine.stream(user(prompt), options)), PROMPTS))
    assert together == alone, "one session's text leaked into another's, or batching changed a greedy reply"
    assert len(set(alone)) > 1


def test_stop_ends_only_its_own_session(onnx_engine):
    options = GenerationOptions(max_new_tokens=60)
    alone = {prompt: "".join(onnx_engine.stream(user(prompt), options)) for prompt in PROMPTS[:4]}
    take = onnx_engine._take  # 5 ms a token, so that Stop arrives while the reply is being written
    onnx_engine._take = lambda request, event: time.sleep(0.005) or take(request, event)
    stop = threading.Event()
    results: dict[str, str] = {}

    def run(prompt: str, event: threading.Event | None) -> None:
        text = ""
        for piece in onnx_engine.stream(user(prompt), options, stop=event):
            text += piece
            if event is not None and len(text) > 2:
                event.set()  # this session's Stop button, pressed after its first pieces
        results[prompt] = text

    threads = [threading.Thread(target=run, args=(PROMPTS[0], stop))]
    threads += [threading.Thread(target=run, args=(prompt, None)) for prompt in PROMPTS[1:4]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results[PROMPTS[0]]) < len(alone[PROMPTS[0]]) / 2
    assert all(results[prompt] == alone[prompt] for prompt in PROMPTS[1:4]), "the others ran to their end"


def test_the_time_limit_cuts_an_onnx_answer(onnx_engine):
    take = onnx_engine._take  # 10 ms a token: 200 tokens would take 2 s
    onnx_engine._take = lambda request, event: time.sleep(0.01) or take(request, event)
    usage = Usage()
    "".join(onnx_engine.stream(user("hello"), GenerationOptions(max_new_tokens=200, min_new_tokens=200,
                                                               time_limit=0.3), usage=usage))
    assert 0 < usage.completion_tokens < 200


def test_a_model_the_runtime_cannot_run_falls_back_to_pytorch(tiny_model_dir, capsys):
    engine = load_engine(str(tiny_model_dir), "auto", "cpu", 256, "fp32")  # heads of 8: the runtime refuses
    assert isinstance(engine, TransformersEngine)
    assert "Serving it with --backend transformers instead" in capsys.readouterr().err
    with pytest.raises(ModelNotFoundError, match="cannot run"):
        load_engine(str(tiny_model_dir), "onnx", "cpu", 256, "fp32")


def test_finetune_evaluate_generates_with_every_backend(onnx_model_dir, tmp_path, api):
    from finetune.config import EvaluateConfig
    from finetune.evaluate import evaluate
    from tests.test_finetune_train import write_dialogues

    data = write_dialogues(tmp_path / "held-out.jsonl", count=2)
    replies = {}
    for backend in ("transformers", "onnx"):
        result = evaluate(EvaluateConfig(model=str(onnx_model_dir), data=data, base="none", max_new_tokens=6,
                                         backend=backend, precision="fp32"))
        assert result["results"]["tuned"]["perplexity"] > 1
        replies[backend] = [row["tuned"] for row in result["replies"]]
    assert replies["onnx"] == replies["transformers"] and any(replies["onnx"])
    url, _ = api  # a served model has no weights here: replies without perplexity
    remote = evaluate(EvaluateConfig(model=f"openai:{url}v1/tiny", data=data, base="none", max_new_tokens=6,
                                     backend="openai"))
    assert remote["results"]["tuned"]["perplexity"] is None and len(remote["replies"]) == 2


def test_openai_model_specs_and_token_estimates():
    assert split_model("openai:http://h:8000/v1/Qwen/Qwen2.5-7B-Instruct", None) == (
        "http://h:8000/v1", "Qwen/Qwen2.5-7B-Instruct")
    assert split_model("openai:http://h:8000/v1", None) == ("http://h:8000/v1", None)
    assert split_model("m", "http://h/v1/") == ("http://h/v1", "m")
    with pytest.raises(ModelNotFoundError, match="--base-url"):
        split_model("m", None)
    english = estimate_tokens(user("word " * 100))
    assert 100 <= english <= 200
    assert estimate_tokens(user("汉" * 100)) >= 100, "Han characters count about one token each"


# ----- the OpenAI-compatible API -------------------------------------------------------------------------------
@pytest.fixture
def api(engine):
    with launched(build_app(Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=256)))) as url:
        yield url, openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)


def test_the_api_answers_through_the_real_openai_client(api, engine):
    url, client = api
    assert [model.id for model in client.models.list()] == ["tiny"]
    expected = Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=256)).ask("Tell me a story.")
    reply = client.chat.completions.create(model="tiny", messages=user("Tell me a story."))
    assert reply.choices[0].message.content == expected.text
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == expected.usage["completion_tokens"] > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["sources"] == [] and reply.model_extra["mode"] == "chat"

    chunks = list(client.chat.completions.create(model="tiny", messages=user("Tell me a story."), stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and "sources" in chunks[-2].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_the_api_streams_server_sent_events_ending_with_done(api):
    import requests

    url, _ = api
    response = requests.post(url + "v1/chat/completions", json={"model": "tiny", "messages": user("hi"),
                                                                "stream": True}, stream=True, timeout=60)
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert '"object": "chat.completion.chunk"' in lines[0]


def test_api_errors_come_in_openais_shape(api, monkeypatch):
    url, client = api
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert missing.value.body == {"message": missing.value.body["message"], "type": "invalid_request_error",
                                  "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError, match="last message must come from the user"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="too long"):
        client.chat.completions.create(model="tiny", messages=user("a" * 9000))
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens="many")
    assert bad.value.body["param"] == "max_tokens"
    monkeypatch.setenv("CHATBOT_API_KEY", "secret")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="tiny", messages=user("hi"))
    keyed = openai.OpenAI(base_url=url + "v1", api_key="secret", max_retries=0)
    assert keyed.chat.completions.create(model="tiny", messages=user("hi")).choices[0].message.content


@pytest.mark.slow
def test_the_api_streams_an_answer_with_its_sources(served_with_index_url):
    client = openai.OpenAI(base_url=served_with_index_url + "v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=user("困惑度怎么计算？"), stream=True))
    final = chunks[-1].model_extra
    assert final["mode"] == "extractive" and final["sources"][0]["source"] == "zh/困惑度.md"
    assert "[1]" in "".join(c.choices[0].delta.content or "" for c in chunks)
    # A second instance without documents, answering through this one, shows the passages it cited.
    remote = OpenAIEngine.connect(f"openai:{served_with_index_url}v1", context_tokens=512)
    answer = Assistant(remote, ChatConfig(max_new_tokens=8, context_tokens=512)).ask("困惑度怎么计算？")
    assert "[1]" in answer.text and answer.sources[0]["source"] == "zh/困惑度.md"


@pytest.fixture
def served_with_index_url(tokenizer, docs_index, embedder):
    from knowledge.embedded import KnowledgeBase
    from knowledge.retriever import Retriever
    from tests.tiny import tiny_model

    engine = TransformersEngine(tiny_model(tokenizer), tokenizer, "tiny", 512, ModelProfile(chat=("en",),
                                                                                             grounded=()))
    retriever = Retriever(KnowledgeBase.open(docs_index), embedder)
    with launched(build_app(Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=512), retriever))) as url:
        yield url


def test_a_second_instance_answers_through_the_first(api, engine):
    url, _ = api
    remote = OpenAIEngine.connect(f"openai:{url}v1", context_tokens=256)
    assert remote.name == "tiny"
    with launched(build_app(Assistant(remote, ChatConfig(max_new_tokens=8, context_tokens=256)))) as second:
        answer = Client(second, verbose=False).predict("Tell me a story.", [], api_name="/chat")
    # The first instance answered the second's prompt as a whole turn: its label and its model's words.
    first = Assistant(engine, ChatConfig(max_new_tokens=8, context_tokens=256)).ask("Tell me a story.")
    assert answer["answer"] == first.text and answer["usage"]["completion_tokens"] == first.usage["completion_tokens"]
    with pytest.raises(ModelNotFoundError, match="does not serve 'other'"):
        OpenAIEngine.connect(f"openai:{url}v1/other")


def test_sixteen_sessions_at_once_through_the_app(onnx_engine):
    config = ChatConfig(max_new_tokens=12, context_tokens=256)
    expected = {p: Assistant(onnx_engine, config).ask(p).text for p in PROMPTS}
    asked = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with launched(build_app(Assistant(onnx_engine, config))) as url:
        jobs = [(prompt, Client(url, verbose=False).submit(prompt, [], api_name="/chat")) for prompt in asked]
        answers = [(prompt, job.result(timeout=120)) for prompt, job in jobs]
    assert all(answer["answer"] == expected[prompt] for prompt, answer in answers), "each session gets its own"


def test_api_callers_share_the_uis_rate_limit(engine):
    from app import Access

    demo = build_app(Assistant(engine, ChatConfig(max_new_tokens=4, context_tokens=256)),
                     access=Access(public=True, requests_per_minute=2))
    with launched(demo) as url:
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
        for _ in range(2):
            client.chat.completions.create(model="tiny", messages=user("hi"))
        with pytest.raises(openai.RateLimitError, match="at most 2 a minute"):
            client.chat.completions.create(model="tiny", messages=user("hi"))


def test_every_surface_gives_the_same_note_when_the_model_cannot_write_the_language(tokenizer):
    from chatbot.prompts import CANNOT_WRITE
    from tests.tiny import tiny_model

    english_only = TransformersEngine(tiny_model(tokenizer), tokenizer, "tiny", 256, ModelProfile(chat=("en",),
                                                                                                   grounded=()))
    assistant = Assistant(english_only, ChatConfig(max_new_tokens=8, context_tokens=256))  # no knowledge base
    question = "法国的首都是哪里？"
    assert assistant.ask(question).text == CANNOT_WRITE["zh"]
    with launched(build_app(assistant)) as url:
        api = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
        reply = api.chat.completions.create(model="tiny", messages=user(question))
        page = Client(url, verbose=False).predict(question, [], api_name="/chat")
    assert reply.choices[0].message.content == page["answer"] == CANNOT_WRITE["zh"]
    assert reply.usage.completion_tokens == 0, "the model wrote nothing that was thrown away"


def test_the_k_quant_int4_recipe_compiles_and_generates(onnx_model_dir):
    engine = OnnxEngine.load(str(onnx_model_dir), "int4-kq", context_tokens=256)
    usage = Usage()
    reply = "".join(engine.stream(user("hello"), GenerationOptions(max_new_tokens=8, min_new_tokens=8), usage=usage))
    assert engine.backend == "onnx int4-kq" and usage.completion_tokens == 8 and reply
    import onnx

    def bits(folder) -> set[int]:
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        return {a.i for node in graph.node if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "bits"}

    assert bits(engine.folder) == {4, 8}, "k-quant int4 keeps the LM head and the sensitive layers in int8"
    assert bits(OnnxEngine.load(str(onnx_model_dir), "int4", context_tokens=256).folder) == {4}


def test_conversations_in_a_routed_language_go_to_its_model_on_every_surface(tokenizer):
    from tests.tiny import tiny_model

    english = TransformersEngine(tiny_model(tokenizer), tokenizer, "english-model", 256,
                                 ModelProfile(chat=("en",), grounded=()))
    chinese = TransformersEngine(tiny_model(tokenizer, seed=1), tokenizer, "chinese-model", 256,
                                 ModelProfile(chat=("zh",), grounded=("zh",)))
    assistant = Assistant(english, ChatConfig(max_new_tokens=6, context_tokens=256), engines={"zh": chinese})
    assert assistant.models == {"*": "english-model", "zh": "chinese-model"}
    assert "Chinese" in assistant.describe() and "`chinese-model`" in assistant.describe()
    question = "法国的首都是哪里？"
    answer = assistant.ask(question)
    assert answer.model == "chinese-model" and answer.usage["completion_tokens"] > 0
    assert assistant.ask("What is the capital of France?").model == "english-model"
    with launched(build_app(assistant)) as url:
        api = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
        reply = api.chat.completions.create(model="english-model", messages=user(question))
        page = Client(url, verbose=False).predict(question, [], api_name="/chat")
        listed = api.models.list().data[0]
    assert reply.choices[0].message.content == page["answer"] == answer.text
    assert reply.model_extra["answered_by"] == page["answered_by"] == "chinese-model"
    assert listed.model_extra["languages"] == {"*": "english-model", "zh": "chinese-model"}


def test_language_models_default_to_the_bilingual_model_only_with_the_default_model():
    assert ChatConfig(model=None, backend="onnx").routes() == {"zh": "gemma-3-270m-bilingual"}
    assert ChatConfig(model="some/model").routes() == {}
    assert ChatConfig(language_models="none").routes() == {}
    assert ChatConfig(model="x", language_models="zh=y, ja=z").routes() == {"zh": "y", "ja": "z"}
    with pytest.raises(ValueError, match="LANG=MODEL"):
        ChatConfig(language_models="zh")


def test_a_full_disk_is_reported_before_compiling_not_halfway(tiny_model_dir, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from chatbot.models import ModelNotFoundError
    from chatbot.onnx_engine import compile_model

    monkeypatch.setenv("CHATBOT_MODELS_DIR", str(tmp_path / "models"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(2**30, 2**30 - 1000, 1000))
    with pytest.raises(ModelNotFoundError, match=r"Not enough disk space to compile .* CHATBOT_MODELS_DIR"):
        compile_model(str(tiny_model_dir), "fp32")
    assert not any((tmp_path / "models" / "onnx").iterdir()), "nothing half written"
