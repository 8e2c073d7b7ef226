"""OpenAI-style errors: `APIError` carries the HTTP status and the `{"error": {...}}` body every failure returns.

The body is what the official `openai` client parses: `{"error": {"message", "type", "param", "code"}}`;
the client maps the status to its exception class (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 413/422 APIStatusError, 429 RateLimitError, 5xx InternalServerError).
"""

from __future__ import annotations

ECHO_CHARS = 80  # the most characters of a client's value an error message repeats


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` cut to `limit` characters (a client's value is repeated in an error, never at full size)."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


class APIError(Exception):
    """An error answered as `status` with an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def wrong_type(param: str, expected: str, value) -> APIError:
    got = "null" if value is None else type(value).__name__
    return bad_request(f"'{param}' must be {expected}, got {got}", param, "invalid_type")


def missing(param: str) -> APIError:
    return bad_request(f"'{param}' is required", param, "missing_required_parameter")


def unsupported(param: str, why: str) -> APIError:
    return bad_request(f"'{param}' is not supported by this server: {why}", param, "unsupported_parameter")


def model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model {echo(name)} does not exist on this server",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def unauthorized(provided: bool, message: str | None = None) -> APIError:
    message = message or (
        "Incorrect API key provided."
        if provided
        else "You didn't provide an API key: send it as 'Authorization: Bearer KEY'."
    )
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def overloaded(limit: int, what: str = "concurrent requests") -> APIError:
    return APIError(
        429,
        f"The server is at its limit of {limit} {what}; retry shortly.",
        "rate_limit_error",
        None,
        "rate_limit_exceeded",
        {"Retry-After": "1"},
    )


def timeout(seconds: float) -> APIError:
    return APIError(
        504, f"The request ran past the server's timeout of {seconds:g} s.", "timeout_error", None, "timeout"
    )


def too_large(cap: int) -> APIError:
    return APIError(413, f"the request body is larger than {cap} bytes (--max-body-mb)", code="request_too_large")


def read_timeout(seconds: float) -> APIError:
    """The request (its head or its body) did not arrive in time; the connection is closed after the answer."""
    return APIError(
        408,
        f"the request did not arrive within {seconds:g} s (--read-timeout)",
        "invalid_request_error",
        None,
        "request_timeout",
        {"Connection": "close"},
    )


def shutting_down() -> APIError:
    return unavailable("the server is shutting down")


def server_error(message: str = "The server had an error while processing the request.") -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "server_error", None, "service_unavailable")
