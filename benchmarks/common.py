"""Shared pieces of the benchmarks: models, one measurement per subprocess, results on disk.

Each measurement runs in a fresh Python process so that its peak resident memory is its own; the
peak is restarted after set-up (model, text, tokenization), so it counts the measured work.
Results go to `benchmarks/results/<name>.json` with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).resolve().parent / "results"  # where save() and plot() write; see use_results()


def use_results(folder: str | Path) -> Path:
    """Write this process's results (JSON, plots) to `folder` instead of `benchmarks/results`."""
    global RESULTS
    RESULTS = Path(folder)
    return RESULTS


# A Llama of realistic width (as in Llama-style 1B models): speed does not depend on the weights.
REALISTIC = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
)


# The same width as an ALiBi model (MPT: no GQA, a 4x MLP without gate).
REALISTIC_MPT = dict(vocab_size=32000, d_model=2048, n_heads=16, n_layers=4)
MODELS = {
    "llama": "random Llama (hidden 2048, 16 heads, 4 KV heads, 4 layers)",
    "mpt": "random MPT with ALiBi (d_model 2048, 16 heads, 4 layers)",
}


def realistic_model(n_local: int, family: str = "llama", table: int | None = None):
    """A random model pretrained (so to speak) on `n_local` tokens; MPT's ALiBi table gets `table`
    columns (the unmodified MPT cannot run past its table)."""
    torch.manual_seed(0)
    if family == "mpt":
        config = transformers.MptConfig(**REALISTIC_MPT, max_seq_len=table or n_local)
        return transformers.MptForCausalLM(config).eval()
    config = transformers.LlamaConfig(**REALISTIC, max_position_embeddings=n_local)
    return transformers.LlamaForCausalLM(config).eval()


def stories_model():
    from lminfinite.models import load_model

    return load_model("stories260K")


def reset_peak_rss() -> None:
    """Restart the peak-RSS count here (Linux: /proc/self/clear_refs), so set-up is not counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start (or since `reset_peak_rss()`), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32",
    }


def parse_args(doc: str, argv, point, *options: tuple[str, dict]) -> argparse.Namespace | None:
    """Parse a benchmark's command line. With `--point JSON` (how `run_point` calls a script), run
    that one measurement, print its JSON row and return None."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kwargs in options:
        parser.add_argument(flag, **{"help": "(default: %(default)s)", **kwargs})
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(point(**json.loads(args.point))))
        return None
    return args


def run_point(script: str, **params) -> dict:
    """Run `script --point` with `params` in a subprocess and return the JSON it prints."""
    args = [sys.executable, script, "--point", json.dumps(params)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {params} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def save(name: str, config: dict, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"benchmark": name, "environment": environment(), "config": config, "results": rows}, indent=1)
    )
    return path


def report(
    name: str, n_local: int, config: dict, rows: list[dict], panel: tuple[str, str], xlabel: str, family: str = "llama"
) -> None:
    """Save a random-model benchmark's JSON and its plot (time per token and `panel` against length/L)."""
    shape = REALISTIC_MPT if family == "mpt" else REALISTIC
    save(name, {"model": {MODELS[family]: shape}, "n_local": n_local, "n_global": 10, **config}, rows)
    title = f"{name.split('_')[0].capitalize()}, {MODELS[family]}, L={n_local}"
    plot(name, rows, "mult", [("ms_per_token", "ms per token"), panel], xlabel, title)


def plot(name: str, rows: list[dict], x: str, ys: list[tuple[str, str]], xlabel: str, title: str) -> Path:
    """One panel per (key, label) in `ys`, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(5.5 * len(ys), 4))
    axes = [axes] if len(ys) == 1 else axes
    for ax, (key, label) in zip(axes, ys, strict=True):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            pts = [(r[x], r[key]) for r in rows if r["method"] == method and r.get(key) is not None]
            style = {"marker": "osD^v"[i % 5], "linestyle": ("-", "--", "-.", ":")[i % 4], "ms": max(3, 8 - 1.5 * i)}
            ax.plot(*zip(*pts, strict=True), label=method, mfc="none" if i % 2 else None, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
