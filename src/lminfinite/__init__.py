"""lminfinite: LM-Infinite (Han et al., 2023) for HuggingFace transformers 5.x.

Λ-shaped attention (the first `n_global` tokens plus a window of `n_local`) and a cap on the
relative distance let a pretrained RoPE model read and write far past its training length, with no
fine-tuning, in O(n) time and bounded memory.
"""

from .api import config_of, disable, enable, is_enabled
from .cache import LambdaCache
from .config import LambdaConfig
from .memory import BlockMemory
from .scoring import prefill, score
from .streaming import stream

__all__ = [
    "enable",
    "disable",
    "is_enabled",
    "config_of",
    "LambdaCache",
    "LambdaConfig",
    "BlockMemory",
    "prefill",
    "score",
    "stream",
    "load_model",
    "load_llama2c",
]
__version__ = "0.1.0"

# Loaders are tools (lminfinite.models), not part of the method: they are imported on first use only, so
# `import lminfinite` loads no loader, evaluation, CLI or server code.
_TOOLS = {"load_model": "lminfinite.models", "load_llama2c": "lminfinite.models.llama2c"}


def __getattr__(name: str):
    if name in _TOOLS:
        import importlib

        return getattr(importlib.import_module(_TOOLS[name]), name)
    raise AttributeError(f"module 'lminfinite' has no attribute {name!r}")
