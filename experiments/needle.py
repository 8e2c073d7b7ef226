"""A needle in real text, asked through the chat template, by prompt length and depth, on SmolLM2.

A fact sentence (e.g. "The secret ingredient of Mrs. Hubbard's pie is cardamom.") is put at a
sentence end near a given depth of an excerpt of a real book; the user message of the model's own
chat template (ChatML for SmolLM2) is the excerpt followed by the question; the model answers
greedily and is right when the answer word appears in its reply (case ignored). Sample s uses fact
s (of `FACTS`) and an excerpt starting s * 7919 tokens into the book, so samples differ; every
method sees the same prompts. One item = (length, depth, sample, method), shortest length first.

    nice -n 10 .venv/bin/python experiments/needle.py                 # the committed run
    .venv/bin/python experiments/needle.py --report-only              # JSON + PNG from the partial file
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

# (fact sentence, question, answer word)
FACTS = (
    (
        "The secret ingredient of Mrs. Hubbard's pie is cardamom.",
        "What is the secret ingredient of Mrs. Hubbard's pie?",
        "cardamom",
    ),
    (
        "The name of the old captain's parrot is Pistachio.",
        "What is the name of the old captain's parrot?",
        "pistachio",
    ),
    (
        "The favourite colour of the lighthouse keeper is turquoise.",
        "What is the favourite colour of the lighthouse keeper?",
        "turquoise",
    ),
)
INTRO = "Read the following text and answer the question after it.\n\n"
OFFSET_STEP = 7919  # tokens between the excerpts of successive samples


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--book", default="alice_pg11.txt", help="a file in ../shared/assets/corpora")
    p.add_argument("--methods", default="vanilla,lminfinite,topk")
    p.add_argument("--lengths", default="2048", help="prompt lengths in tokens (chat template included)")
    p.add_argument("--depths", default="0.2,0.5,0.8", help="depths of the fact in the excerpt")
    p.add_argument("--samples", type=int, default=1, help="prompts per length and depth (a different fact each)")
    p.add_argument("--n-global", type=int, default=10)
    p.add_argument("--n-local", type=int, default=1024)
    p.add_argument("--answer-tokens", type=int, default=24, help="the model restates the question first")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--train-length", type=int, default=8192, help="the model's training length (for the title)")
    p.add_argument("--name", default="needle_L1024", help="output name: results/needle_smollm2/NAME.json/.png")
    p.add_argument("--report-only", action="store_true", help="only rebuild JSON + PNG from the partial file")
    return p.parse_args(argv)


def settings(args) -> dict:
    keys = ("model", "book", "n_global", "n_local", "answer_tokens")
    return {k: getattr(args, k) for k in keys}


def insert_at_sentence(text: str, sentence: str, depth: float) -> str:
    """`text` with `sentence` put after the sentence end (". ", "! ", "? " or a line end) nearest `depth`."""
    target = round(depth * len(text))
    ends = [i + 1 for i, c in enumerate(text[:-1]) if c in ".!?\n" and text[i + 1] in " \n"]
    if not ends:
        return text[:target] + " " + sentence + " " + text[target:]
    cut = min(ends, key=lambda i: abs(i - target))
    return text[:cut] + " " + sentence + text[cut:]


def chat_ids(tokenizer, message: str) -> list[int]:
    """Ids of one user message through the tokenizer's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return tokenizer.encode(text, add_special_tokens=False)


def build_prompt(tokenizer, book_ids: list[int], length: int, depth: float, sample: int) -> list[int]:
    """Chat-template ids of at most `length` tokens: an excerpt with fact `sample` at `depth`, then the question."""
    fact, question, _ = FACTS[sample % len(FACTS)]
    tail = f"\n\nQuestion: {question} Answer in a few words."
    fixed = len(chat_ids(tokenizer, INTRO + fact + tail)) + 4
    start = (sample * OFFSET_STEP) % max(1, len(book_ids) - length)
    n = length - fixed
    while n > 0:
        excerpt = tokenizer.decode(book_ids[start : start + n])
        ids = chat_ids(tokenizer, INTRO + insert_at_sentence(excerpt, fact, depth) + tail)
        if len(ids) <= length:
            return ids
        n -= len(ids) - length
    raise ValueError(f"length {length} is too short for the question and the chat template")


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    lengths, depths = parse_ints(args.lengths), parse_floats(args.depths)
    folder = RESULTS / "needle_smollm2"
    partial = Partial(folder, args.name, settings(args))
    items = [(n, d, s, m) for n in lengths for d in depths for s in range(args.samples) for m in methods]
    todo = [i for i in items if item_key(*i) not in partial]
    log(f"{len(items)} items, {len(items) - len(todo)} already in {partial.path}")
    if todo and not args.report_only:
        from lminfinite.eval.texts import encode_prefix, read_text_file

        model, tokenizer = load(args.model)
        book = encode_prefix(tokenizer, read_text_file(asset_path("corpora", args.book)), 10**9)
        bar = progress(len(items), "needle", len(items) - len(todo))
        for length, depth, sample, method in todo:
            bar.set_postfix_str(f"{length} {depth} {method}")
            prompt = build_prompt(tokenizer, book, length, depth, sample)
            word = FACTS[sample % len(FACTS)][2]
            t0 = time.time()
            new = greedy_answer(model, prompt, args.answer_tokens, method, args.n_global, args.n_local, args.chunk_size)
            answer = tokenizer.decode(new, skip_special_tokens=True)
            record = {"length": length, "depth": depth, "sample": sample, "method": method, "word": word,
                      "prompt_tokens": len(prompt), "answer": answer, "correct": word in answer.lower(),
                      "seconds": round(time.time() - t0, 1), "command": command_line()}  # fmt: skip
            partial.add(item_key(length, depth, sample, method), record)
            log(f"{length} tokens, depth {depth}, {method}: {answer!r} ({word}) {record['seconds']} s")
            bar.update()
        bar.close()
    records = partial.values()
    methods = method_order([*methods, *(r["method"] for r in records)])
    lengths = sorted({*lengths, *(r["length"] for r in records)})
    depths = sorted({*depths, *(r["depth"] for r in records)})
    done = {item_key(r["length"], r["depth"], r["sample"], r["method"]) for r in records}
    from passkey import summary

    payload = {
        "experiment": "needle (a fact sentence) in a real book, asked through the chat template",
        "commands": commands(records),
        "settings": {
            **settings(args),
            "methods": methods,
            "lengths": lengths,
            "depths": depths,
            "samples": args.samples,
            "facts": FACTS,
            "intro": INTRO,
        },  # fmt: skip
        "missing": [k for k in (item_key(*i) for i in items) if k not in done],
        "results": summary(records),
        "answers": sorted(
            (
                {k: r[k] for k in ("method", "length", "depth", "sample", "word", "answer", "correct", "seconds")}
                for r in records
            ),
            key=lambda r: (r["method"], r["length"], r["depth"], r["sample"]),
        ),  # fmt: skip
    }
    write_json(folder / f"{args.name}.json", payload)
    title = (
        f"{args.model}: needle in {args.book} (chat template), n_global={args.n_global}, n_local={args.n_local}, "
        f"{args.samples} prompt(s) per cell (training length {args.train_length})"
    )
    heatmaps(records, methods, lengths, depths, title, folder / f"{args.name}.png", "depth of the fact (0 = start)")


if __name__ == "__main__":
    main()
