"""Chat with a model for as long as you like: one LambdaCache holds the whole conversation (a tool).

- `conversation`: `Chat`, a multi-turn conversation on an lminfinite-enabled model (`ChatError` when its
  cache can no longer be used).
- `terminal`: `repl(backend)`, the terminal loop of `lminfinite chat`, and `format_stats`.

```python
from lminfinite.chat import Chat
from lminfinite.models import load_model

chat = Chat(*load_model("smollm2"), n_local=8192, system="You are a concise assistant.")
for piece in chat.send("What is the capital of France?"):
    print(piece, end="", flush=True)
```
"""

from .conversation import Chat, ChatError
from .terminal import HELP, ChatBackend, format_stats, repl

__all__ = ["Chat", "ChatError", "ChatBackend", "repl", "format_stats", "HELP"]
