"""Prefill: time per token and peak memory vs input length (L to 64L), vanilla vs lminfinite.

Both methods feed the input through `lminfinite.prefill` in chunks of L tokens: vanilla keeps a
growing DynamicCache and full attention, lminfinite a LambdaCache. Random-weight Llama of realistic
width (speed does not depend on the weights).

    python benchmarks/prefill.py [--n-local 256] [--max-mult 64] [--vanilla-max-mult 16] [--family mpt]

`--family mpt`: the same for an ALiBi model (MPT of the same width), results in `prefill_mpt.json`.
"""

from __future__ import annotations

import torch
from common import parse_args, peak_rss_mb, realistic_model, report, reset_peak_rss, run_point, timed

import lminfinite


def point(method: str, n_local: int, length: int, family: str = "llama") -> dict:
    torch.set_grad_enabled(False)
    model = realistic_model(n_local, family, table=length)
    if method == "lminfinite":
        lminfinite.enable(model, n_global=10, n_local=n_local)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    lminfinite.prefill(model, ids[:, :n_local], chunk_size=n_local)  # warm-up
    reset_peak_rss()
    base = peak_rss_mb()
    seconds = timed(lambda: lminfinite.prefill(model, ids, chunk_size=n_local))
    return {
        "method": method,
        "length": length,
        "mult": length // n_local,
        "seconds": seconds,
        "ms_per_token": 1e3 * seconds / length,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(
        __doc__,
        argv,
        point,
        ("--n-local", {"type": int, "default": 256}),
        ("--max-mult", {"type": int, "default": 64}),
        ("--vanilla-max-mult", {"type": int, "default": 16}),
        ("--family", {"choices": ["llama", "mpt"], "default": "llama"}),
    )
    if args is None:
        return []
    rows = []
    mults = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= args.max_mult]
    for method, top in (("lminfinite", args.max_mult), ("vanilla", args.vanilla_max_mult)):
        for m in (m for m in mults if m <= top):
            row = run_point(__file__, method=method, n_local=args.n_local, length=m * args.n_local, family=args.family)
            print(f"prefill {method:10s} {m:3d}L {row['ms_per_token']:7.3f} ms/token", end="  ")
            print(f"peak {row['peak_rss_mb']:7.0f} MB")
            rows.append(row)
    report(
        "prefill" if args.family == "llama" else f"prefill_{args.family}",
        args.n_local,
        {"chunk_size": args.n_local},
        rows,
        ("peak_rss_mb", "peak RSS (MB)"),
        "input length / L",
        args.family,
    )
    return rows


if __name__ == "__main__":
    main()
