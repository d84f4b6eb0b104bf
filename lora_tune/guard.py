"""Who may use `lora-tune serve`, how much one request may send, and where its adapters may come from.

`Access` is what serve's options allow (checked by `make_access`): the API key, the largest
body, and the one folder runtime-loaded adapters may come from (runtime loading is off without
it); `runtime_adapter` keeps a client's adapter, every file in it and its run's recipe inside
that folder. The warning for a server reachable from other machines without a key lives here too.

The key and the body size are checked by plain ASGI middleware, so they run before FastAPI reads
or parses a body: a client without the key learns nothing about the routes, and an oversized body
is refused before it is held in memory. Refusals are OpenAI-style JSON errors, as clients expect.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import output, runs
from .errors import UserError
from .serve_errors import HTTP_CODES, ServeError, error_body

API_KEY_ENV = "LORA_TUNE_API_KEY"
# RFC 6750's token68: what an `Authorization: Bearer` header carries unchanged. Any other character
# (non-ASCII, a space, a control character) reaches the server re-encoded or cut, and never matches.
KEY_CHARACTERS = re.compile(r"[A-Za-z0-9._~+/-]+=*")
KEY_RULE = (
    "letters A-Z and a-z, digits and - . _ ~ + /, then optionally = at the end (RFC 6750's token68)"
)
OPEN_PATHS = ("/health",)  # as in vLLM: load balancers probe it without credentials
DEFAULT_MAX_BODY_BYTES = (
    4 * 1024 * 1024
)  # a 128k-token prompt is ~0.5 MB of text, JSON escaping at most doubles it


async def send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def bearer_token(scope) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, else None."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class RequireKey:
    """Answers 401 to any request (except OPEN_PATHS) without `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token = bearer_token(scope)
        # compare_digest takes as long for a near miss as for a wild guess, so timing tells nothing.
        if token is not None and hmac.compare_digest(token.encode(), self.key):
            return await self.app(scope, receive, send)
        problem = "missing API key" if token is None else "invalid API key"
        message = (
            f"{problem}: send the header 'Authorization: Bearer KEY' with the key the server was started "
            "with (OpenAI clients: api_key=KEY)"
        )
        await send_json(
            send,
            401,
            error_body(message, "invalid_request_error", HTTP_CODES[401]),
            ((b"www-authenticate", b"Bearer"),),
        )


class LimitBody:
    """Answers 413 to a request whose body is over `limit` bytes: by its Content-Length at once,
    and by counting what really arrives, since a client may send chunks without a length, or lie."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            message = f"{scope['method']} {scope['path']}: {self.refusal()}"
            return await send_json(
                send, 413, error_body(message, "invalid_request_error", HTTP_CODES[413])
            )
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # An HTTPException passes through FastAPI's body reading to the app's handler.
                from starlette.exceptions import HTTPException

                raise HTTPException(413, self.refusal())
            return message

        await self.app(scope, counted, send)

    def refusal(self) -> str:
        return (
            f"the request body is larger than this server's limit of {self.limit} bytes: send a shorter "
            "request, or start the server with a larger --max-body-bytes"
        )


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """The warning to print when the server is reachable from other machines without a key."""
    if api_key or is_loopback(host):
        return None
    return (
        f"listening on {host}:{port} without an API key: anyone who can reach this port can use the models. "
        f"Set --api-key (or {API_KEY_ENV}), or listen on 127.0.0.1."
    )


def warn_if_exposed(host: str, port: int, api_key: str | None) -> None:
    warning = exposure_warning(host, port, api_key)
    if warning:
        output.console(stderr=True).print(f"[bold yellow]warning:[/] {warning}", highlight=False)


@dataclass
class Access:
    """What clients of the server may do: the key they must send (None: no key), the folder
    runtime adapter loading may read from (None: runtime loading off), the largest body."""

    api_key: str | None = None
    runtime_adapter_root: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def make_access(
    api_key: str | None,
    allow_runtime_lora: bool,
    adapter_root: Path | None,
    max_body_bytes: int | None,
) -> Access:
    """Access from serve's options. Raises UserError for options that would not do what they say."""
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty", [f"give a key, or unset {API_KEY_ENV}"])
    if api_key is not None and not KEY_CHARACTERS.fullmatch(api_key.strip()):
        # The key itself is not shown: it is a secret, and may be in a terminal's scrollback.
        raise UserError(
            f"--api-key (or {API_KEY_ENV}) holds characters that an 'Authorization: Bearer' "
            f"header cannot carry, so no client could ever send it",
            [
                f"use only {KEY_RULE}",
                "for example: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            ],
        )
    if adapter_root is not None and not allow_runtime_lora:
        raise UserError(
            "--adapter-root only applies with --allow-runtime-lora",
            ["add --allow-runtime-lora, or drop --adapter-root"],
        )
    if allow_runtime_lora and adapter_root is None:
        raise UserError(
            "--allow-runtime-lora needs --adapter-root DIR, the folder clients may load adapters from",
            ["for example: --allow-runtime-lora --adapter-root runs"],
        )
    if adapter_root is not None and not adapter_root.is_dir():
        raise UserError(
            f"--adapter-root {adapter_root}: not a directory",
            ["give the folder holding the adapters clients may load"],
        )
    return Access(
        api_key.strip() if api_key else None,
        adapter_root.resolve() if adapter_root else None,
        max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )


def runtime_root(access: Access) -> Path:
    """The folder runtime-loaded adapters must lie in. Raises ServeError (403) when runtime loading is off."""
    if access.runtime_adapter_root is None:
        raise ServeError(
            403,
            "loading and unloading adapters at run time is off on this server; start it with "
            "--allow-runtime-lora --adapter-root DIR to allow adapters under DIR",
            "runtime_lora_disabled",
        )
    return access.runtime_adapter_root


def runtime_adapter(root: Path, given: str) -> Path:
    """The adapter directory a runtime request names (relative to root, or absolute), resolved
    with links followed. Raises ServeError (403) unless it, every file in it and its run's recipe
    (which adapters.trained_on reads) lie in root."""
    try:
        path = (root / given).resolve()  # an absolute `given` replaces root here
        adapter = runs.adapter_dir(path) if path.is_relative_to(root) else None
        inside = [path, *(adapter_files(adapter) if adapter else [])]
    except (
        OSError,
        ValueError,
        RuntimeError,
    ) as exc:  # a NUL byte, a name too long, an unlistable folder, a link loop
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ServeError(
            400,
            f"{given!r} is not a usable path ({reason}); name an adapter folder under the server's "
            "--adapter-root",
            "invalid_adapter",
            "lora_path",
        ) from None
    if not all(p.is_relative_to(root) for p in inside):
        raise ServeError(
            403,
            f"{given}: outside this server's --adapter-root (after following links); put the "
            "adapter under that folder and name it relative to it",
            "adapter_outside_root",
            "lora_path",
        )
    return path


def adapter_files(adapter: Path) -> list[Path]:
    """What loading `adapter` reads, links followed: the folder, its files, and the recipe of the
    run it belongs to (read for the model it was trained on)."""
    files = [adapter.resolve(), *(f.resolve() for f in adapter.iterdir())]
    if adapter.name == runs.ADAPTER:
        files.append((adapter.parent / runs.RECIPE).resolve())
    return files
