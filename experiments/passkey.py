"""Passkey retrieval by prompt length and depth of the key (the paper's Table / heatmap) on SmolLM2.

The prompt is the paper's (`lminfinite.eval.passkey.make_prompt`: task, filler sentences, the key
line at a given depth, the question); the model answers greedily (`--answer-tokens`) and is right
when the key's digits appear in the answer. One item = (length, depth, sample, method); the key
depends only on (seed, length, depth, sample), so every method sees the same prompts. Items run
shortest length first, so a cut-short run still holds complete grids for the lengths it reached.

    nice -n 10 .venv/bin/python experiments/passkey.py                       # committed main run
    nice -n 10 .venv/bin/python experiments/passkey.py --name sweep_topk --lengths 4096 --depths 0.2 \\
        --methods topk:5:0,topk:10:0,topk:5:15,topk:10:15                      # the top-k sweep
    .venv/bin/python experiments/passkey.py --report-only                    # JSON + PNG from partial
"""

from __future__ import annotations

import argparse
import random
import time

from common import (
    RESULTS,
    Partial,
    command_line,
    commands,
    greedy_answer,
    heatmaps,
    item_key,
    load,
    log,
    method_order,
    parse_floats,
    parse_ints,
    parse_methods,
    progress,
    write_json,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", default="vanilla,lminfinite,topk")
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens (at most)")
    p.add_argument("--depths", default="0.2,0.5,0.8", help="depths of the key line (0 = right after the task)")
    p.add_argument("--samples", type=int, default=1, help="prompts (keys) per length and depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-global", type=int, default=10)
    p.add_argument("--n-local", type=int, default=1024)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=2048, help="tokens per forward of the prefill")
    p.add_argument("--train-length", type=int, default=8192, help="the model's training length (for the title)")
    p.add_argument("--name", default="passkey_L1024", help="output name: results/passkey_smollm2/NAME.json/.png")
    p.add_argument("--report-only", action="store_true", help="only rebuild JSON + PNG from the partial file")
    return p.parse_args(argv)


def passkey(seed: int, length: int, depth: float, sample: int) -> int:
    """The 5-digit key of one prompt, from its coordinates only (not from the order items run in)."""
    return random.Random(f"{seed}-{length}-{depth}-{sample}").randint(10000, 99999)


def settings(args) -> dict:
    keys = ("model", "seed", "n_global", "n_local", "answer_tokens")
    return {k: getattr(args, k) for k in keys}


def summary(records: list[dict]) -> list[dict]:
    """Accuracy rows per (method, length, depth) and per (method, length) over all depths ("all")."""
    cells: dict = {}
    for r in records:
        for depth in (r["depth"], "all"):
            cells.setdefault((r["method"], r["length"], depth), []).append(r["correct"])
    return [
        {"method": m, "length": n, "depth": d, "accuracy": sum(v) / len(v), "samples": len(v)}
        for (m, n, d), v in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2])))
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    lengths, depths = parse_ints(args.lengths), parse_floats(args.depths)
    folder = RESULTS / "passkey_smollm2"
    partial = Partial(folder, args.name, settings(args))
    items = [(n, d, s, m) for n in lengths for d in depths for s in range(args.samples) for m in methods]
    todo = [i for i in items if item_key(*i) not in partial]
    log(f"{len(items)} items, {len(items) - len(todo)} already in {partial.path}")
    if todo and not args.report_only:
        from lminfinite.eval.passkey import is_correct, make_prompt

        model, tokenizer = load(args.model)
        bar = progress(len(items), "passkey", len(items) - len(todo))
        for length, depth, sample, method in todo:
            bar.set_postfix_str(f"{length} {depth} {method}")
            key = passkey(args.seed, length, depth, sample)
            prompt = make_prompt(tokenizer, length, depth, key)
            t0 = time.time()
            new = greedy_answer(model, prompt, args.answer_tokens, method, args.n_global, args.n_local, args.chunk_size)
            answer = tokenizer.decode(new, skip_special_tokens=True)
            record = {"length": length, "depth": depth, "sample": sample, "method": method, "passkey": key,
                      "prompt_tokens": len(prompt), "answer": answer, "correct": is_correct(answer, key),
                      "seconds": round(time.time() - t0, 1), "command": command_line()}  # fmt: skip
            partial.add(item_key(length, depth, sample, method), record)
            log(f"{length} tokens, depth {depth}, {method}: {answer!r} (key {key}) {record['seconds']} s")
            bar.update()
        bar.close()
    records = partial.values()  # everything run with these settings, earlier --methods/--lengths included
    methods = method_order([*methods, *(r["method"] for r in records)])
    lengths = sorted({*lengths, *(r["length"] for r in records)})
    depths = sorted({*depths, *(r["depth"] for r in records)})
    done = {item_key(r["length"], r["depth"], r["sample"], r["method"]) for r in records}
    payload = {
        "experiment": "passkey retrieval by length and depth",
        "commands": commands(records),
        "settings": {
            **settings(args),
            "methods": methods,
            "lengths": lengths,
            "depths": depths,
            "samples": args.samples,
        },  # fmt: skip
        "missing": [k for k in (item_key(*i) for i in items) if k not in done],
        "results": summary(records),
        "answers": sorted(
            (
                {k: r[k] for k in ("method", "length", "depth", "sample", "passkey", "answer", "correct", "seconds")}
                for r in records
            ),
            key=lambda r: (r["method"], r["length"], r["depth"], r["sample"]),
        ),  # fmt: skip
    }
    write_json(folder / f"{args.name}.json", payload)
    title = (f"{args.model}: passkey accuracy, n_global={args.n_global}, n_local={args.n_local}, "
             f"{args.samples} prompt(s) per cell (training length {args.train_length})")  # fmt: skip
    heatmaps(records, methods, lengths, depths, title, folder / f"{args.name}.png")


if __name__ == "__main__":
    main()
