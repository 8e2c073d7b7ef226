"""The plugin's per-model settings: `hf_overrides={"lminfinite": {"n_global": G, "n_local": L}}`.

vLLM sets a dict-valued override as an attribute of the HF config every process sees
(`vllm_config.model_config.hf_config`), so the settings travel with the model config and nothing else:
a model without the key runs exactly as vLLM runs it. The values are checked by the library's own
`LambdaConfig` (the same limits as `lminfinite.enable()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lminfinite import LambdaConfig

KEY = "lminfinite"
KNOWN = ("n_global", "n_local", "limit_distance")


@dataclass(frozen=True)
class LambdaSettings:
    """G (starting tokens), L (local window) and D (distance at which the starting tokens are seen)."""

    n_global: int
    n_local: int
    limit_distance: int


def settings_of(hf_config: Any) -> LambdaSettings | None:
    """The LM-Infinite settings a model's HF config carries, None when it asks for none.

    Raises ValueError for a malformed `lminfinite` entry (not a dict, unknown or invalid values)."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(
            f'hf_overrides["{KEY}"] must be a dict such as {{"n_global": 10, "n_local": 2048}}, got {raw!r}'
        )
    unknown = sorted(set(raw) - set(KNOWN))
    if unknown:
        raise ValueError(f'hf_overrides["{KEY}"]: unknown setting(s) {unknown}; known: {list(KNOWN)}')
    n_local = raw.get("n_local")
    if n_local is None:
        n_local = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
        if n_local is None:
            raise ValueError(f'hf_overrides["{KEY}"] needs "n_local": the model config has no max_position_embeddings')
    try:
        config = LambdaConfig(
            n_global=raw.get("n_global", 10), n_local=n_local, limit_distance=raw.get("limit_distance")
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f'hf_overrides["{KEY}"]: {e}') from None
    return LambdaSettings(n_global=config.n_global, n_local=config.n_local, limit_distance=config.distance)
