"""Kernel: microseconds per query of one Λ-attention call (16 heads, d=128, L=1024, 8L queries).

The chunked torch kernel on its fused band path with RoPE inputs, with ALiBi biases, and (for
comparison) with ALiBi on the masked path it takes elsewhere; plus the top-k extension (k=5).
Random inputs: the time does not depend on the values.

    python benchmarks/kernel.py [--n-local 1024] [--mult 8] [--repeats 3]
"""

from __future__ import annotations

import torch
from common import parse_args, run_point, save, timed

from lminfinite.kernels import get_kernel, torch_chunked
from lminfinite.kernels.common import Far, Middle
from lminfinite.kernels.score_mod import ScoreMod
from lminfinite.positions import Alibi

HEADS, DIM, G = 16, 128, 10


def point(variant: str, n_local: int, mult: int, repeats: int) -> dict:
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    n = mult * n_local
    q, k, v, qg = (torch.randn(1, HEADS, n, DIM) for _ in range(4))
    idx = torch.arange(n)[None]
    alibi = None
    if variant.startswith("alibi"):
        alibi = Alibi(2.0 ** -torch.arange(1, HEADS + 1, dtype=torch.float32), n_local)
    kw = dict(n_global=G, n_local=n_local, mod=ScoreMod(DIM**-0.5, alibi=alibi))
    if variant == "alibi_masked":
        torch_chunked._FUSED = None  # this process only
    middle = Middle(k, v, idx, 5) if variant == "topk" else None
    far = Far(qg, k[:, :, :G], v[:, :, :G], idx[:, :G], middle=middle)
    kernel = get_kernel("torch")

    def call():
        kernel(q, k, v, idx, idx, far, **kw)

    call()  # warm-up
    seconds = min(timed(call) for _ in range(repeats))
    return {"variant": variant, "n_local": n_local, "queries": n, "us_per_query": 1e6 * seconds / n}


def main(argv=None) -> list[dict]:
    args = parse_args(
        __doc__,
        argv,
        point,
        ("--n-local", {"type": int, "default": 1024}),
        ("--mult", {"type": int, "default": 8}),
        ("--repeats", {"type": int, "default": 3}),
    )
    if args is None:
        return []
    rows = []
    for variant in ("rope_band", "alibi_band", "alibi_masked", "topk"):
        row = run_point(__file__, variant=variant, n_local=args.n_local, mult=args.mult, repeats=args.repeats)
        print(f"kernel {variant:13s} {row['us_per_query']:8.1f} us/query")
        rows.append(row)
    save("kernel", {"heads": HEADS, "head_dim": DIM, "n_global": G, "mult": args.mult}, rows)
    return rows


if __name__ == "__main__":
    main()
