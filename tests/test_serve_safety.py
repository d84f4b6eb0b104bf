"""lora-tune serve reachable by others: API key, body limit, runtime adapter loading confined to a
folder, and every failure an OpenAI-style JSON error without a traceback."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port, run_cli

from lora_tune import guard, serve, serve_engine, serve_errors, serve_vllm
from lora_tune.recipe import ModelSection

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

KEY = "k-7f3a9c"
SECRET = "hunter2-do-not-echo"  # planted in bad files: no response may repeat it


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size and modification time (links not followed)."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def error(response, status: int) -> dict:
    """The OpenAI error object of a response, after checking its status and shape."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and SECRET not in response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory):
    """An adapter root holding `good` (a LoRA adapter of tiny-llama), and `outside`, a folder next
    to the root holding the same adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("safety")
    model = AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama")
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        work / "root" / "good"
    )
    shutil.copytree(work / "root" / "good", work / "outside")
    return work / "root"


@pytest.fixture(scope="module")
def engine(tiny):
    return serve_engine.Engine(ModelSection(id=str(tiny / "tiny-llama")), "base", "float32")


def client(engine, **access) -> TestClient:
    return TestClient(
        serve.create_app(engine, guard.Access(**access)), raise_server_exceptions=False
    )


# --- the API key ---------------------------------------------------------------------------------


def test_every_route_but_health_needs_the_key(engine):
    app = client(engine, api_key=KEY)
    requests = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", b'{"model": '),
        ("POST", "/v1/chat/completions", b"{}"),
        ("POST", "/v1/load_lora_adapter", b"{}"),
        ("POST", "/v1/unload_lora_adapter", b"{}"),
        ("GET", "/docs", None),
        ("GET", "/openapi.json", None),
        ("GET", "/no/such/route", None),
    ]
    for method, path, body in requests:
        for headers, problem in (
            ({}, "missing API key"),
            ({"Authorization": "Bearer wrong"}, "invalid API key"),
            ({"Authorization": f"Basic {KEY}"}, "missing API key"),
        ):
            response = app.request(method, path, content=body, headers=headers)
            refused = error(response, 401)
            assert refused["code"] == "invalid_api_key" and refused["message"].startswith(
                problem
            ), (path, headers)
            assert (
                "'Authorization: Bearer KEY'" in refused["message"]
                and "api_key=KEY" in refused["message"]
            )
            assert response.headers["www-authenticate"] == "Bearer"
    assert app.get("/health").status_code == 200
    answered = app.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert answered.status_code == 200 and [m["id"] for m in answered.json()["data"]] == ["base"]
    # Without a key configured, nothing asks for one.
    assert client(engine).get("/v1/models").status_code == 200


def test_exposure_warning_only_beyond_loopback_without_a_key(capsys):
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert guard.exposure_warning(host, 8000, None) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20", "myhost.example"):
        warning = guard.exposure_warning(host, 8000, None)
        assert warning.startswith(
            f"listening on {host}:8000 without an API key: anyone who can reach this port"
        )
        assert "Set --api-key (or LORA_TUNE_API_KEY), or listen on 127.0.0.1." in warning
        assert guard.exposure_warning(host, 8000, KEY) is None
    guard.warn_if_exposed("0.0.0.0", 9000, None)
    guard.warn_if_exposed("127.0.0.1", 9000, None)
    captured = capsys.readouterr()
    assert (
        captured.err.count("warning: listening on 0.0.0.0:9000 without an API key") == 1
        and not captured.out
    )


def test_api_key_comes_from_the_option_or_the_environment(monkeypatch, tiny):
    seen = []
    monkeypatch.setattr(serve, "run", lambda *args, **kwargs: seen.append(kwargs["api_key"]))
    target = str(tiny / "tiny-llama")
    monkeypatch.setenv("LORA_TUNE_API_KEY", "from-env")
    assert run_cli("serve", target) == 0
    assert run_cli("serve", target, "--api-key", "from-option") == 0
    monkeypatch.delenv("LORA_TUNE_API_KEY")
    assert run_cli("serve", target) == 0
    assert seen == ["from-env", "from-option", None]


# --- runtime adapter loading ---------------------------------------------------------------------


def test_runtime_loading_is_off_without_the_flag(engine, root):
    before = snapshot(root.parent)
    app = client(engine)
    for path, body in (
        ("/v1/load_lora_adapter", {"lora_name": "g", "lora_path": str(root / "good")}),
        ("/v1/unload_lora_adapter", {"lora_name": "base"}),
    ):
        refused = error(app.post(path, json=body), 403)
        assert refused["code"] == "runtime_lora_disabled"
        assert "start it with --allow-runtime-lora --adapter-root DIR" in refused["message"]
    assert engine.names() == ["base"] and snapshot(root.parent) == before


def test_runtime_loading_stays_inside_the_adapter_root(engine, root, tmp_path):
    outside = root.parent / "outside"
    links = tmp_path / "links"  # a root of links, some leading out of it
    shutil.copytree(root / "good", links / "half")
    (links / "half" / "adapter_model.safetensors").unlink()
    (links / "half" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (links / "whole").symlink_to(outside, target_is_directory=True)
    before = snapshot(root.parent), snapshot(links)
    app = client(engine, runtime_adapter_root=root.resolve())
    for given in (str(outside), "../outside", "good/../../outside", "/etc"):
        refused = error(
            app.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": given}), 403
        )
        assert refused["code"] == "adapter_outside_root" and refused["param"] == "lora_path"
        assert refused["message"] == (
            f"{given}: outside this server's --adapter-root (after following links); put "
            "the adapter under that folder and name it relative to it"
        )
    for given, reason in (("a\x00b", "embedded null byte"), ("x" * 5000, "File name too long")):
        refused = error(
            app.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": given}), 400
        )
        assert refused["message"] == (
            f"{given!r} is not a usable path ({reason}); name an adapter folder under the "
            "server's --adapter-root"
        )
    linked = client(engine, runtime_adapter_root=links.resolve())
    for given in ("whole", "half", str(links / "half")):
        refused = error(
            linked.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": given}), 403
        )
        assert refused["code"] == "adapter_outside_root", given
    assert engine.names() == ["base"] and (snapshot(root.parent), snapshot(links)) == before

    for given in ("good", str(root / "good")):
        response = app.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": given})
        assert response.json() == {"status": "ok", "model": "good"} and engine.names() == [
            "base",
            "good",
        ]
        assert app.post("/v1/unload_lora_adapter", json={"lora_name": "good"}).status_code == 200
        assert engine.names() == ["base"]
    assert (snapshot(root.parent), snapshot(links)) == before


@pytest.mark.parametrize(
    "text, problem",
    [
        (json.dumps({"peft_type": "LORA", "r": SECRET}), "r: Input should be a valid integer"),
        ("{" + SECRET, "Invalid JSON: key must be a string at line 1 column 2"),
        ('["' + SECRET + '"]', "Input should be an object"),
        (
            '{"peft_type": "LORA", "base_model_name_or_path": 5}',
            "base_model_name_or_path: Input should be a valid string",
        ),
        (
            '{"peft_type": "LORA", "target_modules": 7}',
            "target_modules: Input should be a valid string",
        ),
        ("", "Invalid JSON: EOF while parsing a value at line 1 column 0"),
    ],
)
def test_a_bad_adapter_config_is_a_400_naming_the_file(engine, root, tmp_path, text, problem):
    bad = tmp_path / "bad"
    shutil.copytree(root / "good", bad)
    (bad / "adapter_config.json").write_text(text)
    before = snapshot(tmp_path)
    app = client(engine, runtime_adapter_root=tmp_path.resolve())
    refused = error(
        app.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "bad"}), 400
    )
    assert refused["code"] == "invalid_adapter_config" and refused["param"] == "lora_path"
    assert refused["message"] == (
        f"{bad}: adapter_config.json is not a valid PEFT adapter config ({problem}); "
        "restore the file from the run that trained the adapter, or retrain it"
    )
    assert engine.names() == ["base"] and snapshot(tmp_path) == before


def test_an_unknown_adapter_type_is_not_quoted(engine, root, tmp_path):
    bad = tmp_path / "odd"
    shutil.copytree(root / "good", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | {"peft_type": SECRET}))
    refused = error(
        client(engine, runtime_adapter_root=tmp_path.resolve()).post(
            "/v1/load_lora_adapter", json={"lora_name": "odd", "lora_path": "odd"}
        ),
        400,
    )
    assert refused["code"] == "unsupported_adapter"
    assert "(this one is of an unknown peft_type); merge it (lora-tune merge)" in refused["message"]


@pytest.fixture(scope="module")
def opt_adapter(tiny, tmp_path_factory) -> Path:
    """An OPT adapter whose config was edited to name the tiny Llama as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path_factory.mktemp("opt") / "adapter"
    opt = AutoModelForCausalLM.from_pretrained(tiny / "tiny-opt")
    get_peft_model(opt, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        adapter
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": str(tiny / "tiny-llama")})
    )
    return adapter


def test_an_adapter_of_another_architecture_names_both(engine, opt_adapter):
    """Given at start (--adapter), such an adapter is refused before PEFT tries it, naming both
    architectures: the model it was trained on is read from the model card's base_model line."""
    with pytest.raises(serve_errors.ServeError) as refused:
        engine.add("opt", str(opt_adapter))
    assert refused.value.code == "adapter_for_another_base"
    assert refused.value.message.startswith(
        f"{opt_adapter}: this adapter was trained on opt (OPTForCausalLM, "
    )
    assert ", the base is llama (LlamaForCausalLM, " in refused.value.message
    assert engine.names() == ["base"]


def test_a_client_adapter_of_another_architecture_names_nothing_outside_the_root(
    engine, opt_adapter, tmp_path, capsys
):
    """A client's adapter may name any folder as the model it was trained on (in its model card, or
    its run's recipe): the answer names the served base only, never what that folder's config holds."""
    secret = tmp_path / "elsewhere"  # a model folder outside the root, its config.json private
    secret.mkdir()
    (secret / "config.json").write_text(
        json.dumps({"model_type": SECRET, "architectures": [SECRET + "Model"]})
    )
    root = tmp_path / "root"
    shutil.copytree(opt_adapter, root / "card")
    (root / "card" / "README.md").write_text(f"---\nbase_model: {secret}\n---\n")
    shutil.copytree(opt_adapter, root / "run" / "adapter")
    (root / "run" / "adapter" / "README.md").unlink()
    (root / "run" / "recipe.yaml").write_text(f"model:\n  id: {secret}\n")
    before = snapshot(tmp_path)
    app = client(engine, runtime_adapter_root=root.resolve())
    for given in ("card", "run"):
        refused = error(
            app.post("/v1/load_lora_adapter", json={"lora_name": "opt", "lora_path": given}), 400
        )
        assert refused["code"] == "adapter_for_another_base" and refused["param"] == "lora_path"
        assert refused["message"].startswith(
            f"{root / given}: this adapter was trained on a model of another "
            "architecture: it changes layers that "
        )
        assert (
            "a llama (LlamaForCausalLM) model, does not have; load an adapter trained on it"
            in refused["message"]
        )
        assert str(secret) not in refused["message"]
    assert (
        capsys.readouterr().out.count(
            f"this adapter was trained on {SECRET} ({SECRET}Model, {secret})"
        )
        == 2
    )
    assert engine.names() == ["base"] and snapshot(tmp_path) == before


def test_a_run_recipe_linked_from_outside_the_root_is_refused(engine, root, tmp_path):
    """Loading a run reads its recipe.yaml for the model it was trained on: a link out of the root
    is refused like a linked adapter file, a link to itself is no usable path."""
    (tmp_path / "private.yaml").write_text(f"model:\n  id: {SECRET}\n")
    run = tmp_path / "root" / "run"
    shutil.copytree(root / "good", run / "adapter")
    recipe = run / "recipe.yaml"
    app = client(engine, runtime_adapter_root=(tmp_path / "root").resolve())
    recipe.symlink_to(tmp_path / "private.yaml")
    before = snapshot(tmp_path)
    for given in ("run", "run/adapter"):
        refused = error(
            app.post("/v1/load_lora_adapter", json={"lora_name": "run", "lora_path": given}), 403
        )
        assert refused["code"] == "adapter_outside_root" and refused["message"].startswith(
            f"{given}: outside this"
        )
    recipe.unlink()
    recipe.symlink_to(recipe)
    refused = error(
        app.post("/v1/load_lora_adapter", json={"lora_name": "run", "lora_path": "run"}), 400
    )
    assert refused["code"] == "invalid_adapter" and refused["message"].startswith(
        "'run' is not a usable path ("
    )
    assert refused["message"].endswith(
        "); name an adapter folder under the server's --adapter-root"
    )
    assert engine.names() == ["base"] and snapshot(tmp_path).keys() == before.keys()
    recipe.unlink()
    recipe.write_text(f"model:\n  id: {root / 'good'}\n")
    response = app.post("/v1/load_lora_adapter", json={"lora_name": "run", "lora_path": "run"})
    assert response.json() == {"status": "ok", "model": "run"} and engine.names() == ["base", "run"]
    assert app.post("/v1/unload_lora_adapter", json={"lora_name": "run"}).status_code == 200
    assert engine.names() == ["base"]


# --- request bodies and failures -----------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413(engine):
    app = client(engine, max_body_bytes=1000)
    big = {"model": "nope", "prompt": "x" * 2000}
    chunks = (
        json.dumps(big)[i : i + 100].encode() for i in range(0, 2100, 100)
    )  # no Content-Length: chunked
    for response in (
        app.post("/v1/completions", json=big),
        app.post("/v1/completions", content=chunks),
    ):
        refused = error(response, 413)
        assert refused["code"] == "request_too_large"
        assert refused["message"] == (
            "POST /v1/completions: the request body is larger than this server's limit of "
            "1000 bytes: send a shorter request, or start the server with a larger "
            "--max-body-bytes"
        )
    # Under the limit the request reaches the route (which knows no model "nope").
    assert (
        error(app.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)["code"]
        == "model_not_found"
    )
    assert guard.Access().max_body_bytes == 4 * 1024 * 1024


def test_a_malformed_body_is_named_as_such(engine):
    app = client(engine)
    cases = [
        (
            b'{"model": "base", "prompt": ',
            "application/json",
            None,
            "the request body is not valid JSON (Expecting value at character 28); send a JSON object",
        ),
        (
            b'["base"]',
            "application/json",
            None,
            "the request body must be a JSON object sent with Content-Type: application/json",
        ),
        (
            b'{"model": "base", "prompt": "x"}',
            "text/plain",
            None,
            "the request body must be a JSON object sent with Content-Type: application/json",
        ),
        (
            b"",
            "application/json",
            None,
            "the request body is empty; send a JSON object with Content-Type: application/json",
        ),
        (
            b'{"model": "base", "prompt": "x", "temperature": 9}',
            "application/json",
            "temperature",
            "temperature: Input should be less than or equal to 2",
        ),
    ]
    for body, kind, param, message in cases:
        refused = error(
            app.post("/v1/completions", content=body, headers={"Content-Type": kind}), 400
        )
        assert (refused["code"], refused["param"], refused["message"]) == (
            "invalid_request",
            param,
            message,
        ), body


def test_unknown_routes_and_methods_answer_json(engine):
    app = client(engine)
    assert error(app.get("/v1/nothing"), 404) == {
        "message": "GET /v1/nothing: Not Found",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    assert error(app.get("/v1/completions"), 405)["code"] == "method_not_allowed"


def test_an_unexpected_failure_is_a_500_without_details(engine, monkeypatch):
    def broken(job):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(engine, "stream", broken)
    refused = error(
        client(engine).post("/v1/completions", json={"model": "base", "prompt": "hi"}), 500
    )
    assert refused == {
        "message": "the server failed while answering this request; its log has the details",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--allow-runtime-lora"],
            (
                "--allow-runtime-lora needs --adapter-root DIR, the folder clients may load adapters "
                "from\n  - for example: --allow-runtime-lora --adapter-root runs"
            ),
        ),
        (["--adapter-root", "."], "--adapter-root only applies with --allow-runtime-lora"),
        (
            ["--allow-runtime-lora", "--adapter-root", "no-such-folder"],
            "--adapter-root no-such-folder: not a directory",
        ),
        (["--api-key", " "], "--api-key is empty\n  - give a key, or unset LORA_TUNE_API_KEY"),
        (
            ["--engine", "vllm", "--allow-runtime-lora", "--adapter-root", "."],
            "--engine vllm: vLLM cannot keep runtime adapter loading to --adapter-root",
        ),
        (
            ["--engine", "vllm", "--max-body-bytes", "100"],
            "--engine vllm: --max-body-bytes applies to the local engine",
        ),
    ],
)
def test_serve_options_that_would_not_do_what_they_say(tiny, capsys, args, message):
    assert run_cli("serve", tiny / "tiny-llama", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "key", ["clé-secrète", "two words", "tab\there", "bell\x07", "ends=with=equals", "ok!"]
)
def test_a_key_no_bearer_header_can_carry_is_refused_at_start(tiny, capsys, monkeypatch, key):
    # A bad --adapter-root too, checked after the key: without the key's check serve stops there, not serving.
    for args in (["--api-key", key], []):
        monkeypatch.setenv("LORA_TUNE_API_KEY", key)
        assert (
            run_cli(
                "serve",
                tiny / "tiny-llama",
                "--allow-runtime-lora",
                "--adapter-root",
                "no-such-folder",
                *args,
            )
            == 2
        )
        err = capsys.readouterr().err
        assert err.startswith(
            "error: --api-key (or LORA_TUNE_API_KEY) holds characters that an 'Authorization: "
            "Bearer' header cannot carry"
        ), err
        assert (
            "use only letters A-Z and a-z, digits and - . _ ~ + /, then optionally = at the end"
            in err
        )
        assert key not in err and "Traceback" not in err


def test_keys_of_token68_characters_are_accepted():
    for key in ("A-Za-z0-9._~+/", "c2VjcmV0==", "  padded-by-the-shell\n"):
        assert guard.make_access(key, False, None, None).api_key == key.strip()


def test_vllm_gets_the_key_by_environment_and_runtime_loading_off():
    environ = {"PATH": "/bin", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert serve_vllm.vllm_environment(environ, KEY) == {"PATH": "/bin", "VLLM_API_KEY": KEY}
    assert serve_vllm.vllm_environment(environ, None) == {"PATH": "/bin"}


# --- over a real socket --------------------------------------------------------------------------


@pytest.fixture
def live(engine):
    """The app with a key and a 1000-byte limit under uvicorn on a free port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            serve.create_app(engine, guard.Access(api_key=KEY, max_body_bytes=1000)),
            host="127.0.0.1",
            port=port,
            log_level="critical",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def test_openai_clients_and_chunked_bodies_over_http(live):
    openai = pytest.importorskip("openai")
    url = f"http://127.0.0.1:{live}/v1"
    good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in good.models.list().data] == ["base"]
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0, timeout=30).models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"

    connection = http.client.HTTPConnection("127.0.0.1", live, timeout=30)
    chunks = [b'{"model": "base", "prompt": "', *([b"x" * 500] * 4), b'"}']
    connection.request(
        "POST",
        "/v1/completions",
        body=iter(chunks),
        encode_chunked=True,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 413 and response.getheader("content-length") is not None
    assert (
        body["error"]["code"] == "request_too_large"
        and "--max-body-bytes" in body["error"]["message"]
    )
