"""Who may use `lora-tune serve`, and how much one request may send.

Both checks are plain ASGI middleware, so they run before FastAPI reads or parses a body: a
client without the key learns nothing about the routes, and an oversized body is refused
before it is held in memory. Refusals are OpenAI-style JSON errors, as clients expect.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re

API_KEY_ENV = "LORA_TUNE_API_KEY"
# RFC 6750's token68: what an `Authorization: Bearer` header carries unchanged. Any other character
# (non-ASCII, a space, a control character) reaches the server re-encoded or cut, and never matches.
KEY_CHARACTERS = re.compile(r"[A-Za-z0-9._~+/-]+=*")
KEY_RULE = "letters A-Z and a-z, digits and - . _ ~ + /, then optionally = at the end (RFC 6750's token68)"
OPEN_PATHS = ("/health",)  # as in vLLM: load balancers probe it without credentials
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt is ~0.5 MB of text, JSON escaping at most doubles it
# OpenAI-style error codes for the refusals that come from HTTP itself rather than from a route.
HTTP_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_json(send, status: int, body: dict, headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
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
        message = (f"{problem}: send the header 'Authorization: Bearer KEY' with the key the server was started "
                   "with (OpenAI clients: api_key=KEY)")
        await send_json(send, 401, error_body(message, "invalid_request_error", HTTP_CODES[401]),
                        ((b"www-authenticate", b"Bearer"),))


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
            return await send_json(send, 413, error_body(message, "invalid_request_error", HTTP_CODES[413]))
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
        return (f"the request body is larger than this server's limit of {self.limit} bytes: send a shorter "
                "request, or start the server with a larger --max-body-bytes")


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
    return (f"listening on {host}:{port} without an API key: anyone who can reach this port can use the models. "
            f"Set --api-key (or {API_KEY_ENV}), or listen on 127.0.0.1.")
