"""The lm-eval model type "lminfinite": the harness's own HF model class (`HFLM`) on a model switched to
LM-Infinite or to one of the baselines, with no truncation of long inputs.

What differs from the harness's "hf" model:

- `pretrained`: anything `lminfinite.models.load_model` takes (`stories260K`, `smollm2`, a llama2.c `.bin`, a
  `.gguf` file, a hub name, a model folder) or an already-loaded model (then pass `tokenizer=`, and
  `model_name=` for the name the results and the offline tasks know it by).
- The method (`lminfinite`, `topk[:K[:FROM]]`, `memory[:K[:BS[:DTYPE[:SCOPE]]]]`, `sinks`, `vanilla`, `truncate`) is
  switched on once, when the model is built, with `n_global`, `n_local`, `limit_distance`, `top_k`,
  `top_k_from_layer` and `backend` (the attention kernel: auto, torch, naive, flex).
- `max_length` is unbounded unless given: the harness never left-truncates a context.
- `loglikelihood`: a request whose input fits in one forward of `chunk_size` tokens goes through HFLM's own
  batched code; a longer one is prefilled through the cache in chunks (`lminfinite.prefill`) and only its
  continuation's logits are computed, `chunk_size` at a time. Requests sharing a context share one prefill.
- `loglikelihood_rolling`: one `lminfinite.score()` per document (chunked, bounded memory: no windows).
- `generate_until`: HFLM's request handling; the context minus its last token is prefilled in chunks and
  `generate()` continues from that cache.
- `truncate` has no cache: each token sees only the latest `n_local` tokens (loglikelihood: the request cut to
  its last `n_local` inputs, rolling: `eval.perplexity.truncate_nll`'s strided windows, generation: greedy,
  every step a forward of the latest `n_local` ids, as `lminfinite passkey` does).
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ...api import config_of, disable, enable
from ...compat import cache_keyword
from ...config import pretraining_length
from ...eval import methods as eval_methods
from ...eval.errors import BadValue
from ...scoring import prefill

log = logging.getLogger(__name__)

UNBOUNDED = sys.maxsize // 4  # `max_length` when none is given: the harness's left truncation never triggers
KERNEL_BACKENDS = ("auto", "torch", "naive", "flex")
HF_BACKENDS = ("default", "causal")  # HFLM's meaning of `backend`: accepted, kernel "auto"

# Tokenizers of the live "lminfinite" models, by the `pretrained` name they were built from: the offline
# tasks size their prompts in tokens with the model's own tokenizer (see tasks/__init__.py).
_TOKENIZERS: dict[str, Any] = {}
_LAST: list[Any] = []


def live_tokenizer(name: str | None = None):
    """The tokenizer of the "lminfinite" model built from `name` (the latest one built when `name` is None)."""
    if name is not None:
        return _TOKENIZERS.get(name)
    return _LAST[-1] if _LAST else None


def _int_arg(name: str, value, low: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    try:
        number = int(value)
        exact = number == float(value)
    except (TypeError, ValueError):
        exact = False
    if isinstance(value, bool) or not exact or number < low:
        raise BadValue(f"lminfinite model arg {name}={value!r}: need an integer >= {low}")
    return number


@register_model("lminfinite")
class LMInfiniteLM(HFLM):
    """HFLM on a model switched to an LM-Infinite method; see the module docstring for what differs."""

    def __init__(
        self,
        pretrained: Any = "stories260K",
        method: str = "lminfinite",
        n_global: int = 10,
        n_local: int | None = None,
        limit_distance: int | None = None,
        top_k: int | None = None,
        top_k_from_layer: int | None = None,
        backend: str = "auto",
        chunk_size: int = 4096,
        tokenizer: Any = None,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_length: int | None = None,
        model_name: str | None = None,
        **kwargs,
    ) -> None:
        methods = eval_methods.parse(str(method))
        if len(methods) != 1:
            raise BadValue(f"lminfinite model arg method={method!r}: give one method")
        self._method = methods[0]
        backend = str(backend)
        if backend == "seq2seq":
            raise BadValue("lminfinite runs decoder-only (causal) models; backend=seq2seq is not supported")
        if backend in HF_BACKENDS:
            backend = "auto"
        if backend not in KERNEL_BACKENDS:
            raise BadValue(f"lminfinite model arg backend={backend!r}: choose one of {', '.join(KERNEL_BACKENDS)}")
        if str(batch_size).startswith("auto"):
            raise BadValue("lminfinite: batch_size=auto is not supported (contexts are unbounded); give a number")
        n_global = _int_arg("n_global", n_global, 0)
        n_local = _int_arg("n_local", n_local, 1, optional=True)
        limit_distance = _int_arg("limit_distance", limit_distance, 1, optional=True)
        top_k = _int_arg("top_k", top_k, 0, optional=True)
        top_k_from_layer = _int_arg("top_k_from_layer", top_k_from_layer, 0, optional=True)
        chunk_size = _int_arg("chunk_size", chunk_size, 1)
        max_length = _int_arg("max_length", max_length, 1, optional=True)

        if isinstance(pretrained, str):
            from ...models import load_model

            model, own_tokenizer = load_model(pretrained, device=device, dtype="float32" if dtype == "auto" else dtype)
            tokenizer = own_tokenizer if tokenizer is None else tokenizer
            name = pretrained
        else:
            model = pretrained
            name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            if tokenizer is None:
                raise BadValue("lminfinite: pass tokenizer= along with an already-loaded model")
        super().__init__(
            pretrained=model,
            tokenizer=tokenizer,
            backend="causal",
            batch_size=batch_size,
            max_length=max_length,
            **kwargs,
        )
        self.pretrained = name  # what get_model_info and the results JSON report, never a model object
        self.method = self._method.name
        self.n_global = n_global
        self.n_local = n_local if n_local is not None else pretraining_length(self.model.config)
        self.chunk_size = chunk_size
        self.settings = self._switch(limit_distance, top_k, top_k_from_layer, backend)
        _TOKENIZERS[name] = self.tokenizer
        _LAST.append(self.tokenizer)
        del _LAST[:-1]

    # ------------------------------------------------------------------------------------------- the method

    def _switch(self, limit_distance, top_k, top_k_from_layer, backend) -> dict:
        """Switch the model to the method once (`eval.methods.Method`); returns the settings in force."""
        model, method = self.model, self._method
        method.check(self.n_global, self.n_local)
        settings = {"method": method.name, "n_global": self.n_global, "n_local": self.n_local}
        if method.kind in ("lminfinite", "topk", "memory"):
            kwargs = method.enable_kwargs(self.n_global, self.n_local)
            if method.kind == "memory" and (top_k or top_k_from_layer is not None):
                raise BadValue(f"method={method.name} chooses blocks, not tokens: it takes no top_k/top_k_from_layer")
            if method.kind == "topk":
                explicit = method.name.count(":")
                if (explicit >= 1 and top_k not in (None, method.k)) or (
                    explicit >= 2 and top_k_from_layer not in (None, method.from_layer)
                ):
                    raise BadValue(
                        f"method={method.name} already sets top_k={method.k}, top_k_from_layer={method.from_layer}"
                    )
            if top_k:
                kwargs["top_k"] = top_k
            if top_k_from_layer is not None:
                kwargs["top_k_from_layer"] = top_k_from_layer
            kwargs.update(limit_distance=limit_distance, backend=backend)
            disable(model)
            enable(model, **kwargs)
            settings.update(
                limit_distance=config_of(model).distance,
                backend=backend,
                top_k=kwargs.get("top_k", 0),
                top_k_from_layer=kwargs.get("top_k_from_layer", 0),
            )
            if method.kind == "memory":
                memory = kwargs["memory"]
                settings.update(
                    memory={
                        "blocks": memory.blocks,
                        "block_size": memory.block_size,
                        "dtype": memory.dtype,
                        "shared": memory.shared,
                    }
                )
            return settings
        given = {"limit_distance": limit_distance, "top_k": top_k or None, "top_k_from_layer": top_k_from_layer}
        given = {k: v for k, v in given.items() if v is not None}
        if backend != "auto":
            given["backend"] = backend
        if given:
            raise BadValue(f"method={method.name} does not take {', '.join(f'{k}={v}' for k, v in given.items())}")
        method.enable(model, self.n_global, self.n_local)  # vanilla and truncate: the unmodified model
        return settings

    @property
    def max_length(self) -> int:
        return self._max_length or UNBOUNDED

    def get_model_info(self) -> dict:
        """Parameters, dtype and the method's settings (no hub lookup: `pretrained` may be a local name)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_revision": None,
            "model_sha": "",
            "lminfinite": dict(self.settings, chunk_size=self.chunk_size),
        }

    # ------------------------------------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.method == "truncate":
            requests = [self._last_window(r) for r in requests]
        short, long = [], []
        for i, (_, ctx, cont) in enumerate(requests):
            n_inputs = min(len(ctx) + len(cont), self.max_length + 1) - 1
            (short if n_inputs <= self.chunk_size else long).append(i)
        results: list[Any] = [None] * len(requests)
        if short:
            done = super()._loglikelihood_tokens([requests[i] for i in short], disable_tqdm, override_bs)
            for i, answer in zip(short, done, strict=True):
                results[i] = answer
        if long:
            for i, answer in self._chunked_loglikelihoods([(i, requests[i]) for i in long], disable_tqdm):
                results[i] = answer
        return results

    def _last_window(self, request):
        """truncate: the request cut to its last `n_local` inputs (the continuation sees only recent tokens)."""
        key, ctx, cont = request
        if len(ctx) + len(cont) - 1 <= self.n_local:
            return request
        if len(cont) > self.n_local:
            raise BadValue(
                f"method truncate: a continuation of {len(cont)} tokens is longer than n_local={self.n_local}"
            )
        return key, ctx[-(self.n_local + 1 - len(cont)) :], cont

    def _chunked_loglikelihoods(self, indexed, disable_tqdm: bool):
        """(index, (logprob, is_greedy)) of long requests: each distinct context prefilled once through the
        cache, then the continuation scored `chunk_size` tokens at a time (only those logits exist)."""
        groups: dict[tuple[int, ...], list] = {}
        for i, (key, ctx, cont) in indexed:
            seq = (ctx + cont)[-(self.max_length + 1) :]
            if len(seq) < len(ctx) + len(cont):
                log.warning(
                    "lminfinite: max_length=%d cuts %d tokens from the left",
                    self.max_length,
                    len(ctx) + len(cont) - len(seq),
                )
            head = tuple(seq[: len(seq) - 1 - len(cont)])
            groups.setdefault(head, []).append((i, key, seq[len(head) : -1], cont))
        bar = tqdm(total=len(indexed), disable=disable_tqdm or self.rank != 0, desc="lminfinite long loglikelihoods")
        for head in sorted(groups, key=len, reverse=True):
            members = groups[head]
            cache = prefill(self.model, torch.tensor([head], dtype=torch.long), chunk_size=self.chunk_size)
            for n, (i, key, inputs, cont) in enumerate(members):
                mine = cache if n == len(members) - 1 else copy.deepcopy(cache)
                answer = self._score_continuation(mine, inputs, cont)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
                yield i, answer
        bar.close()

    def _score_continuation(self, cache, inputs: list[int], cont: list[int]) -> tuple[float, bool]:
        total, greedy = 0.0, True
        with torch.no_grad():
            for s in range(0, len(inputs), self.chunk_size):
                ids = torch.tensor([inputs[s : s + self.chunk_size]], dtype=torch.long, device=self.device)
                logits = self.model(input_ids=ids, use_cache=True, **{cache_keyword(self.model): cache}).logits[0]
                logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                target = torch.tensor(cont[s : s + self.chunk_size], dtype=torch.long, device=logp.device)
                total += float(logp.gather(-1, target[:, None]).sum())
                greedy = greedy and bool((logp.argmax(-1) == target).all())
        return total, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document: every token scored after all of the document before it, through
        `lminfinite.score()` (truncate: `truncate_nll`'s strided windows of `n_local`). No truncation."""
        out = []
        for (string,) in tqdm(
            [r.args for r in requests], disable=disable_tqdm or self.rank != 0, desc="lminfinite rolling"
        ):
            ids = torch.tensor([[self.prefix_token_id] + self.tok_encode(string)], dtype=torch.long)
            nll = self._method.score(self.model, ids[0], self.n_local, self.chunk_size)
            total = -float(nll.double().sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------------------------------- generation

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        if self.method == "truncate":
            return self._truncate_generate(context, mask, max_length, stop, generation_kwargs)
        if context.shape[1] > 1:
            generation_kwargs[cache_keyword(self.model)] = prefill(
                self.model,
                context[:, :-1],
                attention_mask=None if mask is None else mask[:, :-1],
                chunk_size=self.chunk_size,
            )
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _truncate_generate(self, context, mask, max_length: int, stop: list[str], kwargs: dict):
        """Greedy decoding where every step is a forward of the latest `n_local` ids (no cache)."""
        if kwargs.get("do_sample"):
            raise BadValue("method truncate decodes greedily: do_sample=True is not supported")
        n_new = max(0, max_length - context.shape[1])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        out = torch.full((context.shape[0], context.shape[1] + n_new), pad, dtype=context.dtype, device=context.device)
        out[:, : context.shape[1]] = context
        stops = [s for s in stop if s]
        for row in range(context.shape[0]):
            ids = context[row][mask[row].bool()].tolist() if mask is not None else context[row].tolist()
            new: list[int] = []
            for token in self._method.tokens(self.model, ids, n_new, self.n_local, self.chunk_size):
                new.append(token)
                if token == self.eot_token_id or any(s in self.tok_decode(new) for s in stops):
                    break
            out[row, context.shape[1] : context.shape[1] + len(new)] = torch.tensor(new, dtype=context.dtype)
        return out
