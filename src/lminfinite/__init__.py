"""lminfinite: LM-Infinite (Han et al., 2023) for HuggingFace transformers 5.x.

Λ-shaped attention (the first `n_global` tokens plus a window of `n_local`) and a cap on the
relative distance let a pretrained RoPE model read and write far past its training length, with no
fine-tuning, in O(n) time and bounded memory.
"""

from .api import disable, enable, is_enabled
from .cache import LambdaCache
from .config import LambdaConfig
from .scoring import prefill, score
from .streaming import stream

__all__ = [
    "enable",
    "disable",
    "is_enabled",
    "LambdaCache",
    "LambdaConfig",
    "prefill",
    "score",
    "stream",
    "load_llama2c",
]
__version__ = "0.1.0"


def load_llama2c(*args, **kwargs):
    """Load a llama2.c checkpoint as a `LlamaForCausalLM` and its tokenizer (see `lminfinite.llama2c`)."""
    from .llama2c import load_llama2c as _load

    return _load(*args, **kwargs)
