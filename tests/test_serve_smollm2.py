"""The server with a real chat model: SmolLM2-135M-Instruct (the bundled GGUF, ChatML template).

The prompt is the model's own chat template (the ids equal `apply_chat_template(tokenize=True)`), greedy
answers equal `generate()` over the rendered conversation, and every turn after the first continues its
session by token prefix although the template writes `<|im_end|>\\n` after each answer (the end-of-turn token
the model generated is the one the next rendering holds), past a small window (L=64).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
import torch

import lminfinite
from lminfinite.models.assets import asset
from lminfinite.serve.config import ServeConfig
from lminfinite.serve.metrics import parse_metrics
from lminfinite.serve.runner import ServerThread
from lminfinite.serve.templates import chat_prompt

SMOLLM2_GGUF = asset("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
CACHE = Path(tempfile.gettempdir()) / "lminfinite-test-cache"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason=f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}"),
]
G, L = 4, 64


def load():
    pytest.importorskip("gguf")
    from lminfinite.models.gguf import load_gguf

    model, tokenizer = load_gguf(SMOLLM2_GGUF, cache=CACHE)
    lminfinite.enable(model, n_global=G, n_local=L)
    return model, tokenizer


def test_smollm2_chat_template_greedy_answers_and_session_reuse():
    from openai import OpenAI

    model, tok = load()
    server_model, server_tok = load()
    from lminfinite.serve.app import create_app

    app = create_app(server_model, server_tok, ServeConfig(model_name="smollm2", max_tokens_cap=64))
    with ServerThread(app) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        history = [{"role": "system", "content": "You are a concise assistant."}]
        consumed = None
        for turn, question in enumerate(["What is the capital of France?", "And of Italy?", "Name a red fruit."]):
            history.append({"role": "user", "content": question})
            ids = chat_prompt(tok, history).ids
            assert ids == tok.apply_chat_template(history, add_generation_prompt=True, return_dict=True)["input_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
            new = out[0, len(ids) :].tolist()
            r = client.chat.completions.create(model="smollm2", messages=history, max_tokens=12, temperature=0)
            text = r.choices[0].message.content
            kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert text == tok.decode(ids + new, **kw)[len(tok.decode(ids, **kw)) :]
            assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(new)
            if consumed is not None:
                assert r.usage.prompt_tokens_details.cached_tokens == consumed
            consumed = r.usage.prompt_tokens + r.usage.completion_tokens - 1
            history.append({"role": "assistant", "content": text})
            if turn == 0:
                assert "Paris" in text and new[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        m = parse_metrics(httpx.get(f"{srv.url}/metrics").text)
        assert m['lminfinite_session_lookups_total{result="token_prefix"}'] == 2
        assert consumed > L  # the window was passed
