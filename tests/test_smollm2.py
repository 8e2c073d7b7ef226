"""SmolLM2-135M-Instruct (the bundled GGUF), a real chat model: LM-Infinite equals the unmodified model
inside the window, Chat's greedy answers equal `generate()` on the same rendered prompt, the tokens
Chat feeds equal the chat template's rendering of the whole conversation, turns past the window equal
a naive recomputation, and `lminfinite chat` answers through stdin.

One model is loaded per session (through the GGUF cache in a folder under the temp dir, so only the
very first run dequantizes); each test disables LM-Infinite again when done.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import lminfinite
from lminfinite.chat import Chat
from lminfinite.models.assets import asset, read_text

SMOLLM2_GGUF = asset("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
SESSION_CACHE = Path(tempfile.gettempdir()) / "lminfinite-test-cache"
# A 135M model on a small CPU: every test here is slow (the first run also dequantizes the GGUF once, ~20 s).
pytestmark = [
    pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason=f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}"),
    pytest.mark.slow,
]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def smollm2_loaded():
    pytest.importorskip("gguf")
    from lminfinite.models.gguf import load_gguf

    return load_gguf(SMOLLM2_GGUF, cache=SESSION_CACHE)


@pytest.fixture
def smollm2(smollm2_loaded):
    model, tokenizer = smollm2_loaded
    lminfinite.disable(model)
    yield model, tokenizer
    lminfinite.disable(model)


def _generate(model, tokenizer, messages, max_new_tokens: int) -> list[int]:
    """The unmodified model's greedy answer to the rendered conversation, end-of-turn token included."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    was_enabled = lminfinite.is_enabled(model)
    config = model._lminfinite.config if was_enabled else None
    lminfinite.disable(model)
    out = model.generate(ids["input_ids"], max_new_tokens=max_new_tokens, do_sample=False)
    if was_enabled:
        lminfinite.enable(model, n_global=config.n_global, n_local=config.n_local)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def _rendered_ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_loaded_gguf_is_the_chat_model(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.max_position_embeddings == 8192 and model.config.num_hidden_layers == 30
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.padding_side == "left"
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"


@pytest.mark.parametrize("n_local", [8192, 320])
def test_logits_equal_the_unmodified_model_inside_the_window(smollm2, n_local):
    model, tokenizer = smollm2
    text = read_text(asset("corpora", "alice_pg11.txt"))[:4000]
    ids = torch.tensor([tokenizer.encode(text)[:320]])
    assert ids.shape[1] == 320
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        # the chat's path: prefill in chunks through a cache, then a forward of the rest
        ref_cache = lminfinite.prefill(model, ids[:, :200], chunk_size=64)  # unmodified: a DynamicCache
        ref_tail = model(input_ids=ids[:, 200:], cache=ref_cache, use_cache=True).logits
        lminfinite.enable(model, n_global=10, n_local=n_local)
        out = model(input_ids=ids).logits
        cache = lminfinite.prefill(model, ids[:, :200], chunk_size=64)  # a LambdaCache
        tail = model(input_ids=ids[:, 200:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # through the cache the Λ kernel's pieces are merged by log-sum-exp: float32 rounding of ~1e-4 on logits ~20
    torch.testing.assert_close(tail, ref_tail, atol=2e-4, rtol=0)


def test_chat_greedy_answers_equal_generate_over_two_turns(smollm2):
    model, tokenizer = smollm2
    chat = Chat(model, tokenizer, n_global=10, n_local=8192, max_new_tokens=40, record=True)
    answer = "".join(chat.send(QUESTION))
    assert answer == "The capital of France is Paris."
    messages = [{"role": "user", "content": QUESTION}]
    prompt = _rendered_ids(tokenizer, messages)
    assert chat.tokens[: len(prompt)] == prompt
    reference = _generate(model, tokenizer, messages, 40)
    assert tokenizer.convert_ids_to_tokens(reference[-1]) == "<|im_end|>"
    assert chat.tokens[len(prompt) :] + [chat._unfed] == reference  # answer + end-of-turn token
    assert answer == tokenizer.decode(reference[:-1])

    second = "And of Italy?"
    answer2 = "".join(chat.send(second))
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": second}]
    prompt2 = _rendered_ids(tokenizer, messages)
    assert chat.tokens[: len(prompt2)] == prompt2  # exactly the template's rendering of the whole conversation
    reference2 = _generate(model, tokenizer, messages, 40)
    chat.flush()
    assert chat.tokens[len(prompt2) :] == reference2
    assert "Rome" in answer2
    stats = chat.stats()
    assert stats["turns"] == 2 and stats["tokens_seen"] == len(prompt2) + len(reference2)
    assert stats["cache_columns"] == stats["tokens_seen"] and stats["last_ended"]


def test_stopped_answer_is_closed_and_the_conversation_goes_on(smollm2):
    model, tokenizer = smollm2
    chat = Chat(model, tokenizer, n_local=8192, max_new_tokens=60, record=True, system="You are a helpful assistant.")
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(chat.send("Tell me a long story about a dragon.")):
            if i == 3:
                raise KeyboardInterrupt
    cut = chat.stats() and chat.answer
    assert cut and not chat.last_turn["ended"]
    follow = "Summarize it in one word."
    answer = "".join(chat.send(follow))
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me a long story about a dragon."},
        {"role": "assistant", "content": cut},
        {"role": "user", "content": follow},
    ]
    prompt = _rendered_ids(tokenizer, messages)
    # the cut answer closed with <|im_end|> and a newline, as the template renders it
    assert tokenizer.decode(chat.tokens[: len(prompt)]) == tokenizer.decode(prompt)
    assert answer
    reference = _generate(model, tokenizer, messages, 60)
    chat.flush()
    assert chat.tokens[len(chat.tokens) - chat.last_turn["answer_tokens"] :] == reference


def test_chat_past_a_small_window_equals_naive_recomputation(smollm2):
    """Three turns with L=32: the answers chosen through the bounded cache are the naive kernel's picks."""
    model, tokenizer = smollm2
    G, L = 4, 32
    chat = Chat(model, tokenizer, n_global=G, n_local=L, max_new_tokens=24, record=True)
    spans = []
    for text in [QUESTION, "And what is its most famous tower?", "How tall is it?"]:
        start = len(chat.tokens)
        list(chat.send(text))
        chat.flush()
        assert chat.stats()["cache_columns"] <= G + L
        spans.append((start + chat.last_turn["prompt_tokens"], len(chat.tokens)))
    assert chat.tokens_seen > 3 * L
    lminfinite.enable(model, n_global=G, n_local=L, backend="naive")
    with torch.no_grad():
        picks = model(input_ids=torch.tensor([chat.tokens]), use_cache=False).logits[0].argmax(-1)
    for a, b in spans:
        assert torch.equal(picks[a - 1 : b - 1], torch.tensor(chat.tokens[a:b]))


def test_chat_command_through_stdin():
    script = f"{QUESTION}\n/stats\n/reset\n/stats\n"
    env = {**os.environ, "LMINFINITE_CACHE": str(SESSION_CACHE), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "lminfinite.cli", "chat", "--model", "smollm2", "--max-new-tokens", "30"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "The capital of France is Paris."
    assert lines[1].startswith("turns 1, tokens seen 44, cache 44 columns") and "G=10 L=8192" in lines[1]
    assert lines[2].startswith("turns 0, tokens seen 0, cache 0 columns")
    assert "smollm2: G=10 L=8192, chat template" in run.stderr and "(conversation reset)" in run.stderr
