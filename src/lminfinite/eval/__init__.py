"""The evaluation suite of the paper, for any model `lminfinite.models.load_model` accepts.

- `perplexity`: NLL by token position for vanilla / lminfinite / truncate / sinks (Figure 1).
- `passkey`: passkey retrieval accuracy by prompt length and depth.
- `generation`: BLEU / ROUGE-L of greedy continuations cut from a long text.
- `methods`: the four methods as context managers, and greedy generation with each.
- `texts`: reading text files or datasets and cutting token windows; `plots`, `report`: output.
"""
