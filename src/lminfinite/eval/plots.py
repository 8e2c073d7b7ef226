"""PNG plots of the eval results (matplotlib, Agg backend: no display needed).

Every plot has one line per method, a log-2 x axis and a dashed line at the pretraining length.
"""

from __future__ import annotations

import os
from pathlib import Path


def _series(rows: list[dict], x, y: str) -> dict[str, tuple[list, list]]:
    """{method: (xs, ys)} sorted by x, in the order methods first appear; `x` is a key or a function of a row."""
    get_x = x if callable(x) else (lambda r: r[x])
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((get_x(r), r[y]) for r in rows if r["method"] == method)
        out[method] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def _plot(series, path, title: str, xlabel: str, ylabel: str, pretraining_length: int | None, ylim=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=method)
    if pretraining_length:
        ax.axvline(pretraining_length, color="gray", linestyle="--", label=f"pretraining length ({pretraining_length})")
    ax.set_xscale("log", base=2)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_nll(
    rows: list[dict], path: str | os.PathLike, title: str, pretraining_length: int | None = None, y: str = "nll"
) -> Path:
    """NLL (or `y="ppl"`) against the centre of each position bucket."""
    series = _series(rows, lambda r: (r["bucket_start"] + r["bucket_end"]) / 2, y)
    ylabel = "perplexity" if y == "ppl" else "NLL (nats/token)"
    return _plot(series, path, title, "token position (bucket centre)", ylabel, pretraining_length)


def plot_passkey(rows: list[dict], path: str | os.PathLike, title: str, pretraining_length: int | None = None) -> Path:
    """Passkey accuracy over all depths against the prompt length."""
    series = _series([r for r in rows if r["depth"] == "all"], "length", "accuracy")
    return _plot(series, path, title, "prompt length (tokens)", "passkey accuracy", pretraining_length, (-0.05, 1.05))


def plot_generation(
    rows: list[dict], path: str | os.PathLike, title: str, pretraining_length: int | None = None
) -> Path:
    """ROUGE-L F1 of the continuation against the cut position."""
    series = _series(rows, "position", "rougeL")
    return _plot(series, path, title, "cut position (prompt tokens)", "ROUGE-L F1", pretraining_length, (-0.05, 1.05))
