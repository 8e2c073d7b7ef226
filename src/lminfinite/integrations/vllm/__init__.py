"""LM-Infinite inside vLLM: a plugin (entry point `vllm.general_plugins`), on per model with
`hf_overrides={"lminfinite": {"n_global": G, "n_local": L}}` (`--hf-overrides` for the server).

```python
from vllm import LLM, SamplingParams
llm = LLM(model=folder, hf_overrides={"lminfinite": {"n_global": 10, "n_local": 2048}},
          max_model_len=1 << 20, dtype="float32", enforce_eager=True)
```

- `settings.py`: the settings read from the model's HF config (`LambdaSettings`, `settings_of`);
- `plugin.py`: `register()`, what vLLM calls in each process;
- `backend.py`: the attention backend (CPU_ATTN with the Λ rule where asked);
- `lambda_attention.py`: Λ-attention of one request over the paged KV cache (the rule of `lminfinite.rule`);
- `kv_cache.py`: the KV-cache spec and manager that keep the first G and last L tokens' blocks;
- `rope.py`: exact RoPE angles at any position, and the global branch's re-rotation;
- `vllm_private.py`: the only uses of vLLM internals, gated to the tested vLLM versions.

Importing this package imports no vLLM module; the modules above need vLLM installed.
"""

from .settings import KEY, LambdaSettings, settings_of

__all__ = ["KEY", "LambdaSettings", "settings_of"]
