"""How `lora-tune serve` answers a failure: always OpenAI's JSON error object, as clients expect.

`ServeError` is what the engine and the routes raise; `add_error_handlers` turns it, an invalid
request body, an HTTP refusal, a user error and any unexpected failure into that object, with the
HTTP status, and never a traceback.
"""

from __future__ import annotations

from .errors import UserError

# OpenAI-style error codes for the refusals that come from HTTP itself rather than from a route.
HTTP_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ServeError(Exception):
    """An error answered as OpenAI's JSON error body with this HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = {404: "not_found_error", 500: "server_error"}.get(
            self.status, "invalid_request_error"
        )
        return error_body(self.message, kind, self.code, self.param)


def add_error_handlers(app) -> None:
    """Every failure answers OpenAI's JSON error object; none shows a traceback to the client."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ServeError)
    def serve_error(request: Request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def invalid_body(request: Request, exc: RequestValidationError):
        where, message = describe_invalid(exc.errors()[0])
        return JSONResponse(
            ServeError(400, message, "invalid_request", where).body(), status_code=400
        )

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = error_body(message, "invalid_request_error", HTTP_CODES.get(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(UserError)
    def user_error(request: Request, exc: UserError):
        return JSONResponse(
            ServeError(400, exc.render(), "invalid_request").body(), status_code=400
        )

    @app.exception_handler(Exception)
    def server_error(request: Request, exc: Exception):
        # The traceback goes to the server's log (uvicorn prints it), never to the client.
        message = "the server failed while answering this request; its log has the details"
        return JSONResponse(ServeError(500, message, "internal_error").body(), status_code=500)


def describe_invalid(error: dict) -> tuple[str | None, str]:
    """(the field, a message) for pydantic's first complaint about a request body."""
    where = ".".join(str(p) for p in error["loc"] if p != "body") or None
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return (
            None,
            f"the request body is not valid JSON ({reason} at character {where}); send a JSON object",
        )
    if where is None and error["type"] == "missing":
        return (
            None,
            "the request body is empty; send a JSON object with Content-Type: application/json",
        )
    if where is None:
        return (
            None,
            "the request body must be a JSON object sent with Content-Type: application/json",
        )
    return where, f"{where}: {error['msg']}"
