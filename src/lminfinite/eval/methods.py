"""The ways to run a model past its pretraining length that the eval suite compares, as objects.

Each method is a `Method` object that knows its name, how to switch a model to it (`enable`, or
the `applied` context manager, once per method for a whole evaluation), whether it runs on a
bounded `LambdaCache` (`cached`), and how to score a window (`score`) and to generate (`tokens`,
and `text` for the generate command). `parse(spec)` turns "vanilla,topk:5:2" into objects once;
every caller then dispatches through them.

- `vanilla`: the unmodified model, full attention over everything (a growing DynamicCache).
- `lminfinite`: Λ-attention, `lminfinite.enable(model, n_global=G, n_local=L)`.
- `sinks`: StreamingLLM-style attention sinks: G starting tokens + a window of L - G recent tokens,
  with positions assigned inside the cache (sink j at position j, the window right after the
  sinks, the newest token at L - 1). Reproduced with `enable(model, n_global=G, n_local=L - G,
  limit_distance=L - 1, sink_positions="own")`: starting key j is seen at distance
  min(L - 1, i) - j. This is StreamingLLM exactly for queries i < L - G (all in the window) and
  i >= L (full cache); for L - G <= i < L StreamingLLM's cache is not full yet and it also sees
  the (fewer than G) tokens between the sinks and the window, which this leaves out.
- `truncate`: each token sees only the latest L tokens, at fresh positions 0..L-1 (no cache:
  the window is recomputed; see `truncate.truncate_nll` for scoring).
- `topk[:K[:FROM]]`: `lminfinite` with the top-k extension: in layers >= FROM (default 0) each
  query also attends its K (default 5) best middle tokens; the cache keeps every token.
- `memory[:K[:BS[:DTYPE[:SCOPE]]]]`: `lminfinite` with block memory (`lminfinite.BlockMemory`): the
  middle is kept in blocks of BS tokens (default 128), and each query chunk or decoded token also attends
  the K (default 8) blocks whose representatives score best, seen at distance D; DTYPE is how the store
  keeps them (float16, float32 or int8; default float16); SCOPE is `shared` (one choice for all heads of
  a layer, the default) or `heads` (one per kv head). `memory` = `memory:8:128:float16:shared`.

`parse_methods`, `applied` and `greedy` keep their string-based signatures for other callers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..api import disable, enable
from ..compat import cache_keyword
from ..decoding import IncrementalDecoder, Sampler, Sampling
from ..memory import STORE_DTYPES, BlockMemory
from ..scoring import prefill
from ..scoring import score as score_ids
from ..streaming import check_finite, stream
from .errors import BadValue
from .truncate import truncate_nll

METHODS = ("vanilla", "lminfinite", "truncate", "sinks", "topk", "memory")
CACHED = ("lminfinite", "sinks", "topk", "memory")  # the methods that run on a LambdaCache
PARAMETERISED = ("topk", "memory")  # the methods whose name may carry settings after a colon
MEMORY_SCOPES = {"shared": True, "heads": False}  # memory's SCOPE field -> BlockMemory.shared

Picker = Callable[[torch.Tensor], torch.Tensor]


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


class Method:
    """One way to run a model (see the module docstring). Subclasses set `kind` and override what differs."""

    kind: str = ""
    cached: bool = True  # runs on a bounded LambdaCache: `text()` streams and samples through `lminfinite.stream`

    def __init__(self, name: str | None = None):
        self.name = name or self.kind

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, Method) and self.setting == other.setting

    def __hash__(self) -> int:
        return hash(self.setting)

    @property
    def setting(self) -> tuple:
        """What makes two methods the same (`topk` and `topk:5:0` are)."""
        return (self.kind,)

    # ------------------------------------------------------------------------------------- switching

    def check(self, n_global: int, n_local: int) -> None:
        """BadValue for sizes this method cannot run with."""
        if n_global < 0 or n_local < 1:
            raise BadValue(f"need n_global >= 0 and n_local >= 1, got {n_global} and {n_local}")

    def enable_kwargs(self, n_global: int, n_local: int) -> dict | None:
        """The arguments of `lminfinite.enable` for this method; None: the unmodified model."""
        return {"n_global": n_global, "n_local": n_local}

    def enable(self, model: nn.Module, n_global: int, n_local: int) -> None:
        """Switch `model` to this method (from whatever it was)."""
        self.check(n_global, n_local)
        disable(model)
        kwargs = self.enable_kwargs(n_global, n_local)
        if kwargs is not None:
            enable(model, **kwargs)

    @contextmanager
    def applied(self, model: nn.Module, n_global: int, n_local: int) -> Iterator[nn.Module]:
        """`model` switched to this method for the `with` block, and always back to the unmodified model after."""
        try:
            self.enable(model, n_global, n_local)
            yield model
        finally:
            disable(model)

    # ---------------------------------------------------------------------------- on a switched model

    def score(self, model: nn.Module, ids: torch.Tensor, n_local: int, chunk_size: int = 4096) -> torch.Tensor:
        """NLL (n - 1,) of a 1D window of `ids` on a model switched to this method."""
        return score_ids(model, ids[None], chunk_size=chunk_size)[0]

    def tokens(
        self,
        model: nn.Module,
        prompt: Sequence[int],
        max_new_tokens: int,
        n_local: int,
        chunk_size: int = 4096,
        pick: Picker = _argmax,
    ) -> Iterator[int]:
        """The continuation of `prompt` (ids, BOS included) on a model switched to this method, token by
        token (`pick`: greedy by default). The prompt minus its last token is prefilled in chunks into a
        cache (a LambdaCache on an enabled model), then one token per forward."""
        prompt = _check_prompt(prompt)
        device = next(model.parameters()).device
        ids = torch.tensor([prompt], device=device)
        cache = prefill(model, ids[:, :-1], chunk_size=chunk_size)
        step = ids[:, -1:]
        cache_kw = cache_keyword(model)  # an unmodified model on transformers 5.19 ignores `cache=`
        for k in range(max_new_tokens):
            with torch.no_grad():  # per forward: a `with` around the `yield` would leak into the caller
                logits = model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[0, -1]
            check_finite(logits, len(prompt) - 1 + k, self.name)
            token = int(pick(logits))
            yield token
            step = torch.tensor([[token]], device=device)

    def text(
        self,
        model: nn.Module,
        tokenizer,
        prompt: str,
        max_new_tokens: int,
        n_local: int,
        chunk_size: int = 4096,
        sampling: dict | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Text pieces continuing `prompt` on a model switched to this method, stopping at EOS;
        `sampling`: `do_sample`, `temperature`, `top_k`, `top_p` as in `lminfinite.stream`."""
        sampling = sampling or {}
        if self.cached:
            return stream(
                model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed, chunk_size=chunk_size, **sampling
            )
        return self._text(model, tokenizer, prompt, max_new_tokens, n_local, chunk_size, sampling, seed)

    def _text(self, model, tokenizer, prompt, max_new_tokens, n_local, chunk_size, sampling, seed) -> Iterator[str]:
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.bos_token_id]
        settings = Sampling(
            do_sample=sampling.get("do_sample", False),
            temperature=sampling.get("temperature", 1.0),
            top_k=sampling.get("top_k"),
            top_p=sampling.get("top_p"),
        )
        pick = Sampler(settings, torch.Generator().manual_seed(seed) if seed is not None else None)
        pieces = IncrementalDecoder(tokenizer, ids)
        for token in self.tokens(model, ids, max_new_tokens, n_local, chunk_size, pick):
            if token == tokenizer.eos_token_id:
                break
            piece = pieces.add(token)
            if piece:
                yield piece
        rest = pieces.flush()
        if rest:
            yield rest


class Vanilla(Method):
    kind = "vanilla"
    cached = False

    def enable_kwargs(self, n_global: int, n_local: int) -> dict | None:
        return None


class LMInfinite(Method):
    kind = "lminfinite"


class Sinks(Method):
    kind = "sinks"

    def check(self, n_global: int, n_local: int) -> None:
        super().check(n_global, n_local)
        if n_local <= n_global:
            raise BadValue(
                f"sinks keeps n_local - n_global recent tokens: need n_local > n_global ({n_local} <= {n_global})"
            )

    def enable_kwargs(self, n_global: int, n_local: int) -> dict | None:
        return {
            "n_global": n_global,
            "n_local": n_local - n_global,
            "limit_distance": n_local - 1,
            "sink_positions": "own",
        }

    def enable(self, model: nn.Module, n_global: int, n_local: int) -> None:
        with warnings.catch_warnings():  # limit_distance > n_local is the point here
            warnings.simplefilter("ignore")
            super().enable(model, n_global, n_local)


class TopK(Method):
    kind = "topk"

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self.k, self.from_layer = top_k_setting(self.name)

    @property
    def setting(self) -> tuple:
        return (self.kind, self.k, self.from_layer)

    def enable_kwargs(self, n_global: int, n_local: int) -> dict | None:
        return {"n_global": n_global, "n_local": n_local, "top_k": self.k, "top_k_from_layer": self.from_layer}


class Memory(Method):
    kind = "memory"

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self.memory = memory_setting(self.name)

    @property
    def setting(self) -> tuple:
        return (self.kind, self.memory)

    def check(self, n_global: int, n_local: int) -> None:
        super().check(n_global, n_local)
        if self.memory.block_size > n_local:
            raise BadValue(
                f"{self.name}: blocks of {self.memory.block_size} tokens need n_local >= {self.memory.block_size} "
                f"(got {n_local})"
            )

    def enable_kwargs(self, n_global: int, n_local: int) -> dict | None:
        return {"n_global": n_global, "n_local": n_local, "memory": self.memory}


class Truncate(Method):
    kind = "truncate"
    cached = False

    def enable_kwargs(self, n_global: int, n_local: int) -> dict | None:
        return None

    def score(self, model: nn.Module, ids: torch.Tensor, n_local: int, chunk_size: int = 4096) -> torch.Tensor:
        return truncate_nll(model, ids, n_local)

    def tokens(
        self,
        model: nn.Module,
        prompt: Sequence[int],
        max_new_tokens: int,
        n_local: int,
        chunk_size: int = 4096,
        pick: Picker = _argmax,
    ) -> Iterator[int]:
        """Every step reruns the model on the latest `n_local` ids only."""
        seq = list(_check_prompt(prompt))
        device = next(model.parameters()).device
        for _ in range(max_new_tokens):
            ids = torch.tensor([seq[-n_local:]], device=device)
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
            check_finite(logits, len(seq) - 1, self.name)
            seq.append(int(pick(logits)))
            yield seq[-1]


KINDS: dict[str, type[Method]] = {cls.kind: cls for cls in (Vanilla, LMInfinite, Truncate, Sinks, TopK, Memory)}


def _check_prompt(prompt: Sequence[int]) -> list[int]:
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise BadValue("generation needs a prompt of at least one token")
    return prompt


def base(method: str | Method) -> str:
    """The method's name without its parameters: "topk:8:2" -> "topk"."""
    return method.kind if isinstance(method, Method) else method.split(":", 1)[0]


def top_k_setting(method: str) -> tuple[int, int]:
    """(k, first layer) of a `topk[:K[:FROM]]` method (defaults 5 and 0)."""
    parts = method.split(":")[1:]
    numbers = [int(p) for p in parts if p.isdigit()]
    if base(method) != "topk" or len(parts) > 2 or len(numbers) != len(parts) or numbers[:1] == [0]:
        raise BadValue(f"invalid method {method!r}: write topk, topk:K or topk:K:FROM_LAYER with K >= 1")
    k, first = (numbers + [5, 0][len(numbers) :])[:2]
    return k, first


def memory_setting(method: str) -> BlockMemory:
    """The BlockMemory of a `memory[:K[:BS[:DTYPE[:SCOPE]]]]` method (defaults: those of `BlockMemory`: 8, 128,
    float16, shared)."""
    parts = method.split(":")[1:]
    usage = f"invalid method {method!r}: write memory, memory:K, memory:K:BS, memory:K:BS:DTYPE or "
    usage += f"memory:K:BS:DTYPE:SCOPE (K, BS >= 1, DTYPE one of {', '.join(STORE_DTYPES)}, SCOPE one of "
    usage += f"{', '.join(MEMORY_SCOPES)}), e.g. memory:16:128:int8 or memory:8:128:float16:heads"
    numbers, dtype, scope = parts[:2], parts[2:3], parts[3:]
    if base(method) != "memory" or len(parts) > 4 or not all(p.isdigit() and int(p) > 0 for p in numbers):
        raise BadValue(usage)
    if (dtype and dtype[0] not in STORE_DTYPES) or (scope and scope[0] not in MEMORY_SCOPES):
        raise BadValue(usage)
    given: dict = dict(zip(("blocks", "block_size"), (int(p) for p in numbers), strict=False))
    if dtype:
        given["dtype"] = dtype[0]
    if scope:
        given["shared"] = MEMORY_SCOPES[scope[0]]
    try:
        return BlockMemory(**given)
    except (TypeError, ValueError) as e:
        raise BadValue(f"invalid method {method!r}: {e}") from None


def get(method: str | Method) -> Method:
    """The Method object for a name such as "sinks" or "topk:8:2" (a Method is returned as is)."""
    if isinstance(method, Method):
        return method
    name = method.strip()
    kind = KINDS.get(base(name))
    if kind is None or (":" in name and kind.kind not in PARAMETERISED):
        raise BadValue(f"invalid method {name!r}; choose from {', '.join(METHODS)}")
    return kind(name)


def parse(spec: str) -> list[Method]:
    """`"vanilla,topk:8"` -> `[Vanilla, TopK(8, 0)]`, parsed once; unknown or repeated methods are errors
    (`topk` and `topk:5:0` are the same method)."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if base(m) not in KINDS or (":" in m and base(m) not in PARAMETERISED)]
    if bad or not names:
        raise BadValue(f"invalid method(s) {', '.join(bad) or repr(spec)}; choose from {', '.join(METHODS)}")
    methods = [get(m) for m in names]
    if len(set(methods)) != len(methods):
        raise BadValue(f"method listed twice in {spec!r}")
    return methods


def parse_methods(spec: str) -> list[str]:
    """`"vanilla,lminfinite"` -> `["vanilla", "lminfinite"]` (the names of `parse(spec)`)."""
    return [m.name for m in parse(spec)]


def check_window(method: str | Method, n_global: int, n_local: int) -> None:
    """BadValue for sizes `method` cannot run with."""
    get(method).check(n_global, n_local)


@contextmanager
def applied(model: nn.Module, method: str | Method, n_global: int, n_local: int) -> Iterator[nn.Module]:
    """Switch `model` to `method` for the `with` block, and always back to the unmodified model after."""
    with get(method).applied(model, n_global, n_local) as m:
        yield m


def greedy(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    method: str | Method,
    n_global: int,
    n_local: int,
    chunk_size: int = 4096,
) -> list[int]:
    """Greedy continuation of `prompt` (ids, BOS included) by `method`: the new ids (switches the model
    for this one call; evaluations switch once per method and call `Method.tokens`)."""
    method = get(method)
    _check_prompt(prompt)
    with method.applied(model, n_global, n_local):
        return list(method.tokens(model, prompt, max_new_tokens, n_local, chunk_size))
