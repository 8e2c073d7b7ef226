"""Passkey retrieval, as in the paper's code: find a 5-digit key hidden at a random depth of filler.

The prompt is the task description, the filler sentence repeated up to the target length in
tokens, with "The pass key is KEY. Remember it. KEY is the pass key." inserted at a random depth,
then " What is the pass key? The pass key is". The model answers greedily; an answer is correct
when the key's digits appear in it (spaces ignored). Keys and depths come from `seed`, and every
method sees the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from torch import nn

from .errors import BadValue
from .methods import Method, get
from .progress import progress_bar

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def build_prompt(n_filler: int, depth: float, key: int) -> str:
    """The prompt with `n_filler` filler sentences, the key after `round(depth * n_filler)` of them."""
    before = round(depth * n_filler)
    parts = [TASK, " ".join([FILLER] * before), key_line(key), " ".join([FILLER] * (n_filler - before))]
    return " ".join(p for p in parts if p) + QUESTION


def make_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Ids (BOS included) of the longest prompt with at most `length` tokens."""
    per_filler = len(tokenizer.encode(FILLER + " ", add_special_tokens=False))
    fixed = len(tokenizer.encode(build_prompt(0, depth, key)))
    n = max(0, (length - fixed) // max(per_filler, 1) + 1)
    ids = tokenizer.encode(build_prompt(n, depth, key))
    while len(ids) > length and n > 0:
        n -= 1
        ids = tokenizer.encode(build_prompt(n, depth, key))
    if len(ids) > length:
        raise BadValue(f"passkey length {length} is too short for the task text ({len(ids)} tokens without filler)")
    return ids


def is_correct(answer: str, key: int) -> bool:
    return str(key) in "".join(answer.split())


def depth_bin(depth: float, n_bins: int) -> str:
    k = min(int(depth * n_bins), n_bins - 1)
    return f"{k / n_bins:.1f}-{(k + 1) / n_bins:.1f}"


def evaluate(
    model: nn.Module,
    tokenizer,
    methods: Sequence[str | Method],
    lengths: Sequence[int],
    samples: int,
    n_global: int,
    n_local: int,
    seed: int = 0,
    depth_bins: int = 5,
    answer_tokens: int = 10,
    chunk_size: int = 4096,
    progress: bool | None = None,
) -> list[dict]:
    """Accuracy rows `{method, length, depth, accuracy, samples}`, per depth bin and over all depths ("all")."""
    rng = random.Random(seed)
    trials = [(length, rng.randint(10000, 99999), rng.random()) for length in lengths for _ in range(samples)]
    prompts = [make_prompt(tokenizer, length, depth, key) for length, key, depth in trials]
    methods = [get(m) for m in methods]
    rows = []
    bar = progress_bar(len(methods) * len(trials), "passkey", "prompt", progress)
    for method in methods:
        bar.set_postfix_str(method.name)
        hits = []
        with method.applied(model, n_global, n_local):  # once per method, for all its prompts
            for (length, key, depth), prompt in zip(trials, prompts, strict=True):
                new = list(method.tokens(model, prompt, answer_tokens, n_local, chunk_size))
                hits.append((length, depth_bin(depth, depth_bins), is_correct(tokenizer.decode(new), key)))
                bar.update()
        rows += _accuracy_rows(method.name, hits, lengths)
    bar.close()
    return rows


def _accuracy_rows(method: str, hits: list[tuple[int, str, bool]], lengths: Sequence[int]) -> list[dict]:
    rows = []
    for length in lengths:
        mine = [(d, ok) for n, d, ok in hits if n == length]
        for depth in sorted({d for d, _ in mine}) + ["all"]:
            oks = [ok for d, ok in mine if depth in (d, "all")]
            rows.append(
                {
                    "method": method,
                    "length": length,
                    "depth": depth,
                    "accuracy": sum(oks) / len(oks),
                    "samples": len(oks),
                }
            )
    return rows
