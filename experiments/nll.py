"""NLL by position past the training length (the paper's Figure 1) on SmolLM2-135M-Instruct.

One item = one window of `--length` tokens of one text, scored by one method; its per-position NLL
goes to the partial file, and the report buckets it. Methods as in `lminfinite.eval.methods`:
vanilla (the unmodified model, full attention), lminfinite (G=10, L=n_local), sinks (G + L - G
recent tokens, StreamingLLM-style positions), truncate (strided windows of L with stride L/2,
`lminfinite.eval.perplexity.truncate_nll`, about 3x the work of one pass).

    nice -n 10 .venv/bin/python experiments/nll.py            # the committed run (defaults)
    .venv/bin/python experiments/nll.py --report-only         # rebuild JSON + PNG from the partial file
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    RESULTS,
    Partial,
    command_line,
    commands,
    item_key,
    load,
    log,
    method_order,
    parse_ints,
    parse_methods,
    progress,
    style,
    write_json,
)

TEXTS = ("wikitext2_raw_test.raw", "peter_pan_pg16.txt")  # the committed run: the first; the book not run yet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--texts", default=TEXTS[0], help="files in ../shared/assets/corpora (comma-separated)")
    p.add_argument("--length", type=int, default=16384, help="tokens per window (BOS included)")
    p.add_argument("--windows", type=int, default=1, help="windows per text (consecutive, from the start)")
    p.add_argument("--methods", default="vanilla,lminfinite,sinks", help="also: truncate (about 3x the work)")
    p.add_argument("--n-global", type=int, default=10)
    p.add_argument("--n-local", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=2048, help="tokens per forward when scoring through a cache")
    p.add_argument("--buckets", default="0,2048,4096,6144,8192,10240,12288,14336,16384", help="bucket edges")
    p.add_argument("--plot-bucket", type=int, default=512, help="bucket width of the plotted curve")
    p.add_argument("--train-length", type=int, default=8192, help="the model's training length (marked in the plot)")
    p.add_argument("--name", default="nll16k", help="output name: results/nll_smollm2/NAME.json/.png")
    p.add_argument("--report-only", action="store_true", help="only rebuild JSON + PNG from the partial file")
    return p.parse_args(argv)


def settings(args) -> dict:
    keys = ("model", "length", "windows", "n_global", "n_local")
    return {k: getattr(args, k) for k in keys}


def score_window(model, window: torch.Tensor, method: str, n_global: int, n_local: int, chunk_size: int):
    """Per-position NLL (n - 1,) of one window; the library's own helpers do the work."""
    from lminfinite import score
    from lminfinite.eval.methods import applied
    from lminfinite.eval.perplexity import truncate_nll

    with applied(model, method, n_global, n_local), torch.no_grad():
        if method == "truncate":
            return truncate_nll(model, window, n_local)
        return score(model, window[None], chunk_size=chunk_size)[0]


def bucket_rows(records: list[dict], edges: list[int]) -> list[dict]:
    """Mean NLL per (text, method, bucket) and over all texts ("all"), token-weighted."""
    rows = []
    groups: dict = {}
    for r in records:
        for text in (r["text"], "all"):
            groups.setdefault((text, r["method"]), []).append(torch.tensor(r["nll"], dtype=torch.float64))
    for (text, method), nlls in sorted(groups.items()):
        for start, end in zip(edges, edges[1:], strict=False):
            values = torch.cat([n[start:end] for n in nlls])
            values = values[~values.isnan()]
            if values.numel():
                mean = float(values.mean())
                rows.append(
                    {
                        "text": text,
                        "method": method,
                        "bucket_start": start,
                        "bucket_end": end,
                        "tokens": values.numel(),
                        "nll": mean,
                        "ppl": float(torch.tensor(mean).exp()),
                    }
                )
    return rows


def plot(
    records: list[dict],
    methods: list[str],
    texts: list[str],
    width: int,
    n_local: int,
    train_length: int,
    path,
    title: str,
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.2), squeeze=False, sharey=False)
    for ax, text in zip(axes[0], texts, strict=True):
        mine = [r for r in records if r["text"] == text]
        n = max((len(r["nll"]) for r in mine), default=0)
        edges = list(range(0, n + width, width))
        for number, row_method in enumerate(methods):
            rows = [r for r in bucket_rows([r for r in mine if r["method"] == row_method], edges) if r["text"] == text]
            if not rows:
                continue
            marker, colour = style(row_method)
            xs = [(r["bucket_start"] + r["bucket_end"]) / 2 for r in rows]
            ax.plot(
                xs,
                [r["nll"] for r in rows],
                marker=marker,
                color=colour,
                label=row_method,
                markersize=5,
                linewidth=2.4 if number == 1 else 1.2,  # drawn under the others, which often coincide with it
                linestyle=("-", "-", "--", ":", "-.")[number % 5],
                markevery=(number % 4, 4),  # markers of coinciding curves on different points
                zorder=3 - 0.1 * number,
            )
        ax.axvline(n_local, color="grey", linestyle="--", linewidth=1)
        label = f" n_local = {n_local}" + (" = training length" if n_local == train_length else "")
        ax.text(n_local, ax.get_ylim()[1], label, va="top", fontsize=8, color="grey")
        if train_length != n_local and train_length < n:
            ax.axvline(train_length, color="black", linestyle=":", linewidth=1)
            ax.text(train_length, ax.get_ylim()[1], f" training length {train_length}", va="top", fontsize=8)
        ax.set_xlabel("position of the predicting token")
        ax.set_ylabel(f"NLL (nats/token), mean over {width}-token buckets")
        ax.set_title(text, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    log(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    texts = [t for t in args.texts.split(",") if t]
    edges = parse_ints(args.buckets)
    folder = RESULTS / "nll_smollm2"
    partial = Partial(folder, args.name, settings(args))
    items = [(t, k, m) for t in texts for k in range(args.windows) for m in methods]
    todo = [i for i in items if item_key(*i) not in partial]
    log(f"{len(items)} items, {len(items) - len(todo)} already in {partial.path}")
    if todo and not args.report_only:
        from common import asset_path

        from lminfinite.eval.texts import read_text_file, windows

        model, tokenizer = load(args.model)
        cut = {
            t: windows(tokenizer, read_text_file(asset_path("corpora", t)), args.windows, args.length, t)
            for t in {t for t, _, _ in todo}
        }
        bar = progress(len(items), "nll", len(items) - len(todo))
        for text, k, method in todo:
            bar.set_postfix_str(f"{text[:12]} {method}")
            t0 = time.time()
            nll = score_window(model, cut[text][k], method, args.n_global, args.n_local, args.chunk_size)
            seconds = time.time() - t0
            partial.add(
                item_key(text, k, method),
                {
                    "text": text,
                    "window": k,
                    "method": method,
                    "seconds": seconds,
                    "command": command_line(),
                    "nll": [round(float(x), 4) for x in nll],
                },
            )
            log(f"{text} window {k} {method}: {seconds:.0f} s, mean NLL {float(nll.mean()):.3f}")
            bar.update()
        bar.close()
    # The report holds every item run with these settings (earlier runs with other --texts/--methods too).
    records = partial.values()
    texts = list(dict.fromkeys([*texts, *(r["text"] for r in records)]))
    methods = method_order([*methods, *(r["method"] for r in records)])
    done = {item_key(r["text"], r["window"], r["method"]) for r in records}
    payload = {
        "experiment": "NLL by position (paper, Figure 1)",
        "commands": commands(records),
        "settings": {**settings(args), "texts": texts, "methods": methods, "chunk_size": args.chunk_size},
        "missing": [k for k in (item_key(*i) for i in items) if k not in done],
        "seconds": {item_key(r["text"], r["window"], r["method"]): round(r["seconds"], 1) for r in records},
        "results": bucket_rows(records, edges),
    }
    write_json(folder / f"{args.name}.json", payload)
    title = (
        f"{args.model}: NLL by position, {args.windows} window(s) of {args.length} tokens per text, "
        f"n_global={args.n_global}, n_local={args.n_local}"
    )
    plotted = [t for t in texts if any(r["text"] == t for r in records)]
    plot(
        records, methods, plotted, args.plot_bucket, args.n_local, args.train_length, folder / f"{args.name}.png", title
    )


if __name__ == "__main__":
    main()
