"""`lminfinite serve`: an OpenAI-compatible HTTP server whose conversations never run out of context.

Each conversation keeps its LambdaCache (starting tokens + window, bounded), so a request that extends a
kept conversation prefills only its new tokens, however long the conversation has become.

Modules: `config` (ServeConfig), `app` (FastAPI routes), `protocol` (request validation, response
bodies), `templates` (chat template, fallback, bounded tokenization, stop strings), `sessions` (kept
conversations, matching on token ids, LRU, per-key quotas), `scheduler` (the model worker thread,
round-robin, drain on shutdown), `metrics` (Prometheus text), `errors` (OpenAI-style errors),
`connections` (request-head deadline, cap on open connections), `runner` (load, the uvicorn server,
uvicorn in a thread), `client` (`RemoteChat`, the terminal chat's backend for a remote server).
Sampling, incremental detokenization and the end-of-turn tokens are the library's (`lminfinite.decoding`).

Needs the `serve` extra (fastapi, uvicorn, openai, httpx); nothing here is imported by `import lminfinite`.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "RemoteChat"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "RemoteChat":
        from .client import RemoteChat

        return RemoteChat
    raise AttributeError(f"module 'lminfinite.serve' has no attribute {name!r}")
