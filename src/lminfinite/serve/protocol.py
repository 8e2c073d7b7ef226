"""Request validation and response bodies for the OpenAI-compatible endpoints.

Every field is checked by hand so that each bad input gets a precise 400 with the offending `param`
(missing, wrong type, out of range, unsupported). Unknown fields are ignored, as most OpenAI-compatible
servers do, but every string of the body must be valid Unicode (no lone surrogates such as "\\ud800",
which no tokenizer or UTF-8 encoder accepts) and the body may nest at most `MAX_DEPTH` levels. Only the
documented shapes are accepted; a value echoed in an error message is cut short (`errors.echo`).
Responses are plain dicts in the shapes the official `openai` client parses.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass

from .errors import bad_request, echo, missing, model_not_found, unsupported, wrong_type

CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4
MAX_STOP_CHARS = 1000  # the longest stop string (each generated piece is matched against every stop's prefixes)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
MAX_DEPTH = 16  # the deepest nesting of objects and lists a request body may have (the API needs 4)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Limits:
    """What the server accepts (from the command line)."""

    max_tokens_cap: int = 2048
    vocab_size: int | None = None


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]
    params: GenParams
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]
    params: GenParams
    stream: bool = False
    include_usage: bool = False


# --------------------------------------------------------------------------------------------------- parsing


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object: non-UTF-8, malformed JSON, NaN/Infinity and non-objects are 400s."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(
            f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})", None, "invalid_encoding"
        ) from None
    if not text.strip():
        raise bad_request("the request body is empty; send a JSON object", None, "invalid_json")

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    _check_values(data)
    return data


def _check_values(data: dict) -> None:
    """400 for a body nested deeper than MAX_DEPTH or holding a string (value or key) with a lone surrogate."""
    stack: list[tuple[object, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad_request(
                    f"'{path}' is not valid Unicode text (it holds a lone surrogate code point, e.g. \\ud800)",
                    path,
                    "invalid_encoding",
                )
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise bad_request(
                f"the request body nests deeper than {MAX_DEPTH} levels (at '{path}')", path, "invalid_json"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    raise bad_request(
                        f"a key of '{path or 'the body'}' is not valid Unicode text", path or None, "invalid_encoding"
                    )
                stack.append((item, where[:100], depth + 1))
        else:
            stack.extend((item, f"{path}[{i}]"[:100], depth + 1) for i, item in enumerate(value))


def _present(body: dict, name: str) -> bool:
    return body.get(name) is not None


def _int(body: dict, name: str, low: int | None = None, high: int | None = None, default=None):
    if not _present(body, name):
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(name, "an integer", value)
    if low is not None and value < low:
        raise bad_request(f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise bad_request(f"'{name}' must be <= {high} on this server, got {value}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    if not _present(body, name):
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong_type(name, "a number", value)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    if not _present(body, name):
        return default
    value = body[name]
    if not isinstance(value, bool):
        raise wrong_type(name, "a boolean", value)
    return value


def _model(body: dict, served: tuple[str, ...]) -> str:
    if "model" not in body or body["model"] is None:
        raise missing("model")
    name = body["model"]
    if not isinstance(name, str):
        raise wrong_type("model", "a string", name)
    if name not in served:
        raise model_not_found(name)
    return name


def _stop(body: dict) -> tuple[str, ...]:
    if not _present(body, "stop"):
        return ()
    value = body["stop"]
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise wrong_type("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise bad_request("'stop' strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"'stop' strings must be at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def _unsupported(body: dict) -> None:
    """Refuse features this server does not implement rather than silently ignoring them."""
    n = _int(body, "n", default=1)
    if n != 1:
        raise unsupported("n", "one choice per request (n=1)")
    best_of = _int(body, "best_of", default=1)
    if best_of != 1:
        raise unsupported("best_of", "one candidate per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise unsupported(name, "no repetition penalties")
    if _present(body, "logprobs") and body["logprobs"] not in (False, 0):
        raise unsupported("logprobs", "no log-probabilities")
    if _present(body, "top_logprobs") and body["top_logprobs"] != 0:
        raise unsupported("top_logprobs", "no log-probabilities")
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "no logit biases")
    for name in ("tools", "functions"):
        if body.get(name):
            raise unsupported(name, "no tool or function calling")
    if _present(body, "tool_choice") and body["tool_choice"] != "none":
        raise unsupported("tool_choice", "no tool calling")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise unsupported("response_format", "text output only")
    if _bool(body, "echo"):
        raise unsupported("echo", "the prompt is not echoed")
    if body.get("suffix"):
        raise unsupported("suffix", "no insertion")


def _params(body: dict, limits: Limits, default_max_tokens: int) -> GenParams:
    cap = limits.max_tokens_cap
    max_tokens = _int(body, "max_tokens", 1, cap)
    max_completion = _int(body, "max_completion_tokens", 1, cap)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad_request("give 'max_completion_tokens' or 'max_tokens', not two different values", "max_tokens")
    chosen = max_completion if max_completion is not None else max_tokens
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    return GenParams(
        max_tokens=min(default_max_tokens, cap) if chosen is None else chosen,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        seed=seed,
        stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict):
        raise wrong_type("stream_options", "an object", options)
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise wrong_type("stream_options.include_usage", "a boolean", include_usage)
    return stream, bool(include_usage)


def _content(message: dict, i: int) -> str:
    param = f"messages[{i}].content"
    content = message.get("content")
    if content is None:
        raise missing(param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise wrong_type(f"{param}[{j}]", "a content part object with a 'type'", part)
            if part["type"] != "text":
                raise unsupported(f"{param}[{j}].type", f"text content only, got {echo(part['type'])}")
            if not isinstance(part.get("text"), str):
                raise wrong_type(f"{param}[{j}].text", "a string", part.get("text"))
            texts.append(part["text"])
        return "".join(texts)
    raise wrong_type(param, "a string or a list of text parts", content)


def parse_messages(value) -> list[dict]:
    if value is None:
        raise missing("messages")
    if not isinstance(value, list):
        raise wrong_type("messages", "a list of message objects", value)
    if not value:
        raise bad_request("'messages' must not be empty", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise wrong_type(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if role is None:
            raise missing(f"messages[{i}].role")
        if not isinstance(role, str):
            raise wrong_type(f"messages[{i}].role", "a string", role)
        if role not in CHAT_ROLES:
            if role in ("tool", "function"):
                raise unsupported(f"messages[{i}].role", "no tool or function messages")
            raise bad_request(
                f"'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, got {echo(role)}", f"messages[{i}].role"
            )
        if message.get("tool_calls"):
            raise unsupported(f"messages[{i}].tool_calls", "no tool calling")
        out.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    return out


def parse_chat(body: dict, served: tuple[str, ...], limits: Limits) -> ChatRequest:
    model = _model(body, served)
    messages = parse_messages(body.get("messages"))
    _unsupported(body)
    stream, include_usage = _stream(body)
    return ChatRequest(model, messages, _params(body, limits, limits.max_tokens_cap), stream, include_usage)


def parse_completion(body: dict, served: tuple[str, ...], limits: Limits) -> CompletionRequest:
    model = _model(body, served)
    prompt = _prompt(body.get("prompt"), limits)
    _unsupported(body)
    stream, include_usage = _stream(body)
    params = _params(body, limits, COMPLETION_DEFAULT_MAX_TOKENS)
    return CompletionRequest(model, prompt, params, stream, include_usage)


def _prompt(value, limits: Limits) -> str | list[int]:
    """The documented shapes only: a string, a list of token ids, or a list holding one of those."""
    if value is None:
        raise missing("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    elif isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise unsupported("prompt", "one prompt per request (no batches)")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        vocab = limits.vocab_size
        bad = [t for t in value if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise bad_request(f"'prompt' has token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
        return list(value)
    raise wrong_type("prompt", "a string, a list of token ids, or a list with one of those", value)


# ------------------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_completion(rid: str, model: str, text: str, finish: str, use: dict, fingerprint: str) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None, fingerprint: str) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def text_completion(rid: str, model: str, text: str, finish: str | None, use: dict | None, fingerprint: str) -> dict:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        body["usage"] = use
    return body


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict, fingerprint: str) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [],
        "usage": use,
    }
