"""The model behind `lora-tune serve`: one base loaded once, adapters loaded into it by name.

`Engine` checks and loads adapters (`read_adapter_config` reads and checks one's config), turns a
request into a `Generation` and runs it with only that generation's adapter active, one at a time;
`StopCutter` cuts the streamed text at stop strings. Failures a client caused are `ServeError`s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from . import adapters, hardware, models, output, runs
from .errors import UserError
from .serve_errors import ServeError
from .serve_schemas import AdapterConfig, ChatRequest, Sampling

console = output.console()


def read_adapter_config(adapter: Path, given: str) -> AdapterConfig:
    """adapter_config.json, checked. Raises ServeError (400) naming the file and the field, never
    quoting the file, which may hold anything."""
    where = f"{given}: adapter_config.json"
    fix = "restore the file from the run that trained the adapter, or retrain it"
    try:
        return AdapterConfig.model_validate_json((adapter / "adapter_config.json").read_bytes())
    except OSError as exc:
        raise ServeError(
            400,
            f"{where} cannot be read ({exc.strerror}); {fix}",
            "invalid_adapter_config",
            "lora_path",
        ) from None
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        field = (
            str(first["loc"][0]) if first["loc"] else ""
        )  # the key; deeper parts name union members
        problem = f"{field}: {first['msg']}" if field else first["msg"]
        raise ServeError(
            400,
            f"{where} is not a valid PEFT adapter config ({problem}); {fix}",
            "invalid_adapter_config",
            "lora_path",
        ) from None


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
        self.device = hardware.device()
        self.model = (
            models.load_model(base, models.resolve_dtype(dtype_name)).to(self.device).eval()
        )
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
            raise ServeError(
                400, f"a model named {name!r} is already served", "model_exists", "lora_name"
            )
        adapter = runs.adapter_dir(Path(path))
        if adapter is None:
            raise ServeError(
                400, f"{path}: not a run or PEFT adapter directory", "invalid_adapter", "lora_path"
            )
        self.check_fits(read_adapter_config(adapter, path), path)
        try:
            adapters.check_adapter_fits(adapter, self.model, self.base_section)
        except UserError as exc:
            raise ServeError(
                400, self.unfit_message(exc, path, runtime), "adapter_for_another_base", "lora_path"
            ) from None
        try:
            tokenizer = adapters.adapter_tokenizer(adapter, self.base_section)
        except (
            UserError,
            OSError,
            ValueError,
        ) as exc:  # what a missing or corrupt tokenizer file raises
            console.print(f"{path}: its tokenizer does not load: {exc}")
            raise ServeError(
                400,
                f"{path}: the tokenizer saved with the adapter does not load; the server's log "
                "has the details",
                "invalid_adapter",
                "lora_path",
            ) from None
        self.attach(name, adapter, path)
        self.tokenizers[name], self.paths[name] = tokenizer, str(adapter)

    def check_fits(self, config: AdapterConfig, path: str) -> None:
        """Refuse (400) an adapter trained on another base, or one that cannot share the base."""
        from peft import PeftType

        trained_on = config.base_model_name_or_path or ""
        if _same_model(trained_on, self.base_section.id) is False:
            raise ServeError(
                400,
                f"{path} was trained on {trained_on}; this server serves {self.base_section.id}",
                "adapter_for_another_base",
                "lora_path",
            )
        if config.trainable_token_indices or config.peft_type != "LORA":
            kind = (
                config.peft_type
                if config.peft_type in PeftType.__members__
                else "of an unknown peft_type"
            )
            what = "adds tokens" if config.trainable_token_indices else f"is {kind}"
            raise ServeError(
                400,
                f"{path}: only plain LoRA adapters share a base (this one {what}); merge it "
                "(lora-tune merge) and serve the merged model",
                "unsupported_adapter",
                "lora_path",
            )

    def unfit_message(self, exc: UserError, path: str, runtime: bool) -> str:
        """The answer to an adapter of another architecture. Its headline names the model the adapter
        was trained on as read from that model's config.json, which for a client's adapter may lie
        anywhere on this machine: a client gets the served base only, the log gets the rest."""
        if not runtime:
            return exc.headline
        console.print(exc.headline)
        config = self.model.config
        kind = f"{config.model_type} ({', '.join(config.architectures or [type(self.model).__name__])})"
        return (
            f"{path}: this adapter was trained on a model of another architecture: it changes layers that "
            f"{self.base_section.id}, a {kind} model, does not have; load an adapter trained on it (the "
            "server's log names the model this one was trained on)"
        )

    def attach(self, name: str, adapter: Path, path: str) -> None:
        """Load the adapter's weights into the model; on failure leave the model as it was."""
        from peft import PeftModel

        with self.lock:
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(
                        self.model, str(adapter), adapter_name=name
                    ).eval()
                else:
                    self.peft.load_adapter(str(adapter), adapter_name=name)
            except Exception as exc:  # safetensors, torch and peft each raise their own types
                if self.peft is not None and name in self.peft.peft_config:
                    self.peft.delete_adapter(name)
                console.print(f"{path} does not load on {self.base_section.id}: {exc}")
                # Only a shape mismatch is quoted: other messages may repeat what the files hold.
                line = next(
                    (text.strip() for text in str(exc).splitlines() if "size mismatch" in text),
                    None,
                )
                detail = (
                    line[:300]
                    if line
                    else f"PEFT raised {type(exc).__name__}; the server's log has the details"
                )
                raise ServeError(
                    400,
                    f"{path} does not load on {self.base_section.id}: {detail}",
                    "adapter_for_another_base" if line else "invalid_adapter",
                    "lora_path",
                ) from None

    def remove(self, name: str) -> None:
        if name not in self.paths:
            raise ServeError(
                404, f"no adapter named {name!r} is loaded", "model_not_found", "lora_name"
            )
        with self.lock:
            if (
                len(self.paths) == 1
            ):  # PEFT keeps at least one adapter: drop the LoRA layers instead
                self.model, self.peft = self.peft.unload(), None
            else:
                self.peft.delete_adapter(name)
        del self.tokenizers[name], self.paths[name]

    def names(self) -> list[str]:
        return list(self.tokenizers)

    # --- generation ---
    def tokenizer(self, name: str):
        if name not in self.tokenizers:
            raise ServeError(
                404,
                f"the model {name!r} does not exist; served: {', '.join(self.tokenizers)}",
                "model_not_found",
                "model",
            )
        return self.tokenizers[name]

    def prepare(
        self, request: Sampling, prompt_ids: list[int], max_tokens: int | None
    ) -> Generation:
        max_tokens = max_tokens or 16
        if self.context and len(prompt_ids) + max_tokens > self.context:
            raise ServeError(
                400,
                f"this model's maximum context length is {self.context} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more",
                "context_length_exceeded",
                "messages" if isinstance(request, ChatRequest) else "prompt",
            )
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        return Generation(
            request.model,
            prompt_ids,
            max_tokens,
            request.temperature,
            request.top_p,
            [s for s in stop if s],
            request.seed,
            request.stream,
        )

    def stream(self, job: Generation) -> Iterator[str]:
        """Text pieces of the completion as they are generated, cut before any stop string.
        Holds the model (and its active adapter) until the generation ends or is abandoned."""
        from transformers import TextIteratorStreamer

        tokenizer = self.tokenizer(job.model)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        abandoned = threading.Event()
        kwargs = self.generate_kwargs(job, tokenizer, streamer, abandoned)
        result: dict[str, Any] = {}

        def run(model):
            with torch.no_grad():
                try:
                    result["ids"] = model.generate(**kwargs)[0, len(job.prompt_ids) :].tolist()
                except Exception as exc:  # re-raised in the request's thread, which answers 500
                    result["error"] = exc
                finally:
                    streamer.end()

        with self.lock, contextlib.ExitStack() as stack:
            model = self.activate(job.model, stack)
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
        self.finish(job, result.get("ids", []), cutter.stopped, tokenizer)

    def generate_kwargs(
        self, job: Generation, tokenizer, streamer, abandoned: threading.Event
    ) -> dict[str, Any]:
        """model.generate's arguments: greedy at temperature 0, else sampled; stops early once `abandoned` is set."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Abandoned(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full(
                    (input_ids.shape[0],),
                    abandoned.is_set(),
                    dtype=torch.bool,
                    device=input_ids.device,
                )

        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([job.prompt_ids], device=self.device),
            "max_new_tokens": job.max_tokens,
            "streamer": streamer,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "stopping_criteria": StoppingCriteriaList([Abandoned()]),
        }
        kwargs |= (
            {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
            if job.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        return kwargs

    def activate(self, name: str, stack: contextlib.ExitStack):
        """The model to generate with, with only `name`'s adapter active (none for the base, until `stack`
        closes). The caller holds the lock."""
        if self.peft is None:
            return self.model
        if name == self.base_name:
            stack.enter_context(self.peft.disable_adapter())
        else:
            self.peft.set_adapter(name)
        return self.peft

    @staticmethod
    def finish(job: Generation, ids: list[int], stopped: bool, tokenizer) -> None:
        """Record on `job` why its generation ended and how many tokens it made."""
        ended = stopped or (ids and ids[-1] == tokenizer.eos_token_id) or len(ids) < job.max_tokens
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
