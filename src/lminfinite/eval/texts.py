"""Evaluation text: read and check text files or a `datasets` split, and cut token windows from it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models.assets import read_text
from .errors import BadFile, BadValue, MissingDependency

_SNIFF = 8192  # bytes looked at to tell text from binary


def read_text_file(path: str | os.PathLike) -> str:
    """The text of `path` (utf-8-sig, LF line ends); clear errors for missing, empty or binary files."""
    path = Path(path)
    if path.is_dir():
        raise BadValue(f"{path} is a folder, not a text file")
    if not path.is_file():
        raise BadFile(f"text file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except OSError as e:
        raise BadValue(f"cannot read {path}: {e.strerror or e}") from None
    if b"\x00" in head:
        raise BadValue(f"{path} looks binary (it has NUL bytes), not a text file")
    try:
        text = read_text(path)
    except UnicodeDecodeError as e:
        raise BadValue(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise BadValue(f"{path} is empty (no text to evaluate on)")
    return text


def dataset_text(
    name: str, split: str = "test", field: str = "text", max_chars: int | None = None, config: str | None = None
) -> str:
    """The rows of one split of a HuggingFace dataset (hub name or local folder), joined by blank lines.

    `config` is the dataset's configuration name, if it has several. Stops once `max_chars`
    characters are collected (None: all rows).
    """
    try:
        import datasets
    except ImportError:
        raise MissingDependency("--dataset needs the `datasets` package: pip install datasets") from None
    from ..models.hub import offline_unless_reachable

    with offline_unless_reachable(name) as offline:  # no network: the local cache only, no 30 s of retries
        try:
            data = datasets.load_dataset(name, config, split=split)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = f" (hub unreachable, {offline}; only locally cached datasets can load)" if offline else ""
            raise BadValue(f"cannot load dataset {name!r} split {split!r}: {first}{where}") from None
    if field not in data.column_names:
        raise BadValue(f"dataset {name!r} has no field {field!r}; its fields: {', '.join(data.column_names)}")
    parts, size = [], 0
    for row in data:
        value = row[field]
        if isinstance(value, str) and value.strip():
            parts.append(value)
            size += len(value) + 2
            if max_chars is not None and size >= max_chars:
                break
    if not parts:
        raise BadValue(f"dataset {name!r} split {split!r} has no text in field {field!r}")
    return "\n\n".join(parts)


def encode_prefix(tokenizer, text: str, n_tokens: int) -> list[int]:
    """At least the first `n_tokens` token ids of `text` (no special tokens), or all of them if fewer.

    Only a prefix of a long text is tokenized (then the whole text if that was not enough); a
    margin of tokens is dropped at the cut so the ids equal those of the whole text.
    """
    margin = 64
    chars = 8 * (n_tokens + margin)
    if len(text) > chars:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(ids) >= n_tokens + margin:
            return ids[: len(ids) - margin]
    return tokenizer.encode(text, add_special_tokens=False)


def windows(tokenizer, text: str, n_windows: int, length: int, name: str = "text") -> torch.Tensor:
    """(n_windows, length) ids: consecutive pieces of `text` from its start, each opened by BOS if any.

    Window k is `[BOS] + ids[k*(length-1) : (k+1)*(length-1)]` (without BOS: `length` ids each).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    step = length - 1 if bos is not None else length
    if step < 1:
        raise BadValue(f"window length must be at least 2 tokens, got {length}")
    need = n_windows * step
    ids = encode_prefix(tokenizer, text, need)
    if len(ids) < need:
        raise BadValue(
            f"{name} has {len(ids)} tokens, too short for {n_windows} windows of {length} tokens "
            f"({need} needed); lower --windows or --max-length, or use a longer text"
        )
    rows = [([bos] if bos is not None else []) + ids[k * step : (k + 1) * step] for k in range(n_windows)]
    return torch.tensor(rows, dtype=torch.long)
