"""lminfinite.decoding: the one sampler (tiny temperatures are greedy, top-k / top-p keep what they should,
sampled frequencies follow the softmax), the end-of-turn tokens, and that every generating tool uses these."""

from __future__ import annotations

import math

import pytest
import torch

from lminfinite.decoding import (
    END_OF_TURN,
    IncrementalDecoder,
    Sampler,
    Sampling,
    check_sampling,
    pick_token,
    stop_token_ids,
)


def _logits(rows: int = 4, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, 1e-300, 1e-30])
def test_tiny_temperatures_are_greedy(temperature):
    """A temperature too small for float32 (1e-39 is subnormal, 5e-324 rounds to 0) picks the argmax, with or
    without top-k / top-p, never an inf or NaN fed to torch.multinomial."""
    logits = _logits()
    for top_k, top_p in [(None, None), (5, None), (None, 0.9), (3, 0.5)]:
        sampler = Sampler(Sampling(True, temperature, top_k, top_p), torch.Generator().manual_seed(1))
        for _ in range(3):
            assert torch.equal(sampler(logits), logits.argmax(-1))
    assert int(pick_token(logits[0], True, temperature)) == int(logits[0].argmax())
    half = logits[0].half()  # float16 logits too
    assert int(pick_token(half, True, temperature)) == int(half.argmax())


def test_openai_convention_temperature_zero_and_top_p_zero_are_greedy():
    assert not Sampling.from_temperature(0.0).do_sample
    assert not Sampling.from_temperature(0.7, 0.0).do_sample
    s = Sampling.from_temperature(0.7, 0.9)
    assert (s.do_sample, s.temperature, s.top_p) == (True, 0.7, 0.9)
    with pytest.raises(ValueError):
        Sampling(True, float("nan"))


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    top2 = {int(Sampler(Sampling(True, 5.0, top_k=2), g)(logits)) for _ in range(200)}
    assert top2 == {0, 1}  # a high temperature spreads the mass, top-k 2 keeps two
    # top-p: the smallest set whose mass reaches p (here the first three tokens)
    p = float(probs[:2].sum()) + 0.01
    assert p < float(probs[:3].sum())
    kept = {int(Sampler(Sampling(True, 1.0, top_p=p), g)(logits)) for _ in range(400)}
    assert kept == {0, 1, 2}


def test_sampled_frequencies_follow_the_tempered_softmax():
    """2000 draws: each token's frequency within 4 standard errors of softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    T, n = 0.8, 2000
    sampler = Sampler(Sampling(True, T), torch.Generator().manual_seed(3))
    counts = torch.bincount(sampler(logits.expand(n, -1)), minlength=5).double()
    expected = (logits.double() / T).softmax(-1)
    se = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 4 * se).all(), (counts / n, expected)


def test_seeded_sampling_repeats_and_greedy_ignores_the_generator():
    logits = _logits(rows=1, seed=5)[0]
    draws = [Sampler(Sampling(True, 1.2), torch.Generator().manual_seed(9))(logits.expand(50, -1)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and len(set(draws[0].tolist())) > 1
    assert int(Sampler(Sampling())(logits)) == int(logits.argmax())


def test_check_sampling_rules():
    for bad in [dict(temperature=0.0), dict(temperature=math.inf), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            check_sampling(**bad)
    check_sampling(temperature=5e-324, top_k=0, top_p=1.0)


class _Tok:
    """A tokenizer with a chat template that writes `<|eot|>` (and a vocabulary holding every marker)."""

    eos_token_id = 2
    chat_template = "{% for m in messages %}{{ m.content }}<|eot|>{% endfor %}"

    def get_vocab(self):
        return {marker: 100 + i for i, marker in enumerate(END_OF_TURN)}


class _Model:
    class generation_config:
        eos_token_id = [2, 7]


def test_stop_ids_are_eos_and_the_markers_the_template_writes():
    assert stop_token_ids(_Model(), _Tok()) == {2, 7, 100 + END_OF_TURN.index("<|eot|>")}
    tok = _Tok()
    tok.chat_template = None
    assert stop_token_ids(_Model(), tok) == {2, 7}


def test_every_tool_uses_the_one_sampler_detokenizer_and_end_of_turn_list():
    """No tool keeps a copy: the chat, the server and the evaluation import these from lminfinite.decoding."""
    import lminfinite.chat.conversation as chat
    import lminfinite.eval.methods as methods
    import lminfinite.serve.scheduler as scheduler
    import lminfinite.streaming as streaming

    for module in (chat, scheduler, methods, streaming):
        assert module.IncrementalDecoder is IncrementalDecoder and module.Sampler is Sampler, module.__name__
    assert chat.stop_token_ids is scheduler.stop_token_ids is stop_token_ids
    for module in (chat, scheduler, methods, streaming):
        source = open(module.__file__, encoding="utf-8").read()
        assert "multinomial" not in source and '"<|eot_id|>"' not in source, module.__name__
