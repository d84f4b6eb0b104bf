"""lora-tune serve, through the official openai client: a base and two adapters on one server."""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import run_cli, serve_process, write_recipe

from lora_tune import serve_engine, serve_schemas, serve_vllm
from lora_tune.errors import UserError
from lora_tune.tiny import CHAT_TEMPLATE

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "what colour is the meadow?",
    "what colour is the bridge?",
    "what colour is the canyon?",
    "what colour is the harbour?",
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Two adapters on tiny-llama: `answers` (prompt/completion data), `chat` (chat data, with a
    chat template); and one on tiny-opt, for a base mismatch."""
    work = tmp_path_factory.mktemp("serve-runs")
    specs = {
        "answers": ({"train": str(tiny / "data" / "pc_train.jsonl")}, {}),
        "chat": (
            {"train": str(tiny / "data" / "chat_train.jsonl"), "chat_template": CHAT_TEMPLATE},
            {},
        ),
        "opt": ({"train": str(tiny / "data" / "pc_train.jsonl")}, {"id": str(tiny / "tiny-opt")}),
    }
    for name, (data, model) in specs.items():
        path = write_recipe(
            work / f"{name}.yaml",
            tiny,
            work / name,
            data={**data, "eval": None},
            model=model,
            training={"max_steps": 150 if name != "opt" else 5, "save_strategy": "no"},
        )
        assert run_cli("train", path) == 0
    return work


@pytest.fixture(scope="module")
def server(runs, tiny):
    with serve_process(
        runs / "answers",
        "--adapter",
        f"chat={runs / 'chat'}",
        "--base-name",
        "base",
        "--allow-runtime-lora",
        "--adapter-root",
        runs,
        cwd=ROOT,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def references(runs, tiny):
    """Greedy answers of each model, generated directly with PeftModel (one adapter per model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    answers = {}
    for name in ("base", "answers", "chat"):
        base = AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama")
        model = base if name == "base" else PeftModel.from_pretrained(base, runs / name / "adapter")
        tokenizer = AutoTokenizer.from_pretrained(
            tiny / "tiny-llama" if name == "base" else runs / name / "adapter"
        )
        answers[name] = {}
        prompts = PROMPTS + (
            [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": PROMPTS[0]}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            ]
            if name == "chat"
            else []
        )
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=prompt in PROMPTS, return_tensors="pt")[
                "input_ids"
            ]
            with torch.no_grad():
                out = model.eval().generate(
                    ids,
                    max_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            answers[name][prompt] = tokenizer.decode(
                out[0, ids.shape[1] :], skip_special_tokens=True
            )
    return answers


def test_models_are_listed(client):
    listed = {m.id: m for m in client.models.list().data}
    assert list(listed) == ["base", "answers", "chat"]
    assert listed["chat"].parent == "base" and listed["base"].parent is None


def test_completions_equal_direct_generation_for_each_model(client, references):
    for name in ("base", "answers", "chat"):
        for prompt in PROMPTS:
            response = client.completions.create(
                model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            assert response.choices[0].text == references[name][prompt], (name, prompt)
            assert response.usage.completion_tokens > 0
    # The three models answer differently, so a mix-up would show.
    assert len({tuple(references[name][p] for p in PROMPTS) for name in references}) == 3
    assert references["answers"][PROMPTS[0]] == " the meadow is blue."


def test_streaming_gives_the_same_text(client, references):
    for name in ("answers", "chat"):
        chunks = list(
            client.completions.create(
                model=name, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks) == references[name][PROMPTS[1]]
        assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_uses_the_adapters_template(client, references):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    response = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    expected = references["chat"][next(p for p in references["chat"] if p not in PROMPTS)]
    assert (
        response.choices[0].message.content == expected
        and response.choices[0].message.role == "assistant"
    )
    stream = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": PROMPTS[0][:10]},
                {"type": "text", "text": PROMPTS[0][10:]},
            ],
        }
    ]
    response = client.chat.completions.create(
        model="chat", messages=parts, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].message.content == expected


def test_stop_strings_cut_the_answer(client, references):
    text = references["answers"][PROMPTS[0]]
    response = client.completions.create(
        model="answers", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[" is"]
    )
    assert (
        response.choices[0].text == text[: text.index(" is")]
        and response.choices[0].finish_reason == "stop"
    )
    chunks = client.completions.create(
        model="answers",
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stop=[" is"],
        stream=True,
    )
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(" is")]


def test_concurrent_requests_over_the_adapters_never_mix(client, references, capsys):
    jobs = [
        (("base", "answers", "chat")[i % 3], PROMPTS[i % len(PROMPTS)], i % 5 == 0)
        for i in range(40)
    ]

    def ask(job):
        name, prompt, stream = job
        start = time.perf_counter()
        if stream:
            text = "".join(
                c.choices[0].text
                for c in client.completions.create(
                    model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
                )
            )
        else:
            text = (
                client.completions.create(
                    model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
                )
                .choices[0]
                .text
            )
        return text == references[name][prompt], time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(ask, jobs))
    latencies = sorted(seconds for _, seconds in results)
    with capsys.disabled():
        print(
            f"\nserve load test: {len(results)} requests, 4 at a time, {sum(not ok for ok, _ in results)} wrong; "
            f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"p95 {latencies[int(0.95 * len(latencies)) - 1] * 1000:.0f} ms"
        )
    assert all(ok for ok, _ in results)


def test_errors_are_json_and_the_server_keeps_serving(client, server, runs, references):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="answers", prompt="the river " * 200, max_tokens=8)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "no_chat_template"
    for body in (
        b'{"model": "answers"',
        b'{"model": "answers", "prompt": 5}',
        b'{"model": "answers", "prompt": "x", "temperature": 9}',
    ):
        request = urllib.request.Request(
            f"{server}/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(request)
        assert (
            http.value.code == 400
            and json.loads(http.value.read())["error"]["type"] == "invalid_request_error"
        )
    with pytest.raises(openai.BadRequestError) as info:
        client.post(
            "/load_lora_adapter",
            body={"lora_name": "opt", "lora_path": str(runs / "opt")},
            cast_to=object,
        )
    assert info.value.body["code"] == "adapter_for_another_base"
    response = client.completions.create(
        model="answers", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].text == references["answers"][PROMPTS[0]]


def test_adapters_load_and_unload_at_run_time(client, runs, references):
    client.post(
        "/load_lora_adapter",
        body={"lora_name": "again", "lora_path": str(runs / "answers")},
        cast_to=object,
    )
    assert "again" in [m.id for m in client.models.list().data]
    response = client.completions.create(
        model="again", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].text == references["answers"][PROMPTS[2]]
    client.post("/unload_lora_adapter", body={"lora_name": "again"}, cast_to=object)
    assert "again" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="again", prompt="x", max_tokens=4)
    response = client.completions.create(
        model="chat", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].text == references["chat"][PROMPTS[2]]


def test_vllm_command_and_its_checks(runs, tmp_path, capsys):
    from lora_tune.recipe import ModelSection

    base = ModelSection(id="meta-llama/Llama-3.1-8B")
    command = serve_vllm.vllm_command(
        base, {"answers": runs / "answers" / "adapter"}, "0.0.0.0", 8000, "llama"
    )
    assert command == [
        "vllm",
        "serve",
        "meta-llama/Llama-3.1-8B",
        "--served-model-name",
        "llama",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "1",
        "--lora-modules",
        f"answers={(runs / 'answers' / 'adapter').resolve()}",
    ]
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((runs / "answers" / "adapter" / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True, "r": 1024}))
    (dora / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as info:
        serve_vllm.vllm_command(base, {"d": dora}, "0.0.0.0", 8000, "llama")
    assert info.value.headline == (
        f"--engine vllm: d ({dora}) uses DoRA, which vLLM does not serve as LoRA; "
        "rank 1024 is above vLLM's largest --max-lora-rank, 512"
    )
    if importlib.util.find_spec("vllm") is None:
        assert run_cli("serve", runs / "answers", "--engine", "vllm") == 2
        assert "--engine vllm: vLLM is not installed" in capsys.readouterr().err


def test_engine_serves_the_plain_base_again_after_its_last_adapter_goes(runs, tiny, references):
    from lora_tune.recipe import ModelSection

    engine = serve_engine.Engine(ModelSection(id=str(tiny / "tiny-llama")), "base", "float32")
    tokenizer = engine.tokenizer("base")

    def answer(name):
        job = engine.prepare(
            serve_schemas.CompletionRequest(
                model=name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
            ),
            tokenizer(PROMPTS[0])["input_ids"],
            MAX_TOKENS,
        )
        return "".join(engine.stream(job)), job.finish_reason

    assert answer("base") == (references["base"][PROMPTS[0]], "length")
    engine.add("answers", str(runs / "answers"))
    assert answer("answers") == (references["answers"][PROMPTS[0]], "stop")
    engine.remove("answers")
    assert engine.peft is None and engine.names() == ["base"]
    assert answer("base")[0] == references["base"][PROMPTS[0]]
