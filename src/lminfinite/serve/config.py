"""ServeConfig: everything `lminfinite serve` can be told, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeConfig:
    """Limits and switches of one server. Sizes are checked here so that a bad value fails at start-up."""

    model_name: str
    api_keys: tuple[str, ...] = ()  # empty: no authentication, one shared session namespace
    max_sessions: int = 64  # kept conversations (all keys together)
    max_cache_mb: float = 1024.0  # bytes of all sessions' caches
    # per API key (None: the totals above shared evenly among the keys), so that one key cannot evict another's
    max_sessions_per_key: int | None = None
    max_cache_mb_per_key: float | None = None
    max_concurrency: int = 16  # requests in flight (queued or running); 429 beyond
    max_long_prompts: int = 2  # prompts of more than max_prompt_tokens / 4 characters tokenized at once; 429 beyond
    max_connections: int = 256  # open HTTP connections; 503 (and closed) beyond
    read_timeout: float = 30.0  # seconds to receive a request's head, and again its body; 408 beyond
    shutdown_grace: float = 10.0  # on shutdown, seconds open requests get to finish before they end with a 503
    max_tokens_cap: int = 2048  # largest max_tokens accepted; also the chat default
    max_prompt_tokens: int = 131072  # largest prompt accepted (tokens, whole history)
    max_body_mb: float = 16.0  # largest request body
    request_timeout: float = 600.0  # seconds from arrival to the end of generation
    step_tokens: int = 256  # most prompt tokens one request feeds per forward (the round-robin quantum)
    session_reuse: bool = True  # False: every request prefills its whole prompt (the benchmark's baseline)
    log_prompts: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)  # more names /v1/models answers to

    def __post_init__(self):
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        for name in (
            "max_concurrency",
            "max_tokens_cap",
            "max_prompt_tokens",
            "step_tokens",
            "max_connections",
            "max_long_prompts",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_sessions, bool) or not isinstance(self.max_sessions, int) or self.max_sessions < 0:
            raise ValueError(f"max_sessions must be an integer >= 0, got {self.max_sessions!r}")
        for name in ("max_cache_mb", "max_body_mb", "request_timeout", "read_timeout", "shutdown_grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        per_key = self.max_sessions_per_key
        if per_key is not None and (isinstance(per_key, bool) or not isinstance(per_key, int) or per_key < 0):
            raise ValueError(f"max_sessions_per_key must be None or an integer >= 0, got {per_key!r}")
        if self.max_cache_mb_per_key is not None and not self.max_cache_mb_per_key > 0:
            raise ValueError(f"max_cache_mb_per_key must be None or > 0, got {self.max_cache_mb_per_key!r}")
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ValueError("API keys must be non-empty and have no surrounding spaces")

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)

    @property
    def max_cache_bytes(self) -> int:
        return int(self.max_cache_mb * 2**20)

    @property
    def key_sessions(self) -> int | None:
        """Kept conversations per API key: `max_sessions_per_key`, else `max_sessions` shared evenly among the
        keys (at least 1 each); None with fewer than two keys (one namespace: the total is its limit)."""
        if self.max_sessions_per_key is not None:
            return self.max_sessions_per_key
        if len(self.api_keys) < 2:
            return None
        return min(self.max_sessions, max(1, self.max_sessions // len(self.api_keys)))

    @property
    def key_cache_bytes(self) -> int | None:
        """Cache bytes per API key: `max_cache_mb_per_key`, else `max_cache_mb` shared evenly among the keys;
        None with fewer than two keys."""
        if self.max_cache_mb_per_key is not None:
            return int(self.max_cache_mb_per_key * 2**20)
        if len(self.api_keys) < 2:
            return None
        return self.max_cache_bytes // len(self.api_keys)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
