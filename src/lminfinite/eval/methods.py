"""The four ways to run a model past its pretraining length that the eval suite compares.

- `vanilla`: the unmodified model, full attention over everything.
- `lminfinite`: Λ-attention, `lminfinite.enable(model, n_global=G, n_local=L)`.
- `sinks`: StreamingLLM-style attention sinks: G starting tokens + a window of L - G recent tokens,
  with positions assigned inside the cache (sink j at position j, the window right after the
  sinks, the newest token at L - 1). Reproduced with `enable(model, n_global=G, n_local=L - G,
  limit_distance=L - 1, sink_positions="own")`: starting key j is seen at distance
  min(L - 1, i) - j. This is StreamingLLM exactly for queries i < L - G (all in the window) and
  i >= L (full cache); for L - G <= i < L StreamingLLM's cache is not full yet and it also sees
  the (fewer than G) tokens between the sinks and the window, which this leaves out.
- `truncate`: each token sees only the latest L tokens, at fresh positions 0..L-1 (no cache:
  the window is recomputed; see `perplexity.truncate_nll` for scoring).
- `topk[:K[:FROM]]`: `lminfinite` with the top-k extension: in layers >= FROM (default 0) each
  query also attends its K (default 5) best middle tokens; the cache keeps every token.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..api import disable, enable
from ..scoring import prefill

METHODS = ("vanilla", "lminfinite", "truncate", "sinks", "topk")
CACHED = ("lminfinite", "sinks", "topk")  # the methods that run on a LambdaCache


def base(method: str) -> str:
    """The method's name without its parameters: "topk:8:2" -> "topk"."""
    return method.split(":", 1)[0]


def top_k_setting(method: str) -> tuple[int, int]:
    """(k, first layer) of a `topk[:K[:FROM]]` method (defaults 5 and 0)."""
    parts = method.split(":")[1:]
    numbers = [int(p) for p in parts if p.isdigit()]
    if base(method) != "topk" or len(parts) > 2 or len(numbers) != len(parts) or numbers[:1] == [0]:
        raise ValueError(f"invalid method {method!r}: write topk, topk:K or topk:K:FROM_LAYER with K >= 1")
    k, first = (numbers + [5, 0][len(numbers) :])[:2]
    return k, first


def _setting(method: str):
    return (base(method), top_k_setting(method)) if base(method) == "topk" else method


def parse_methods(spec: str) -> list[str]:
    """`"vanilla,lminfinite"` -> `["vanilla", "lminfinite"]`; unknown or repeated methods are errors
    (`topk` and `topk:5:0` are the same method)."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if base(m) not in METHODS or (":" in m and base(m) != "topk")]
    if bad or not names:
        raise ValueError(f"invalid method(s) {', '.join(bad) or repr(spec)}; choose from {', '.join(METHODS)}")
    settings = [_setting(m) for m in names]
    if len(set(settings)) != len(settings):
        raise ValueError(f"method listed twice in {spec!r}")
    return names


def check_window(method: str, n_global: int, n_local: int) -> None:
    if n_global < 0 or n_local < 1:
        raise ValueError(f"need n_global >= 0 and n_local >= 1, got {n_global} and {n_local}")
    if method == "sinks" and n_local <= n_global:
        raise ValueError(
            f"sinks keeps n_local - n_global recent tokens: need n_local > n_global ({n_local} <= {n_global})"
        )


@contextmanager
def applied(model: nn.Module, method: str, n_global: int, n_local: int) -> Iterator[nn.Module]:
    """Switch `model` to `method` for the `with` block, and always back to the unmodified model after."""
    check_window(method, n_global, n_local)
    disable(model)
    try:
        if method == "lminfinite":
            enable(model, n_global=n_global, n_local=n_local)
        elif base(method) == "topk":
            k, first = top_k_setting(method)
            enable(model, n_global=n_global, n_local=n_local, top_k=k, top_k_from_layer=first)
        elif method == "sinks":
            with warnings.catch_warnings():  # limit_distance > n_local is the point here
                warnings.simplefilter("ignore")
                enable(
                    model,
                    n_global=n_global,
                    n_local=n_local - n_global,
                    limit_distance=n_local - 1,
                    sink_positions="own",
                )
        elif method not in ("vanilla", "truncate"):
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        yield model
    finally:
        disable(model)


def greedy(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    method: str,
    n_global: int,
    n_local: int,
    chunk_size: int = 4096,
) -> list[int]:
    """Greedy continuation of `prompt` (ids, BOS included) by `method`: the new ids.

    vanilla / lminfinite / sinks / topk: the prompt minus its last token is prefilled in chunks into a
    cache (a LambdaCache for the two Λ methods), then one token per forward. truncate: every step
    reruns the model on the latest `n_local` ids only.
    """
    if not prompt:
        raise ValueError("greedy() needs a prompt of at least one token")
    device = next(model.parameters()).device
    out: list[int] = []
    with applied(model, method, n_global, n_local), torch.no_grad():
        if method == "truncate":
            for _ in range(max_new_tokens):
                ids = torch.tensor([(prompt + out)[-n_local:]], device=device)
                out.append(int(model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].argmax()))
            return out
        ids = torch.tensor([prompt], device=device)
        cache = prefill(model, ids[:, :-1], chunk_size=chunk_size)
        step = ids[:, -1:]
        for _ in range(max_new_tokens):
            logits = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1).logits
            out.append(int(logits[0, -1].argmax()))
            step = torch.tensor([[out[-1]]], device=device)
    return out
