"""Integrations of lminfinite with other tools, each in its own subpackage (imported on demand only).

- `lminfinite.integrations.lm_eval`: the model type "lminfinite" for EleutherAI's lm-evaluation-harness and
  offline long-context tasks (passkey, needle in a book, rolling perplexity).
"""
