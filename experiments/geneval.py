"""Generation quality at positions past the window: BLEU / ROUGE-L of greedy continuations, on SmolLM2.

A real text is cut at several positions; from each cut the model continues greedily for
`--new-tokens` tokens, scored against the text's true continuation with sentence BLEU (sacrebleu,
0-100) and ROUGE-L F1 (rouge-score, 0-1), the scorers of `lminfinite.eval.generation`. Sample k
uses the text's k-th segment of `max(positions) + new_tokens` tokens (BOS first), so samples never
overlap and every method continues the same cuts. One item = (position, sample, method).

    nice -n 10 .venv/bin/python experiments/geneval.py                # the committed run
    .venv/bin/python experiments/geneval.py --report-only             # JSON + PNG from the partial file
"""

from __future__ import annotations

import argparse
import time

from common import (
    RESULTS,
    Partial,
    asset_path,
    command_line,
    commands,
    greedy_answer,
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", default="peter_pan_pg16.txt", help="a file in ../shared/assets/corpora")
    p.add_argument("--methods", default="vanilla,lminfinite")
    p.add_argument("--positions", default="512,2048,4096", help="cut positions in tokens of text")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--n-global", type=int, default=10)
    p.add_argument("--n-local", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--name", default="geneval_L1024", help="output name: results/geneval_smollm2/NAME.json/.png")
    p.add_argument("--report-only", action="store_true", help="only rebuild JSON + PNG from the partial file")
    return p.parse_args(argv)


def settings(args) -> dict:
    keys = ("model", "text", "new_tokens", "n_global", "n_local")
    span = max(parse_ints(args.positions)) + args.new_tokens  # the segments depend on the largest position
    return {**{k: getattr(args, k) for k in keys}, "span": span}


def summary(records: list[dict]) -> list[dict]:
    cells: dict = {}
    for r in records:
        cells.setdefault((r["method"], r["position"]), []).append(r)
    return [
        {
            "method": m,
            "position": p,
            "samples": len(v),
            "bleu": sum(r["bleu"] for r in v) / len(v),
            "rougeL": sum(r["rougeL"] for r in v) / len(v),
        }  # fmt: skip
        for (m, p), v in sorted(cells.items())
    ]


def plot(rows: list[dict], methods: list[str], n_local: int, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "bleu", "BLEU (0-100)"), (axes[1], "rougeL", "ROUGE-L F1")):
        for method in methods:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["position"])
            if mine:
                marker, colour = style(method)
                ax.plot([r["position"] for r in mine], [r[metric] for r in mine], marker=marker, color=colour,
                        label=method)  # fmt: skip
        ax.axvline(n_local, color="grey", linestyle="--", linewidth=1)
        ax.text(n_local, ax.get_ylim()[1], f" n_local = {n_local}", va="top", fontsize=8, color="grey")
        ax.set_xlabel("cut position (tokens of context before the continuation)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    log(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    positions = parse_ints(args.positions)
    folder = RESULTS / "geneval_smollm2"
    partial = Partial(folder, args.name, settings(args))
    items = [(p, s, m) for p in positions for s in range(args.samples) for m in methods]
    todo = [i for i in items if item_key(*i) not in partial]
    log(f"{len(items)} items, {len(items) - len(todo)} already in {partial.path}")
    if todo and not args.report_only:
        from lminfinite.eval.generation import scorers
        from lminfinite.eval.texts import encode_prefix, read_text_file

        bleu, rouge_l = scorers()
        model, tokenizer = load(args.model)
        span = settings(args)["span"]
        ids = encode_prefix(tokenizer, read_text_file(asset_path("corpora", args.text)), args.samples * span)
        if len(ids) < args.samples * span:
            raise SystemExit(f"{args.text} has {len(ids)} tokens; {args.samples} samples need {args.samples * span}")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        bar = progress(len(items), "gen-eval", len(items) - len(todo))
        for position, sample, method in todo:
            bar.set_postfix_str(f"{position} {method}")
            segment = ids[sample * span : (sample + 1) * span]
            t0 = time.time()
            new = greedy_answer(model, bos + segment[:position], args.new_tokens, method, args.n_global, args.n_local,
                                args.chunk_size)  # fmt: skip
            hyp = tokenizer.decode(new, skip_special_tokens=True)
            ref = tokenizer.decode(segment[position : position + args.new_tokens], skip_special_tokens=True)
            record = {"position": position, "sample": sample, "method": method, "bleu": bleu(hyp, ref),
                      "rougeL": rouge_l(hyp, ref), "continuation": hyp, "reference": ref,
                      "seconds": round(time.time() - t0, 1), "command": command_line()}  # fmt: skip
            partial.add(item_key(position, sample, method), record)
            log(f"{position} {method}: BLEU {record['bleu']:.1f} ROUGE-L {record['rougeL']:.3f} {hyp[:60]!r}")
            bar.update()
        bar.close()
    records = partial.values()
    methods = method_order([*methods, *(r["method"] for r in records)])
    done = {item_key(r["position"], r["sample"], r["method"]) for r in records}
    rows = summary(records)
    payload = {
        "experiment": "generation quality (BLEU / ROUGE-L of greedy continuations) by cut position",
        "commands": commands(records),
        "settings": {**settings(args), "methods": methods, "positions": positions, "samples": args.samples},
        "missing": [k for k in (item_key(*i) for i in items) if k not in done],
        "results": rows,
        "continuations": sorted(records, key=lambda r: (r["method"], r["position"], r["sample"])),
    }
    write_json(folder / f"{args.name}.json", payload)
    title = (
        f"{args.model}: greedy continuations of {args.text}, {args.new_tokens} new tokens, "
        f"{args.samples} sample(s) per point, n_global={args.n_global}, n_local={args.n_local}"
    )
    plot(rows, methods, args.n_local, folder / f"{args.name}.png", title)


if __name__ == "__main__":
    main()
