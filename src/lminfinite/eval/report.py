"""Results out: the JSON file (and checking where it goes before a run), the plain-text tables the CLI prints."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import BadValue
from .perplexity import merge


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """BadValue unless a file can be written at `path` (run before a long evaluation, so that its results
    are not lost at the end): not a folder, its folder creatable, writable (tried with a temporary file)."""
    path = Path(path)
    if path.is_dir():
        raise BadValue(f"{what} {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BadValue(f"{what} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if path.exists():
            with open(path, "ab"):
                pass
    except OSError as e:
        raise BadValue(f"{what} {path} cannot be written ({e.strerror or e} in {folder})") from None
    return path


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _grid(header: Sequence[str], lines: list[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells)

    return "\n".join([fmt(header), *map(fmt, lines)])


def nll_table(rows: list[dict], spans: Sequence[tuple[int, int]] = ()) -> str:
    """NLL (nats/token) per position bucket (rows) and method (columns), then one summary line per extra span
    `(start, end)`: the token-weighted mean of the buckets inside it, labelled with the positions those buckets
    cover (`merge`), so a span that passes the data's end reads up to where the data ends; a summary that
    repeats a bucket is not printed twice."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    buckets = sorted({(r["bucket_start"], r["bucket_end"]) for r in rows})
    value = {(r["method"], r["bucket_start"], r["bucket_end"]): r["nll"] for r in rows}
    lines = [[f"[{a}, {b})", *(_num(value.get((m, a, b))) for m in methods)] for a, b in buckets]
    shown = set(buckets)
    for a, b in spans:
        merged = [merge(rows, m, a, b) for m in methods]
        covered = {(r["bucket_start"], r["bucket_end"]) for r in merged if r is not None}
        for start, end in sorted(covered - shown):
            shown.add((start, end))
            cells = [
                _num(r["nll"]) if r and (r["bucket_start"], r["bucket_end"]) == (start, end) else "-" for r in merged
            ]
            lines.append([f"[{start}, {end}) all", *cells])
    return "NLL (nats/token) by token position\n" + _grid(["position", *methods], lines)


def passkey_table(rows: list[dict], pretraining_length: int | None = None) -> str:
    """Accuracy over all depths per length (rows) and method (columns), and `passkey_note` when all are 0."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    acc = {(r["method"], r["length"]): r for r in rows if r["depth"] == "all"}
    lines = [[str(n), *(f"{acc[m, n]['accuracy']:.2f}" for m in methods)] for n in lengths]
    table = "passkey accuracy (all depths)\n" + _grid(["length", *methods], lines)
    note = passkey_note(rows, pretraining_length)
    return table + (f"\nnote: {note}" if note else "")


def passkey_note(rows: list[dict], pretraining_length: int | None = None) -> str | None:
    """What an all-zero passkey result means (None when some answer was right): the model cannot do the task,
    so the methods cannot be compared on it."""
    if not rows or any(r["accuracy"] > 0 for r in rows):
        return None
    inside = pretraining_length and any(r["method"] == "vanilla" and r["length"] <= pretraining_length for r in rows)
    if inside:
        return (
            "every method scores 0 at every length, the unmodified model inside its pretraining length included: "
            "this model cannot do the passkey task, so these results say nothing about the methods"
        )
    check = f" --lengths {pretraining_length}" if pretraining_length else ""
    return (
        "every method scores 0 at every length: the model may not be able to do the passkey task at all (check "
        f"with --methods vanilla{check}); these results say nothing about the methods"
    )


def generation_table(rows: list[dict]) -> str:
    """BLEU / ROUGE-L per method and cut position."""
    lines = [
        [r["method"], str(r["position"]), f"{r['bleu']:.2f}", f"{r['rougeL']:.3f}", str(r["samples"])] for r in rows
    ]
    return _grid(["method", "position", "BLEU", "ROUGE-L", "samples"], lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
