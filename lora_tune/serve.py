"""`lora-tune serve`: one base model and many adapters behind an OpenAI-compatible HTTP API.

The request's `model` picks an adapter by name; the base's name serves the base with adapters
disabled. One generation runs at a time, with only its adapter active, so a response is
exactly what its adapter alone produces. For throughput (batching requests across adapters)
`--engine vllm` hands the same adapters to vLLM's own server.

This module holds the HTTP app (the routes, answered from a `serve_engine.Engine`) and the
command (`run`). The request bodies live in serve_schemas.py, the model and generation in
serve_engine.py, what clients may do (`guard.Access`) in guard.py, the OpenAI error answers in
serve_errors.py, and the `--engine vllm` command in serve_vllm.py.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from . import adapters, guard, models, output, runs
from .errors import UserError
from .serve_engine import Engine, Generation
from .serve_errors import ServeError, add_error_handlers
from .serve_schemas import ChatRequest, CompletionRequest, LoadAdapter, UnloadAdapter
from .serve_vllm import run_vllm

console = output.console()


# --- the HTTP API ------------------------------------------------------------------------------


def create_app(engine: Engine, access: guard.Access | None = None):
    """The FastAPI application answering OpenAI's /v1 routes (and vLLM's adapter routes)."""
    from fastapi import FastAPI

    access = access or guard.Access()
    app = FastAPI(title="lora-tune serve")
    add_error_handlers(app)
    app.add_middleware(guard.LimitBody, limit=access.max_body_bytes)
    if access.api_key:  # added last, so it runs first: no key, no look at the body
        app.add_middleware(guard.RequireKey, key=access.api_key)

    @app.get("/health")
    def health():
        return {}

    add_model_routes(app, engine)
    add_generation_routes(app, engine)
    add_adapter_routes(app, engine, access)
    return app


def add_model_routes(app, engine: Engine) -> None:
    """GET /v1/models: the base and every adapter, each adapter with the base as its parent."""

    @app.get("/v1/models")
    def list_models():
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": engine.created,
                    "owned_by": "lora-tune",
                    "root": engine.paths.get(name, engine.base_section.id),
                    "parent": engine.base_name if name in engine.paths else None,
                }
                for name in engine.names()
            ],
        }


def add_generation_routes(app, engine: Engine) -> None:
    """POST /v1/completions and /v1/chat/completions: tokenize the request, generate, answer."""

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        tokenizer = engine.tokenizer(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ServeError(400, "one prompt per request", "invalid_request", "prompt")
        job = engine.prepare(body, tokenizer(prompts[0])["input_ids"], body.max_tokens)
        return respond(
            engine, job, "text_completion", lambda text: {"text": text, "logprobs": None}
        )

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest):
        tokenizer = engine.tokenizer(body.model)
        if not tokenizer.chat_template:
            raise ServeError(
                400,
                f"{body.model} has no chat template; use /v1/completions",
                "no_chat_template",
                "model",
            )
        text = tokenizer.apply_chat_template(
            [m.plain() for m in body.messages], tokenize=False, add_generation_prompt=True
        )
        job = engine.prepare(
            body,
            tokenizer(text, add_special_tokens=False)["input_ids"],
            body.max_completion_tokens or body.max_tokens,
        )
        return respond(
            engine,
            job,
            "chat.completion",
            lambda text: {"message": {"role": "assistant", "content": text}},
            lambda text: {"delta": {"content": text}},
            first_delta={"delta": {"role": "assistant"}},
        )


def respond(
    engine: Engine, job: Generation, kind: str, whole, delta=None, first_delta: dict | None = None
):
    """The OpenAI answer to `job`: one JSON object, or server-sent chunks when the request streams.
    `whole(text)` is a choice's content; `delta(text)` a chunk's, where it differs."""
    from fastapi.responses import StreamingResponse

    request_id = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": request_id, "created": int(time.time()), "model": job.model}
    if not job.stream:
        text = "".join(engine.stream(job))
        choice = {"index": 0, **whole(text), "finish_reason": job.finish_reason}
        usage = {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt_ids) + job.completion_tokens,
        }
        return head | {"object": kind, "choices": [choice], "usage": usage}

    chunk_kind = kind + ".chunk" if kind.startswith("chat") else kind
    piece_of = delta or whole

    def events():
        if first_delta:
            yield sse(
                head
                | {
                    "object": chunk_kind,
                    "choices": [{"index": 0, **first_delta, "finish_reason": None}],
                }
            )
        for text in engine.stream(job):
            yield sse(
                head
                | {
                    "object": chunk_kind,
                    "choices": [{"index": 0, **piece_of(text), "finish_reason": None}],
                }
            )
        last = {"delta": {}} if delta else whole("")
        yield sse(
            head
            | {
                "object": chunk_kind,
                "choices": [{"index": 0, **last, "finish_reason": job.finish_reason}],
            }
        )
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def add_adapter_routes(app, engine: Engine, access: guard.Access) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter, vLLM's routes, where access allows them."""

    @app.post("/v1/load_lora_adapter")
    def load_adapter(body: LoadAdapter):
        adapter = guard.runtime_adapter(guard.runtime_root(access), body.lora_path)
        engine.add(body.lora_name, str(adapter), runtime=True)
        return {"status": "ok", "model": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    def unload_adapter(body: UnloadAdapter):
        guard.runtime_root(access)
        engine.remove(body.lora_name)
        return {"status": "ok", "model": body.lora_name}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# --- the command ---------------------------------------------------------------------------------


def resolve(target: str, adapter_specs: list[str]):
    """(base model section, {adapter name: adapter dir}) from `serve TARGET --adapter NAME=PATH ...`."""
    from .recipe import ModelSection

    named: dict[str, Path] = {}
    adapter = runs.adapter_dir(Path(target))
    if adapter is not None:
        recipe = runs.run_recipe(adapter)
        base = adapters.adapter_base_section(adapter, recipe.model if recipe else None)
        named[(adapter.parent if adapter.name == runs.ADAPTER else adapter).resolve().name] = (
            adapter
        )
    else:
        base = ModelSection(id=target)
        models.load_config(base)  # a clear error for a path or id that is not a model
    for spec in adapter_specs:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise UserError(
                f"--adapter {spec!r}: expected NAME=PATH",
                ["for example: --adapter support=runs/support"],
            )
        found = runs.adapter_dir(Path(where))
        if found is None:
            raise UserError(f"--adapter {spec!r}: {where} is not a run or PEFT adapter directory")
        if name in named:
            raise UserError(
                f"--adapter {spec!r}: the name {name!r} is taken",
                ["give each adapter its own name"],
            )
        named[name] = found
    return base, named


def run(
    target: str,
    adapter_specs: list[str],
    host: str,
    port: int,
    engine_name: str = "local",
    base_name: str | None = None,
    dtype: str = "auto",
    api_key: str | None = None,
    allow_runtime_lora: bool = False,
    adapter_root: Path | None = None,
    max_body_bytes: int | None = None,
) -> None:
    """Serve until interrupted."""
    import importlib.util

    access = guard.make_access(api_key, allow_runtime_lora, adapter_root, max_body_bytes)
    base, named = resolve(target, adapter_specs)
    base_name = base_name or base.id
    if base_name in named:
        raise UserError(
            f"--base-name {base_name!r} is also an adapter's name", ["choose another --base-name"]
        )
    if engine_name == "vllm":
        return run_vllm(
            base, named, host, port, base_name, access, explicit_limit=max_body_bytes is not None
        )
    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise UserError("serve needs FastAPI and uvicorn", ["pip install 'lora-tune[serve]'"])
    import uvicorn

    engine = Engine(base, base_name, dtype)
    for name, adapter in named.items():
        try:
            engine.add(name, str(adapter))
        except ServeError as exc:
            raise UserError(f"--adapter {name}: {exc.message}") from None
    guard.warn_if_exposed(host, port, access.api_key)
    console.print(
        f"Serving {', '.join(engine.names())} on {engine.device}; OpenAI clients: "
        f"base_url=http://{host}:{port}/v1"
    )
    uvicorn.run(create_app(engine, access), host=host, port=port, log_level="warning")
