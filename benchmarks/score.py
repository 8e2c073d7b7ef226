"""Scoring: throughput and memory of `lminfinite.score()` on stories260K with real text.

1. Throughput: score() over N tokens of real text (one stream, LambdaCache, G=10, L=512) vs the
   unmodified model scoring the same text as a batch of independent 512-token windows (the same
   attention work per token: the ratio is the distance to the limit).
2. Memory and flatness: peak RSS and NLL of score() on 50k and 500k tokens of tiny Shakespeare.

    python benchmarks/score.py [--tokens 200000] [--long 500000] [--short 50000]
"""

from __future__ import annotations

import torch
from common import parse_args, peak_rss_mb, reset_peak_rss, run_point, save, timed

import lminfinite
from lminfinite.models.assets import asset, read_text


def _tokens(tok, corpus: str, n: int) -> torch.Tensor:
    text = read_text(asset("corpora", corpus))
    ids = torch.tensor(tok.encode(text[: 8 * n], add_special_tokens=True))
    if ids.numel() < n:
        raise SystemExit(f"{corpus} has only {ids.numel()} tokens, {n} asked")
    return ids[:n][None]


def point(kind: str, corpus: str, tokens: int, chunk: int = 4096) -> dict:
    from lminfinite.models import load_model

    torch.set_grad_enabled(False)
    model, tok = load_model("stories260K")
    ids = _tokens(tok, corpus, tokens)
    warm = ids[:, :2048]  # first calls pay one-off costs: warm both methods up
    if kind == "vanilla_windows":
        model(input_ids=warm.view(4, 512), use_cache=False)
    else:
        lminfinite.enable(model, n_global=10, n_local=512)
        lminfinite.score(model, warm, chunk_size=chunk)
    reset_peak_rss()
    base = peak_rss_mb()
    if kind == "vanilla_windows":
        windows = ids[0, : tokens // 512 * 512].view(-1, 512)

        def run():
            for batch in windows.split(64):
                logits = model(input_ids=batch, use_cache=False).logits
                torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:])

        seconds = timed(run)
        nll = None
    else:
        out = {}
        seconds = timed(lambda: out.setdefault("nll", lminfinite.score(model, ids, chunk_size=chunk)))
        nll = out["nll"][0]
    row = {
        "kind": kind,
        "corpus": corpus,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base,
    }
    if nll is not None:
        n = nll.numel()
        row["nll_by_segment"] = [round(float(s.mean()), 4) for s in nll[: n // 10 * 10].view(10, -1)]
        row["nll_first_512"] = round(float(nll[:511].mean()), 4)
    return row


def main(argv=None) -> list[dict]:
    args = parse_args(
        __doc__,
        argv,
        point,
        ("--tokens", {"type": int, "default": 200_000}),
        ("--short", {"type": int, "default": 50_000}),
        ("--long", {"type": int, "default": 500_000}),
    )
    if args is None:
        return []
    rows = []
    for kind, corpus, n in (
        ("lminfinite_score", "tinystories_train_head.txt", min(args.tokens, 100_000)),
        ("vanilla_windows", "tinystories_train_head.txt", min(args.tokens, 100_000)),
        ("lminfinite_score", "tinyshakespeare_input.txt", args.tokens),
        ("vanilla_windows", "tinyshakespeare_input.txt", args.tokens),
        ("lminfinite_score", "tinyshakespeare_input.txt", args.short),
        ("lminfinite_score", "tinyshakespeare_input.txt", args.long),
    ):
        row = run_point(__file__, kind=kind, corpus=corpus, tokens=n)
        print(
            f"score {kind:17s} {corpus:28s} {n:7d} tok {row['tokens_per_s']:8.0f} tok/s "
            f"peak {row['peak_rss_mb']:6.0f} MB {row.get('nll_by_segment', '')}"
        )
        rows.append(row)
    save("score", {"model": "stories260K", "n_global": 10, "n_local": 512, "chunk_size": 4096}, rows)
    return rows


if __name__ == "__main__":
    main()
