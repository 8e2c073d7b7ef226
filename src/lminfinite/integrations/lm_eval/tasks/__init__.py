"""Offline long-context tasks for lm-eval, their data generated at run time from the shared assets.

The task configs are the YAML files beside this module (`lminfinite_passkey`, `lminfinite_needle`,
`lminfinite_ppl`; tag `lminfinite`). The harness calls the `*_dataset` functions below with the task's
metadata: the model args (`pretrained=...`) merged with the `--metadata` JSON. Lengths are in tokens of the
model's own tokenizer: the one of the live "lminfinite" model, else the one named by `tokenizer` or
`pretrained` in the metadata.

Metadata keys (all optional):

- passkey: `max_seq_lengths` (list, default [4096]), `num_samples` per length (default 10), `seed` (0).
  The prompts, keys and depths are those of `lminfinite passkey --lengths ... --samples N --seed S`, so the
  two can be compared prompt for prompt. Metric `acc`: the key's digits appear in the greedy answer.
- needle: `max_seq_lengths` ([4096]), `num_samples` per length (5, depths spread evenly from 0.1 to 0.9),
  `haystack` (a file in the assets' corpora/ or a path; default peter_pan_pg16.txt), `seed` (0). A fact
  ("The special magic number for CITY is N.") is hidden at a sentence end of an excerpt of the book, asked
  for through the tokenizer's chat template when it has one. Metric `acc`.
- ppl: `ppl_corpus` (file in corpora/ or a path; default alice_pg11.txt), `ppl_tokens` tokens per document
  (default 4096), `ppl_docs` documents (default 4): consecutive pieces of the text, scored whole
  (loglikelihood_rolling). Metrics: `token_perplexity` (exp of the mean NLL per token of the model's
  tokenizer), and the harness's word_perplexity, byte_perplexity, bits_per_byte.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from ....eval import passkey
from ....eval.errors import BadFile, BadValue
from ....models.assets import asset, read_text
from ..model import live_tokenizer

DEFAULT_LENGTHS = [4096]
CITIES = (
    "Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Perth", "Kyoto",
    "Bergen", "Porto", "Accra", "Cusco", "Tallinn", "Malmo", "Leeds", "Dakar", "Hobart", "Split",
)  # fmt: skip
NEEDLE_INTRO = (
    "Below is an excerpt from a book. A special magic number is hidden inside it. "
    "Memorize it: I will ask you about it afterwards."
)


# ------------------------------------------------------------------------------------------------- helpers


def task_tokenizer(meta: dict[str, Any]):
    """The tokenizer that sizes the prompts: the live "lminfinite" model's, else one loaded by name."""
    names = [meta.get(k) for k in ("pretrained", "tokenizer")]
    names = [n for n in names if isinstance(n, str) and n]
    for name in names:
        tok = live_tokenizer(name)
        if tok is not None:
            return tok
    if not names:
        tok = live_tokenizer()
        if tok is not None:
            return tok
        raise BadValue(
            "the lminfinite tasks size their prompts in tokens and need a tokenizer: build the 'lminfinite' model "
            'first, or pass --metadata \'{"tokenizer": "NAME"}\''
        )
    return _load_tokenizer(meta.get("tokenizer") if isinstance(meta.get("tokenizer"), str) else names[0])


@lru_cache(maxsize=4)
def _load_tokenizer(name: str):
    """Our short names and model files through `load_model` (tiny, or cached); anything else with AutoTokenizer."""
    from .... import models

    if name in getattr(models, "MODEL_NAMES", ("stories260K",)) or Path(name).expanduser().is_file():
        return models.load_model(name)[1]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _ints(meta: dict[str, Any], key: str, default: list[int]) -> list[int]:
    value = meta.get(key, default)
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        numbers = [int(v) for v in values]
    except (TypeError, ValueError):
        raise BadValue(f"metadata {key}={value!r}: expected positive integers") from None
    if not numbers or min(numbers) < 1:
        raise BadValue(f"metadata {key}={value!r}: expected positive integers")
    return numbers


def _int(meta: dict[str, Any], key: str, default: int, low: int = 1) -> int:
    value = meta.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = low - 1
    if number < low:
        raise BadValue(f"metadata {key}={value!r}: expected an integer >= {low}")
    return number


def corpus_text(name: str) -> tuple[str, str]:
    """(path, text) of a corpus: a file name in the assets' corpora/ folder, or a path."""
    path = Path(os.path.expanduser(name))
    if not path.is_file():
        path = asset("corpora", name)
    if not path.is_file():
        raise BadFile(f"corpus {name!r} not found (neither a file nor {path}); set LMINFINITE_ASSETS")
    text = read_text(path)
    if not text.strip():
        raise BadValue(f"corpus {path} is empty")
    return str(path), text


def n_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` as the harness encodes a context (special tokens added by the tokenizer's default)."""
    return len(tokenizer(text)["input_ids"])


def _dataset(rows: list[dict]):
    import datasets

    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def _digits_in(answer: str, number: str) -> bool:
    return number in "".join(answer.split())


# ------------------------------------------------------------------------------------------------- passkey


def passkey_text(tokenizer, length: int, depth: float, key: int) -> str:
    """The text of `lminfinite.eval.passkey.make_prompt(tokenizer, length, depth, key)` (checked: same ids)."""
    per_filler = len(tokenizer.encode(passkey.FILLER + " ", add_special_tokens=False))
    fixed = len(tokenizer.encode(passkey.build_prompt(0, depth, key)))
    n = max(0, (length - fixed) // max(per_filler, 1) + 1)
    text = passkey.build_prompt(n, depth, key)
    while len(tokenizer.encode(text)) > length and n > 0:
        n -= 1
        text = passkey.build_prompt(n, depth, key)
    if tokenizer.encode(text) != passkey.make_prompt(tokenizer, length, depth, key):
        raise RuntimeError("passkey prompt text differs from lminfinite.eval.passkey.make_prompt's")
    return text


def passkey_trials(lengths: list[int], samples: int, seed: int) -> list[tuple[int, int, float]]:
    """(length, key, depth) of every prompt, drawn as `lminfinite.eval.passkey.evaluate` draws them."""
    rng = random.Random(seed)
    return [(length, rng.randint(10000, 99999), rng.random()) for length in lengths for _ in range(samples)]


def passkey_dataset(**meta):
    tokenizer = task_tokenizer(meta)
    trials = passkey_trials(
        _ints(meta, "max_seq_lengths", DEFAULT_LENGTHS), _int(meta, "num_samples", 10), _int(meta, "seed", 0, 0)
    )
    rows = []
    for length, key, depth in trials:
        text = passkey_text(tokenizer, length, depth, key)
        rows.append(
            {"input": text, "key": str(key), "length": length, "depth": depth, "n_tokens": n_tokens(tokenizer, text)}
        )
    return _dataset(rows)


def passkey_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": float(_digits_in(results[0], doc["key"]))}


# -------------------------------------------------------------------------------------------------- needle


def needle_prompt(tokenizer, excerpt: str, city: str) -> str:
    """The full prompt around `excerpt` (which holds the needle): chat template if the tokenizer has one."""
    question = f"What is the special magic number for {city} mentioned in the text above?"
    content = f"{NEEDLE_INTRO}\n\n{excerpt}\n\n{question}"
    answer = f"The special magic number for {city} is"
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return chat + answer
    return f"{content}\n{answer}"


def insert_at_sentence(text: str, depth: float, sentence: str) -> str:
    """`text` with `sentence` put after the first sentence end at or after `depth` of its characters."""
    at = int(depth * len(text))
    ends = [i for i in (text.find(". ", at), text.find(".\n", at)) if i >= 0]
    cut = min(ends) + 1 if ends else len(text)
    return f"{text[:cut]} {sentence}{text[cut:]}"


def _book_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def needle_doc(tokenizer, book_ids: list[int], length: int, depth: float, city: str, number: int, start: int) -> dict:
    """One prompt of at most `length` tokens: book tokens from `start`, the needle at `depth`."""
    needle = f"The special magic number for {city} is {number}."
    fixed = n_tokens(tokenizer, needle_prompt(tokenizer, needle, city))
    budget = length - fixed - 8
    for _ in range(20):
        if budget < 16:
            raise BadValue(f"needle length {length} is too short for the prompt ({fixed} tokens without the book)")
        if budget > len(book_ids):
            raise BadValue(f"needle length {length}: the haystack has only {len(book_ids)} tokens")
        begin = start % (len(book_ids) - budget + 1)
        excerpt = tokenizer.decode(book_ids[begin : begin + budget], skip_special_tokens=True).strip()
        text = needle_prompt(tokenizer, insert_at_sentence(excerpt, depth, needle), city)
        size = n_tokens(tokenizer, text)
        if size <= length:
            return {
                "input": text,
                "answer": str(number),
                "city": city,
                "length": length,
                "depth": depth,
                "n_tokens": size,
            }
        budget -= size - length + 4
    raise RuntimeError(f"could not fit a needle prompt into {length} tokens")


def needle_dataset(**meta):
    tokenizer = task_tokenizer(meta)
    lengths = _ints(meta, "max_seq_lengths", DEFAULT_LENGTHS)
    samples = _int(meta, "num_samples", 5)
    rng = random.Random(_int(meta, "seed", 0, 0))
    source, text = corpus_text(str(meta.get("haystack", "peter_pan_pg16.txt")))
    book = _book_ids(tokenizer, text)
    rows = []
    for length in lengths:
        for j in range(samples):
            depth = round(0.1 + 0.8 * (j / (samples - 1) if samples > 1 else 0.5), 4)
            city, number = CITIES[rng.randrange(len(CITIES))], rng.randint(100000, 999999)
            doc = needle_doc(tokenizer, book, length, depth, city, number, start=rng.randrange(len(book)))
            rows.append(dict(doc, haystack=Path(source).name))
    return _dataset(rows)


def needle_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": float(_digits_in(results[0], doc["answer"]))}


# ----------------------------------------------------------------------------------------------------- ppl


def ppl_documents(tokenizer, text: str, doc_tokens: int, n_docs: int) -> list[str]:
    """Up to `n_docs` consecutive pieces of `text`, each about `doc_tokens` tokens, cut at token boundaries."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc.get("offset_mapping")
    docs = []
    for k in range(min(n_docs, len(ids) // doc_tokens)):
        lo, hi = k * doc_tokens, (k + 1) * doc_tokens
        if offsets:
            piece = text[offsets[lo][0] : offsets[hi - 1][1]]
        else:
            piece = tokenizer.decode(ids[lo:hi], skip_special_tokens=True)
        docs.append(piece)
    if not docs:
        raise BadValue(f"the corpus has {len(ids)} tokens, fewer than ppl_tokens={doc_tokens}")
    return docs


def ppl_dataset(**meta):
    tokenizer = task_tokenizer(meta)
    source, text = corpus_text(str(meta.get("ppl_corpus", "alice_pg11.txt")))
    docs = ppl_documents(tokenizer, text, _int(meta, "ppl_tokens", 4096), _int(meta, "ppl_docs", 4))
    rows = [
        {"text": d, "n_tokens": n_tokens(tokenizer, d), "corpus": Path(source).name, "index": i}
        for i, d in enumerate(docs)
    ]
    return _dataset(rows)


def ppl_target(doc: dict) -> str:
    return doc["text"]


def ppl_process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    (loglikelihood,) = results
    words = len(doc["text"].split())
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "token_perplexity": (loglikelihood, doc["n_tokens"]),
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
