"""`lora-tune serve`: one base model and many adapters behind an OpenAI-compatible HTTP API.

The request's `model` picks an adapter by name; the base's name serves the base with adapters
disabled. One generation runs at a time, with only its adapter active, so a response is
exactly what its adapter alone produces. For throughput (batching requests across adapters)
`--engine vllm` hands the same adapters to vLLM's own server.

This module holds the engine, the request models, the routes and the command. What clients may
do (`guard.Access`) lives in guard.py, the OpenAI error answers in serve_errors.py, and the
`--engine vllm` command in serve_vllm.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import guard, models, output, runs
from .errors import UserError
from .serve_errors import ServeError, add_error_handlers
from .serve_vllm import run_vllm

console = output.console()


# --- requests, as the OpenAI API defines them (the fields lora-tune acts on) -----------------

class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1


class CompletionRequest(Sampling):
    prompt: str | list[str]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart]

    def plain(self) -> dict:
        """{role, content} with the content as one string, as chat templates expect."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str


class UnloadAdapter(BaseModel):
    lora_name: str


class AdapterConfig(BaseModel):
    """The adapter_config.json fields that serving and PEFT compute with, strictly typed: PEFT
    itself meets a wrong type only deep inside building the layers. Other fields pass through."""

    model_config = ConfigDict(extra="allow", strict=True)
    peft_type: str
    base_model_name_or_path: str | None = None
    r: int = Field(8, ge=1)
    lora_alpha: float = 8
    target_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None


def read_adapter_config(adapter: Path, given: str) -> AdapterConfig:
    """adapter_config.json, checked. Raises ServeError (400) naming the file and the field, never
    quoting the file, which may hold anything."""
    where = f"{given}: adapter_config.json"
    fix = "restore the file from the run that trained the adapter, or retrain it"
    try:
        return AdapterConfig.model_validate_json((adapter / "adapter_config.json").read_bytes())
    except OSError as exc:
        raise ServeError(400, f"{where} cannot be read ({exc.strerror}); {fix}", "invalid_adapter_config",
                         "lora_path") from None
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""  # the key; deeper parts name union members
        problem = f"{field}: {first['msg']}" if field else first["msg"]
        raise ServeError(400, f"{where} is not a valid PEFT adapter config ({problem}); {fix}",
                         "invalid_adapter_config", "lora_path") from None


@dataclass
class Generation:
    """One request, tokenized and checked: what the engine runs."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    finish_reason: str = "length"
    completion_tokens: int = 0


class Engine:
    """The base model, loaded once, and the adapters loaded into it by name."""

    def __init__(self, base, base_name: str, dtype_name: str = "auto"):
        self.base_section, self.base_name = base, base_name
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = models.load_model(base, models.resolve_dtype(dtype_name)).to(self.device).eval()
        self.tokenizers = {base_name: models.load_tokenizer(base)}
        self.paths: dict[str, str] = {}
        self.peft = None  # the PeftModel, once an adapter is loaded
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    # --- adapters ---
    def add(self, name: str, path: str, runtime: bool = False) -> None:
        """Load an adapter under `name`. Raises ServeError (400) when it cannot serve here.
        A `runtime` adapter is a client's: answers name nothing read from outside its folder."""
        if name in self.tokenizers:
            raise ServeError(400, f"a model named {name!r} is already served", "model_exists", "lora_name")
        adapter = runs.adapter_dir(Path(path))
        if adapter is None:
            raise ServeError(400, f"{path}: not a run or PEFT adapter directory", "invalid_adapter", "lora_path")
        self.check_fits(read_adapter_config(adapter, path), path)
        try:
            models.check_adapter_fits(adapter, self.model, self.base_section)
        except UserError as exc:
            raise ServeError(400, self.unfit_message(exc, path, runtime), "adapter_for_another_base",
                             "lora_path") from None
        try:
            tokenizer = models.adapter_tokenizer(adapter, self.base_section)
        except (UserError, OSError, ValueError) as exc:  # what a missing or corrupt tokenizer file raises
            console.print(f"{path}: its tokenizer does not load: {exc}")
            raise ServeError(400, f"{path}: the tokenizer saved with the adapter does not load; the server's log "
                                  "has the details", "invalid_adapter", "lora_path") from None
        self.attach(name, adapter, path)
        self.tokenizers[name], self.paths[name] = tokenizer, str(adapter)

    def check_fits(self, config: AdapterConfig, path: str) -> None:
        """Refuse (400) an adapter trained on another base, or one that cannot share the base."""
        from peft import PeftType

        trained_on = config.base_model_name_or_path or ""
        if _same_model(trained_on, self.base_section.id) is False:
            raise ServeError(400, f"{path} was trained on {trained_on}; this server serves {self.base_section.id}",
                             "adapter_for_another_base", "lora_path")
        if config.trainable_token_indices or config.peft_type != "LORA":
            kind = config.peft_type if config.peft_type in PeftType.__members__ else "of an unknown peft_type"
            what = "adds tokens" if config.trainable_token_indices else f"is {kind}"
            raise ServeError(400, f"{path}: only plain LoRA adapters share a base (this one {what}); merge it "
                                  "(lora-tune merge) and serve the merged model", "unsupported_adapter", "lora_path")

    def unfit_message(self, exc: UserError, path: str, runtime: bool) -> str:
        """The answer to an adapter of another architecture. Its headline names the model the adapter
        was trained on as read from that model's config.json, which for a client's adapter may lie
        anywhere on this machine: a client gets the served base only, the log gets the rest."""
        if not runtime:
            return exc.headline
        console.print(exc.headline)
        config = self.model.config
        kind = f"{config.model_type} ({', '.join(config.architectures or [type(self.model).__name__])})"
        return (f"{path}: this adapter was trained on a model of another architecture: it changes layers that "
                f"{self.base_section.id}, a {kind} model, does not have; load an adapter trained on it (the "
                "server's log names the model this one was trained on)")

    def attach(self, name: str, adapter: Path, path: str) -> None:
        """Load the adapter's weights into the model; on failure leave the model as it was."""
        from peft import PeftModel

        with self.lock:
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, str(adapter), adapter_name=name).eval()
                else:
                    self.peft.load_adapter(str(adapter), adapter_name=name)
            except Exception as exc:  # safetensors, torch and peft each raise their own types
                if self.peft is not None and name in self.peft.peft_config:
                    self.peft.delete_adapter(name)
                console.print(f"{path} does not load on {self.base_section.id}: {exc}")
                # Only a shape mismatch is quoted: other messages may repeat what the files hold.
                line = next((l.strip() for l in str(exc).splitlines() if "size mismatch" in l), None)
                detail = line[:300] if line else f"PEFT raised {type(exc).__name__}; the server's log has the details"
                raise ServeError(400, f"{path} does not load on {self.base_section.id}: {detail}",
                                 "adapter_for_another_base" if line else "invalid_adapter", "lora_path") from None

    def remove(self, name: str) -> None:
        if name not in self.paths:
            raise ServeError(404, f"no adapter named {name!r} is loaded", "model_not_found", "lora_name")
        with self.lock:
            if len(self.paths) == 1:  # PEFT keeps at least one adapter: drop the LoRA layers instead
                self.model, self.peft = self.peft.unload(), None
            else:
                self.peft.delete_adapter(name)
        del self.tokenizers[name], self.paths[name]

    def names(self) -> list[str]:
        return list(self.tokenizers)

    # --- generation ---
    def tokenizer(self, name: str):
        if name not in self.tokenizers:
            raise ServeError(404, f"the model {name!r} does not exist; served: {', '.join(self.tokenizers)}",
                             "model_not_found", "model")
        return self.tokenizers[name]

    def prepare(self, request: Sampling, prompt_ids: list[int], max_tokens: int | None) -> Generation:
        max_tokens = max_tokens or 16
        if self.context and len(prompt_ids) + max_tokens > self.context:
            raise ServeError(400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                                  f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more",
                             "context_length_exceeded", "messages" if isinstance(request, ChatRequest) else "prompt")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        return Generation(request.model, prompt_ids, max_tokens, request.temperature, request.top_p,
                          [s for s in stop if s], request.seed, request.stream)

    def stream(self, job: Generation) -> Iterator[str]:
        """Text pieces of the completion as they are generated, cut before any stop string.
        Holds the model (and its active adapter) until the generation ends or is abandoned."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tokenizer = self.tokenizer(job.model)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        abandoned = threading.Event()

        class Abandoned(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), abandoned.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = {"input_ids": torch.tensor([job.prompt_ids], device=self.device),
                                  "max_new_tokens": job.max_tokens, "streamer": streamer,
                                  "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                                  "stopping_criteria": StoppingCriteriaList([Abandoned()])}
        kwargs |= ({"do_sample": True, "temperature": job.temperature, "top_p": job.top_p} if job.temperature > 0
                   else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
        result: dict[str, Any] = {}

        def run(model):
            with torch.no_grad():
                try:
                    result["ids"] = model.generate(**kwargs)[0, len(job.prompt_ids):].tolist()
                except Exception as exc:  # re-raised in the request's thread, which answers 500
                    result["error"] = exc
                finally:
                    streamer.end()

        with self.lock, contextlib.ExitStack() as stack:
            model = self.model
            if self.peft is not None:
                model = self.peft
                if job.model == self.base_name:
                    stack.enter_context(self.peft.disable_adapter())
                else:
                    self.peft.set_adapter(job.model)
            if job.seed is not None:
                torch.manual_seed(job.seed)
            worker = threading.Thread(target=run, args=(model,), daemon=True)
            worker.start()
            cutter = StopCutter(job.stop)
            try:
                for piece in streamer:
                    text = cutter.feed(piece)
                    if text:
                        yield text
                    if cutter.stopped:
                        break
                if not cutter.stopped and (rest := cutter.flush()):
                    yield rest
            finally:
                abandoned.set()
                worker.join()
        if "error" in result:
            raise result["error"]
        ids = result.get("ids", [])
        ended = cutter.stopped or (ids and ids[-1] == tokenizer.eos_token_id) or len(ids) < job.max_tokens
        job.finish_reason = "stop" if ended else "length"
        job.completion_tokens = len(ids)


class StopCutter:
    """Cuts streamed text before the first stop string, holding back only what could begin one."""

    def __init__(self, stop: list[str]):
        self.stop, self.pending, self.stopped = stop, "", False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def feed(self, piece: str) -> str:
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _same_model(a: str, b: str) -> bool | None:
    """Whether two model ids or paths name the same model (None when one is unknown)."""
    if not a or not b:
        return None
    paths = [Path(x).expanduser() for x in (a, b)]
    if all(p.is_dir() for p in paths):
        return paths[0].resolve() == paths[1].resolve()
    return a == b


# --- the HTTP API ------------------------------------------------------------------------------

def create_app(engine: Engine, access: guard.Access | None = None):
    """The FastAPI application answering OpenAI's /v1 routes (and vLLM's adapter routes)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    access = access or guard.Access()
    app = FastAPI(title="lora-tune serve")
    add_error_handlers(app)
    app.add_middleware(guard.LimitBody, limit=access.max_body_bytes)
    if access.api_key:  # added last, so it runs first: no key, no look at the body
        app.add_middleware(guard.RequireKey, key=access.api_key)

    @app.get("/health")
    def health():
        return {}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": engine.created, "owned_by": "lora-tune",
             "root": engine.paths.get(name, engine.base_section.id),
             "parent": engine.base_name if name in engine.paths else None} for name in engine.names()]}

    @app.post("/v1/completions")
    def completions(body: CompletionRequest):
        tokenizer = engine.tokenizer(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ServeError(400, "one prompt per request", "invalid_request", "prompt")
        job = engine.prepare(body, tokenizer(prompts[0])["input_ids"], body.max_tokens)
        return respond(job, "text_completion", lambda text: {"text": text, "logprobs": None})

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest):
        tokenizer = engine.tokenizer(body.model)
        if not tokenizer.chat_template:
            raise ServeError(400, f"{body.model} has no chat template; use /v1/completions", "no_chat_template", "model")
        text = tokenizer.apply_chat_template([m.plain() for m in body.messages], tokenize=False,
                                             add_generation_prompt=True)
        job = engine.prepare(body, tokenizer(text, add_special_tokens=False)["input_ids"],
                             body.max_completion_tokens or body.max_tokens)
        return respond(job, "chat.completion", lambda text: {"message": {"role": "assistant", "content": text}},
                       lambda text: {"delta": {"content": text}}, first_delta={"delta": {"role": "assistant"}})

    def respond(job: Generation, kind: str, whole, delta=None, first_delta: dict | None = None):
        request_id = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": request_id, "created": int(time.time()), "model": job.model}
        if not job.stream:
            text = "".join(engine.stream(job))
            choice = {"index": 0, **whole(text), "finish_reason": job.finish_reason}
            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": job.completion_tokens,
                     "total_tokens": len(job.prompt_ids) + job.completion_tokens}
            return head | {"object": kind, "choices": [choice], "usage": usage}

        chunk_kind = kind + ".chunk" if kind.startswith("chat") else kind
        piece_of = delta or whole

        def events():
            if first_delta:
                yield sse(head | {"object": chunk_kind, "choices": [{"index": 0, **first_delta, "finish_reason": None}]})
            for text in engine.stream(job):
                yield sse(head | {"object": chunk_kind, "choices": [{"index": 0, **piece_of(text), "finish_reason": None}]})
            last = {"delta": {}} if delta else whole("")
            yield sse(head | {"object": chunk_kind, "choices": [{"index": 0, **last, "finish_reason": job.finish_reason}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

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

    return app


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
        base = models.adapter_base_section(adapter, recipe.model if recipe else None)
        named[(adapter.parent if adapter.name == runs.ADAPTER else adapter).resolve().name] = adapter
    else:
        base = ModelSection(id=target)
        models.load_config(base)  # a clear error for a path or id that is not a model
    for spec in adapter_specs:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise UserError(f"--adapter {spec!r}: expected NAME=PATH", ["for example: --adapter support=runs/support"])
        found = runs.adapter_dir(Path(where))
        if found is None:
            raise UserError(f"--adapter {spec!r}: {where} is not a run or PEFT adapter directory")
        if name in named:
            raise UserError(f"--adapter {spec!r}: the name {name!r} is taken", ["give each adapter its own name"])
        named[name] = found
    return base, named


def run(target: str, adapter_specs: list[str], host: str, port: int, engine_name: str = "local",
        base_name: str | None = None, dtype: str = "auto", api_key: str | None = None,
        allow_runtime_lora: bool = False, adapter_root: Path | None = None, max_body_bytes: int | None = None) -> None:
    """Serve until interrupted."""
    import importlib.util

    access = guard.make_access(api_key, allow_runtime_lora, adapter_root, max_body_bytes)
    base, named = resolve(target, adapter_specs)
    base_name = base_name or base.id
    if base_name in named:
        raise UserError(f"--base-name {base_name!r} is also an adapter's name", ["choose another --base-name"])
    if engine_name == "vllm":
        return run_vllm(base, named, host, port, base_name, access, explicit_limit=max_body_bytes is not None)
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
    console.print(f"Serving {', '.join(engine.names())} on {engine.device}; OpenAI clients: "
                  f"base_url=http://{host}:{port}/v1")
    uvicorn.run(create_app(engine, access), host=host, port=port, log_level="warning")
