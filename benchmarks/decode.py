"""Decode: time per generated token vs context length (L to 64L), vanilla vs lminfinite (vs topk).

lminfinite: the context goes through `lminfinite.prefill` (a LambdaCache), then tokens are decoded
one by one. topk: the same with the top-k extension (k=5 from layer 0), whose cache keeps every
token (the price of the extension: memory and time grow with the context). vanilla: a
DynamicCache holding `context` keys/values per layer, filled with random values (decode time does
not depend on them, and a vanilla prefill of 64L is O(n^2)), then the same decoding loop.
Random-weight Llama of realistic width.

    python benchmarks/decode.py [--n-local 256] [--steps 32] [--methods lminfinite,topk,vanilla]
"""

from __future__ import annotations

import torch
from common import parse_args, peak_rss_mb, realistic_model, report, run_point, timed
from transformers import DynamicCache

import lminfinite
from lminfinite.compat import cache_keyword


def _vanilla_cache(model, context: int) -> DynamicCache:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        kv = torch.randn(1, cfg.num_key_value_heads, context, head_dim)
        cache.update(kv, kv.clone(), layer)
    return cache


def point(method: str, n_local: int, context: int, steps: int) -> dict:
    torch.set_grad_enabled(False)
    model = realistic_model(n_local)
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    if method in ("lminfinite", "topk"):
        lminfinite.enable(model, n_global=10, n_local=n_local, top_k=5 if method == "topk" else 0)
        cache = lminfinite.prefill(model, ids, chunk_size=n_local)
    else:
        cache = _vanilla_cache(model, context)
    token = ids[:, -1:]

    def decode(k):
        nonlocal token
        for _ in range(k):
            logits = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache}).logits
            token = logits[:, -1:].argmax(-1)

    decode(4)  # warm-up
    seconds = timed(lambda: decode(steps))
    return {
        "method": method,
        "context": context,
        "mult": context // n_local,
        "ms_per_token": 1e3 * seconds / steps,
        "cache_mb": sum(t.numel() * 4 for layer in cache.layers for t in (layer.keys, layer.values)) / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv=None) -> list[dict]:
    args = parse_args(
        __doc__,
        argv,
        point,
        ("--n-local", {"type": int, "default": 256}),
        ("--steps", {"type": int, "default": 32}),
        ("--mults", {"default": "1,8,64"}),
        ("--methods", {"default": "lminfinite,topk,vanilla"}),
    )
    if args is None:
        return []
    rows = []
    for method in args.methods.split(","):
        for m in (int(x) for x in args.mults.split(",")):
            row = run_point(__file__, method=method, n_local=args.n_local, context=m * args.n_local, steps=args.steps)
            print(f"decode {method:10s} {m:3d}L {row['ms_per_token']:7.2f} ms/token  cache {row['cache_mb']:7.1f} MB")
            rows.append(row)
    report("decode", args.n_local, {"steps": args.steps}, rows, ("cache_mb", "KV cache (MB)"), "context length / L")
    return rows


if __name__ == "__main__":
    main()
