"""One plain forward of a very long input through stories260K with LM-Infinite: peak memory vs n.

    python benchmarks/long_forward.py [--lengths 8192,16384,32768,65536]

Each length runs in its own process (`model(input_ids)` with `use_cache=False`, no grad); the
peak RSS must grow linearly with n (hidden states and logits), never with n^2.
"""

from __future__ import annotations

import torch
from common import parse_args, peak_rss_mb, reset_peak_rss, run_point, save, stories_model, timed

import lminfinite


def point(length: int) -> dict:
    torch.set_grad_enabled(False)
    model, _ = stories_model()
    lminfinite.enable(model, n_global=10, n_local=512)
    ids = torch.randint(3, 512, (1, length))
    reset_peak_rss()
    base = peak_rss_mb()
    out = {}
    seconds = timed(lambda: out.setdefault("logits", model(input_ids=ids, use_cache=False).logits))
    assert torch.isfinite(out["logits"]).all()
    return {
        "method": "lminfinite",
        "length": length,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base,
        "logits_mb": out["logits"].numel() * 4 / 2**20,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(
        __doc__,
        argv,
        point,
        ("--lengths", {"default": "8192,16384,32768,65536"}),
    )
    if args is None:
        return []
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        row = run_point(__file__, length=n)
        print(
            f"forward {n:6d} tokens {row['seconds']:6.2f} s  peak RSS {row['peak_rss_mb']:6.0f} MB "
            f"(before {row['rss_before_mb']:.0f} MB, logits {row['logits_mb']:.0f} MB)"
        )
        rows.append(row)
    save("long_forward", {"model": "stories260K", "n_global": 10, "n_local": 512}, rows)
    return rows


if __name__ == "__main__":
    main()
