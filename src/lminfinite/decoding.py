"""From logits to text: the one sampler, the one incremental detokenizer, the end-of-turn tokens.

Every generating caller uses these: `stream()`, the evaluation methods, the chat and the server.

- `Sampling` (the settings, checked once) and `Sampler` (picks the next token): greedy, or a sample
  under temperature, top-k and top-p, applied by transformers' own logits warpers in that order (as
  `generate()` does). The logits are shifted by their maximum and scaled in float64 before the
  warpers, so every finite temperature > 0 is safe: one so small that every other token's probability
  underflows (1e-39, 5e-324) is greedy (ties aside), never an inf or NaN fed to `torch.multinomial`.
- `IncrementalDecoder`: the text of generated ids as it reads after a context (the prompt's last ids),
  one piece per token, decoding a short sliding window (O(1) per token); a piece that ends inside a
  multi-byte character waits for the next token, and `flush()` gives what is left at the end.
- `END_OF_TURN` and `stop_token_ids()`: the tokens that end an answer (EOS and the end-of-turn markers
  a chat template writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# End-of-turn markers of common chat templates (ChatML, Llama 3, Phi, Gemma, GPT-style, and `<|eot|>`):
# a stop token when the model's chat template writes it.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eot|>")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """ValueError unless `temperature` is a finite number > 0, `top_k` None or an int >= 0 (0 and None:
    off) and `top_p` None or a number in (0, 1]."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k (sampling) must be an int >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):  # NaN fails the comparison
        raise ValueError(f"top_p must be a number in (0, 1] (None: off), got {top_p!r}")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (`do_sample=False`), or sampled with `temperature` (a finite
    number > 0), `top_k` (None or 0: off) and `top_p` (None or 1: off). Checked on creation (ValueError)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)

    @classmethod
    def from_temperature(cls, temperature: float, top_p: float | None = None) -> Sampling:
        """The OpenAI convention: temperature 0 is greedy, else sampling at that temperature; `top_p` 0 keeps
        only the most likely token (greedy too), 1 or None keeps all."""
        if temperature == 0 or top_p == 0:
            return cls()
        return cls(do_sample=True, temperature=temperature, top_p=top_p)


class Sampler:
    """Picks the next token from logits under `sampling`, drawing from `generator` (None: torch's global one)."""

    def __init__(self, sampling: Sampling, generator: torch.Generator | None = None):
        self.sampling, self.generator = sampling, generator
        warpers = LogitsProcessorList()
        if sampling.do_sample:
            if sampling.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(float(sampling.temperature)))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p is not None and sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        self.warpers = warpers

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The token ids (shape `logits.shape[:-1]`, on the logits' device) for `logits` (..., vocab)."""
        if not self.sampling.do_sample:
            return logits.argmax(-1)
        shape, vocab = logits.shape[:-1], logits.shape[-1]
        scores = logits.detach().reshape(-1, vocab).to(torch.float64)
        # Shifted so that the best token scores 0: dividing by any temperature > 0 then gives scores <= 0
        # (-inf at worst), whose softmax is finite; float64 holds temperatures down to 5e-324.
        scores = scores - scores.max(-1, keepdim=True).values
        scores = self.warpers(None, scores)  # type: ignore[arg-type]  # these warpers read the scores only
        probs = scores.softmax(-1).cpu()
        picked = torch.multinomial(probs, 1, generator=self.generator)
        return picked.reshape(shape).to(logits.device)


def pick_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token from `logits` (..., vocab): argmax, or a sample under temperature / top-k / top-p
    (`Sampler(Sampling(...), generator)` once per generation avoids re-checking the settings per token)."""
    return Sampler(Sampling(do_sample, temperature, top_k, top_p), generator)(logits)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDecoder:
    """Text of generated ids as it reads after `context` (the prompt's last ids; [] for the text of the
    generated ids alone), one piece per token. Special tokens are skipped.

    Decodes a short sliding window (as vLLM does), so each token costs O(1); a piece that ends inside a
    multi-byte character (U+FFFD) waits for the next token; `flush()` returns what is still held back (an
    incomplete character then reads as U+FFFD). `text` is every piece returned so far.
    """

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = [int(t) for t in context[-6:]]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = _decode(self.tokenizer, self.ids[self.prefix_offset : self.read_offset])
        full = _decode(self.tokenizer, self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        piece = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += piece
        return piece


def stop_token_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's EOS, the generation config's `eos_token_id` (an int or a
    list), and the `END_OF_TURN` markers that the tokenizer's chat template writes."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if isinstance(v, int))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        vocab = tokenizer.get_vocab()
        ids.update(vocab[marker] for marker in END_OF_TURN if marker in template and marker in vocab)
    return ids
