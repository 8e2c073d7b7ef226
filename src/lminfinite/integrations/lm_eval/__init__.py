"""lm-evaluation-harness integration: importing this module registers the model type "lminfinite".

```python
import lm_eval
import lminfinite.integrations.lm_eval as lmi   # registers "lminfinite"

tm = lm_eval.tasks.TaskManager(include_path=lmi.TASKS_DIR)   # adds lminfinite_passkey, _needle, _ppl
lm_eval.simple_evaluate(model="lminfinite", model_args="pretrained=smollm2,n_local=2048,top_k=5",
                        tasks=["lminfinite_passkey"], task_manager=tm)
```

- `model.py`: `LMInfiniteLM`, the harness's HF model class on a model switched to an LM-Infinite method.
- `tasks/`: offline task configs (YAML) and the code that generates their data from the shared assets.
"""

from __future__ import annotations

from pathlib import Path

from .model import LMInfiniteLM, live_tokenizer

TASKS_DIR = str(Path(__file__).resolve().parent / "tasks")
TASKS = ("lminfinite_passkey", "lminfinite_needle", "lminfinite_ppl")

__all__ = ["LMInfiniteLM", "TASKS", "TASKS_DIR", "live_tokenizer"]
