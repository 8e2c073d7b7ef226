"""PNG (or PDF, SVG, ...) plots of the eval results (matplotlib, Agg backend: no display needed).

Every plot has one line per method, a log-2 x axis and a dashed line at the pretraining length.
Methods that give the same numbers (inside the window they all do) must stay visible: each has its
own marker, line style and marker size (open markers, shrinking, so they nest where lines agree). The NLL plot's y range
leaves out position 0 (the first prediction, after BOS alone: NLL far above the rest), saying so
on the plot; a
passkey plot where every answer was wrong says that the model cannot do the task.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

from .errors import BadValue, MissingDependency
from .report import check_output_path, passkey_note

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
FIRST_POSITIONS = 1  # NLL buckets ending at or before this position (position 0 only) do not set the y range


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | os.PathLike) -> Path:
    """BadValue unless a plot can be saved at `path`: a known image extension and a writable place
    (run before a long evaluation)."""
    path = Path(path)
    plt = _pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg(plt.Figure()).get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        what = f"unknown image extension .{suffix}" if suffix else "no image extension"
        raise BadValue(f"plot {path}: {what}; use one of .{', .'.join(sorted(formats))}")
    return check_output_path(path, "plot")


def _series(rows: list[dict], x, y: str) -> dict[str, tuple[list, list]]:
    """{method: (xs, ys)} sorted by x, in the order methods first appear; `x` is a key or a function of a row."""
    get_x = x if callable(x) else (lambda r: r[x])
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((get_x(r), r[y]) for r in rows if r["method"] == method)
        out[method] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def _figure(series, title: str, xlabel: str, ylabel: str, pretraining_length: int | None, ylim=None, note: str = ""):
    """A matplotlib Figure with one styled line per method (not saved, not closed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (method, (xs, ys)) in enumerate(series.items()):
        ax.plot(
            xs,
            ys,
            marker=MARKERS[i % len(MARKERS)],
            linestyle=LINESTYLES[i % len(LINESTYLES)],
            ms=max(3.0, 10.0 - 2.2 * i),
            mfc="none",  # open, shrinking markers nest inside each other where methods agree
            mew=1.3,
            lw=1.4,
            label=method,
            zorder=3 + i,  # later (smaller) markers on top of earlier (larger) ones
        )
    if pretraining_length:
        ax.axvline(pretraining_length, color="gray", linestyle="--", label=f"pretraining length ({pretraining_length})")
    ax.set_xscale("log", base=2)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if note:
        ax.text(
            0.5,
            0.5,
            textwrap.fill(note, 60),
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "gray"},
            zorder=20,
        )
    fig.tight_layout()
    return fig


def save(fig, path: str | os.PathLike) -> Path:
    """Save `fig` at `path` (creating the folder) and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _nll_range(rows: list[dict], y: str) -> tuple[tuple[float, float] | None, str]:
    """The y range of the buckets past the first positions, and a note on the points it leaves out."""
    later = [r[y] for r in rows if r["bucket_end"] > FIRST_POSITIONS and math.isfinite(r[y])]
    if not later:
        return None, ""
    lo, hi = min(later), max(later)
    pad = 0.08 * (hi - lo) or 0.1 * abs(hi) or 0.1
    low, high = lo - pad, hi + pad
    out = [r for r in rows if r["bucket_end"] <= FIRST_POSITIONS and math.isfinite(r[y]) and not low <= r[y] <= high]
    if not out:
        return None, ""
    end = max(r["bucket_end"] for r in out)
    where = "position 0" if end == 1 else f"positions < {end}"
    note = f"off the scale: {y.upper()} up to {max(r[y] for r in out):.2f} at {where} (too little context)"
    return (low, high), note


def nll_figure(rows: list[dict], title: str, pretraining_length: int | None = None, y: str = "nll"):
    """NLL (or `y="ppl"`) against the centre of each position bucket; position 0 does not set the range."""
    series = _series(rows, lambda r: (r["bucket_start"] + r["bucket_end"]) / 2, y)
    ylabel = "perplexity" if y == "ppl" else "NLL (nats/token)"
    ylim, clipped = _nll_range(rows, y)
    xlabel = "token position (bucket centre)" + (f"\n{clipped}" if clipped else "")
    return _figure(series, title, xlabel, ylabel, pretraining_length, ylim)


def plot_nll(
    rows: list[dict], path: str | os.PathLike, title: str, pretraining_length: int | None = None, y: str = "nll"
) -> Path:
    """`nll_figure` saved at `path`."""
    return save(nll_figure(rows, title, pretraining_length, y), path)


def passkey_figure(rows: list[dict], title: str, pretraining_length: int | None = None):
    """Passkey accuracy over all depths against the prompt length (with `report.passkey_note` when all are 0)."""
    series = _series([r for r in rows if r["depth"] == "all"], "length", "accuracy")
    note = passkey_note(rows, pretraining_length) or ""
    xlabel, ylabel = "prompt length (tokens)", "passkey accuracy"
    return _figure(series, title, xlabel, ylabel, pretraining_length, (-0.05, 1.05), note)


def plot_passkey(rows: list[dict], path: str | os.PathLike, title: str, pretraining_length: int | None = None) -> Path:
    """`passkey_figure` saved at `path`."""
    return save(passkey_figure(rows, title, pretraining_length), path)


def plot_generation(
    rows: list[dict], path: str | os.PathLike, title: str, pretraining_length: int | None = None
) -> Path:
    """ROUGE-L F1 of the continuation against the cut position."""
    series = _series(rows, "position", "rougeL")
    xlabel = "cut position (prompt tokens)"
    return save(_figure(series, title, xlabel, "ROUGE-L F1", pretraining_length, (-0.05, 1.05)), path)
