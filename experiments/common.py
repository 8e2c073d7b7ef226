"""Shared pieces of the SmolLM2 experiments: loading the model, resumable partial results, greedy answers, plots.

Every experiment is a list of independent items (one window, one prompt, one cut of a text). Each
finished item is appended as one JSON line to `results/<exp>/partial/<name>-<hash>.jsonl`, where
the hash covers the settings that change results; a rerun with the same settings skips what is
there, a run with other settings starts its own file. The final JSON and PNG are rebuilt from the
partial file at the end of every run (and with `--report-only`, without loading the model).

Only the library's public API (`enable`/`disable` through `eval.methods.applied`, `prefill`,
`score`, the model's forward) and a few small eval helpers are used, so that the eval suite can
change around these scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
MODEL = "smollm2"
GGUF_FOLDER = ("models", "smollm2-135m-instruct")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# One marker and colour per method, the same in every plot.
STYLE = {
    "vanilla": ("o", "tab:red"),
    "lminfinite": ("s", "tab:blue"),
    "truncate": ("^", "tab:green"),
    "sinks": ("D", "tab:purple"),
    "topk": ("*", "tab:orange"),
    "memory": ("P", "tab:brown"),
}


def log(message: str) -> None:
    """One line on stderr, flushed (the logs of background runs are read while they run)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def asset_path(*parts: str) -> Path:
    from lminfinite.models.assets import asset

    return asset(*parts)


def load(name: str = MODEL):
    """(model in eval mode, tokenizer): `lminfinite.models.load_model(name)`; for "smollm2" on a tree whose
    loader does not know that name yet, the shared GGUF asset through transformers directly."""
    from lminfinite.models import load_model

    t = time.time()
    try:
        model, tokenizer = load_model(name)
    except (FileNotFoundError, ValueError, OSError) as e:
        if name != MODEL:
            raise
        log(f"load_model({name!r}) failed ({str(e).splitlines()[0][:120]}); loading the GGUF asset directly")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = asset_path(*GGUF_FOLDER)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    log(f"loaded {name} in {time.time() - t:.1f} s")
    return model, tokenizer


def settings_hash(settings: dict) -> str:
    """A short stable hash of the settings that change results."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


class Partial:
    """Finished items of one run, one JSON line each, keyed by `key` (a string made of the item's fields)."""

    def __init__(self, folder: Path, name: str, settings: dict):
        self.path = Path(folder) / "partial" / f"{name}-{settings_hash(settings)}.jsonl"
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill: that item runs again
                        continue
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, key: str, record: dict) -> None:
        if "key" in record:
            raise ValueError("an item's record must not have a field 'key' (the item's key is stored there)")
        record = {"key": key, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[key] = record

    def values(self) -> list[dict]:
        return list(self.records.values())


def command_line() -> str:
    """This run's command as typed from the repository root (stored with each item it ran)."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


def commands(records: Iterable[dict]) -> list[str]:
    """The distinct commands that ran the items of a report, in the order they first appear."""
    return list(dict.fromkeys(r["command"] for r in records if r.get("command")))


def item_key(*fields: object) -> str:
    return "|".join(str(f) for f in fields)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def progress(total: int, desc: str, done: int = 0):
    """A tqdm bar on stderr (also in a log file: the runs are read while they run)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, file=sys.stderr, mininterval=5, dynamic_ncols=False, ncols=100)


def parse_ints(spec: str) -> list[int]:
    values = [int(v) for v in spec.split(",") if v.strip()]
    if not values:
        raise ValueError(f"expected a comma-separated list of integers, got {spec!r}")
    return values


def parse_floats(spec: str) -> list[float]:
    values = [float(v) for v in spec.split(",") if v.strip()]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"expected a comma-separated list of numbers in [0, 1], got {spec!r}")
    return values


def parse_methods(spec: str) -> list[str]:
    from lminfinite.eval.methods import parse_methods as parse

    return parse(spec)


def method_order(methods: Sequence[str]) -> list[str]:
    """The methods once each, in STYLE's order (variants of a family by their spec, shortest first).

    Reports and plots list methods the same way whichever run came last.
    """
    families = list(STYLE)

    def key(method: str) -> tuple[int, int, str]:
        family = method.split(":", 1)[0]
        return (families.index(family) if family in families else len(families), len(method), method)

    return sorted(dict.fromkeys(methods), key=key)


def style(method: str) -> tuple[str, str]:
    return STYLE.get(method.split(":", 1)[0], ("x", "black"))


def greedy_answer(
    model, prompt: Sequence[int], max_new_tokens: int, method: str, n_global: int, n_local: int, chunk_size: int = 2048
) -> list[int]:
    """Greedy continuation (new ids) of `prompt` under `method`, through the library's public API.

    vanilla / lminfinite / sinks / topk / memory: the prompt minus its last token is prefilled in chunks
    (`lminfinite.prefill`; vanilla gets transformers' own cache), then one token per forward.
    truncate: every step reruns the model on the latest `n_local` ids, at fresh positions.
    """
    from lminfinite import prefill
    from lminfinite.compat import cache_keyword
    from lminfinite.eval.methods import applied

    if not prompt:
        raise ValueError("greedy_answer() needs a prompt of at least one token")
    out: list[int] = []
    with applied(model, method, n_global, n_local), torch.no_grad():
        if method == "truncate":
            for _ in range(max_new_tokens):
                ids = torch.tensor([(list(prompt) + out)[-n_local:]])
                out.append(int(model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].argmax()))
            return out
        ids = torch.tensor([list(prompt)])
        cache = prefill(model, ids[:, :-1], chunk_size=chunk_size)  # the cache is filled in place
        step = ids[:, -1:]
        for _ in range(max_new_tokens):
            logits = model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache}).logits
            out.append(int(logits[0, -1].argmax()))
            step = torch.tensor([[out[-1]]])
    return out


def accuracy_table(records: Iterable[dict], row_field: str, col_field: str) -> dict:
    """{(row, col): (correct, total)} over records with a boolean "correct"."""
    table: dict = {}
    for r in records:
        cell = table.setdefault((r[row_field], r[col_field]), [0, 0])
        cell[0] += int(r["correct"])
        cell[1] += 1
    return {k: tuple(v) for k, v in table.items()}


def heatmaps(
    records: list[dict],
    methods: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    title: str,
    path: Path,
    ylabel: str = "depth of the key (0 = start)",
) -> None:
    """One accuracy heatmap (length x depth) per method, side by side, the cells labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1.2, 3.4), squeeze=False)
    image = None
    for ax, method in zip(axes[0], methods, strict=True):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        table = accuracy_table([r for r in records if r["method"] == method], "depth", "length")
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                if (d, n) in table:
                    ok, total = table[(d, n)]
                    grid[i, j] = ok / total
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not torch.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths] if ax is axes[0][0] else [])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(method)
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(title, fontsize=10, y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
