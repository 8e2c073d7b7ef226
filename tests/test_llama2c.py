"""llama2.c checkpoints load as HF Llama models computing what llama2.c computes, with matching tokenizers."""

from __future__ import annotations

import math
import re
import shutil
from threading import Thread

import numpy as np
import pytest
import torch
from transformers import LlamaTokenizer, TextIteratorStreamer

from lminfinite.models.assets import asset, read_text
from lminfinite.models.llama2c import Llama2cTokenizer, load_llama2c, load_tokenizer

STORIES = asset("models", "stories260K", "stories260K.bin")
AIDREAMS = asset("models", "aidreams260K", "aidreams260K.bin")
pytestmark = pytest.mark.skipif(
    not STORIES.is_file(), reason=f"offline assets not found ({STORIES}); set LMINFINITE_ASSETS"
)
needs_aidreams = pytest.mark.skipif(not AIDREAMS.is_file(), reason=f"aidreams260K not found ({AIDREAMS})")
CORPORA = ["tinystories_train_head.txt", "alice_pg11.txt", "wikitext2_raw_test.raw"]


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(STORIES)


@pytest.fixture(scope="module")
def aidreams():
    return load_llama2c(AIDREAMS)


def snippets(n_chars: int = 4000) -> list[str]:
    """Real text with newlines, unicode and (in the Gutenberg/WikiText files) runs of spaces."""
    out = []
    for name in CORPORA:
        text = read_text(asset("corpora", name))
        out += [text[:n_chars], text[len(text) // 2 : len(text) // 2 + n_chars]]
    return out


def greedy(model, tok, n: int) -> str:
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def test_stories_greedy_from_bos(stories):
    model, tok = stories
    assert isinstance(tok, LlamaTokenizer)
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (5, 4)
    assert model.config.max_position_embeddings == 512 and not model.training
    assert greedy(model, tok, 30).startswith("Once upon a time, there was a little girl named Lily")


def test_hf_tokenizer_matches_sentencepiece(stories):
    import sentencepiece as spm

    tok = stories[1]
    sp = spm.SentencePieceProcessor(model_file=str(STORIES.parent / "tok512.model"))
    edge = [
        "",
        " ",
        "  two  spaces ",
        "a\n\n  b \n",
        "\ttab",
        "café ☃ 日本 e\u0301",
        "<s> literal </s>",
        "x 12345",
    ]
    for text in snippets() + edge:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.encode(text) == [1] + ids
        assert tok.decode(ids) == sp.decode(ids)
    assert sum(len(sp.encode(t)) for t in snippets()) > 5000


def test_llama2c_bpe_matches_sentencepiece():
    """llama2.c's own encoder on tok512.bin gives SentencePiece's ids (on text without extra spaces)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(STORIES.parent / "tok512.model"))
    tok = Llama2cTokenizer.from_file(STORIES.parent / "tok512.bin")
    for text in snippets(1500) + ["café ☃ 日本", "\n x"]:
        text = re.sub(" {2,}", " ", text).strip(" ")
        ids = sp.encode(text)
        assert tok.encode(text) == [1] + ids
        assert tok.decode([1] + ids, skip_special_tokens=True) == sp.decode(ids)
    assert tok.encode("") == [1] and tok.decode([1, 2]) == "<s></s>"


@pytest.mark.parametrize("kind", ["sentencepiece", "llama2c-bin"])
def test_left_padded_batch(stories, kind):
    model, tok = stories
    if kind == "llama2c-bin":
        tok = load_tokenizer(STORIES.parent / "tok512.bin")
    enc = tok(["Lily", "Once upon a time"], return_tensors="pt", padding=True)
    assert enc["input_ids"].tolist() == [[0, 0, 0, 1, 317], [1, 403, 407, 261, 378]]
    assert enc["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert tok("Lily")["input_ids"] == [1, 317]
    assert tok.pad_token_id == 0 and len(tok) == tok.vocab_size == 512
    padded = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, 5:]
    alone = model.generate(**tok("Lily", return_tensors="pt"), max_new_tokens=8, do_sample=False)[0, 2:]
    assert padded.tolist() == alone.tolist()


@needs_aidreams
def test_aidreams_loads_and_writes_text(aidreams):
    model, tok = aidreams
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (4, 4, 512)
    assert c.max_position_embeddings == 128
    assert isinstance(tok, Llama2cTokenizer) and c.tie_word_embeddings
    text = greedy(model, tok, 40)
    assert text.startswith('"Echoes of vectors unfold')
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 15 and text.isascii() and text.isprintable()


@needs_aidreams
def test_streamer_with_llama2c_tokenizer(aidreams):
    model, tok = aidreams
    enc = tok("The dream", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=30, do_sample=False)
    thread = Thread(target=model.generate, kwargs=dict(kwargs, streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    new = model.generate(**kwargs)[0, enc["input_ids"].shape[1] :]
    assert len(streamed) > 40 and streamed == tok.decode(new, skip_special_tokens=True)


def test_bad_files_raise_clear_errors(tmp_path):
    data = STORIES.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated or corrupt.*1056540 bytes, file has 1056440"):
        load_llama2c(tmp_path / "cut.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(ValueError, match="too short"):
        load_llama2c(tmp_path / "tiny.bin")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_llama2c(tmp_path / "missing.bin")
    shutil.copy(STORIES, tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match="no tokenizer beside the checkpoint"):
        load_llama2c(tmp_path / "model.bin")
    model, tok = load_llama2c(tmp_path / "model.bin", tokenizer=STORIES.parent / "tok512.bin", dtype=torch.bfloat16)
    assert isinstance(tok, Llama2cTokenizer) and model.lm_head.weight.dtype == torch.bfloat16


def reference_logits(path, tokens: list[int]) -> torch.Tensor:
    """llama2.c's forward pass (interleaved-pair RoPE from the file's own tables), straight from the .bin."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.fromfile(path, dtype="<i4", count=7).tolist()
    flat, pos = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=28)), 0

    def take(*shape):
        nonlocal pos
        pos += math.prod(shape)
        return flat[pos - math.prod(shape) : pos].reshape(shape)

    hs, kv_dim, L, T = dim // n_heads, n_kv * dim // n_heads, n_layers, len(tokens)
    emb, rms_att = take(abs(vocab), dim), take(L, dim)
    wq, wk, wv, wo = take(L, dim, dim), take(L, kv_dim, dim), take(L, kv_dim, dim), take(L, dim, dim)
    rms_ffn, w1, w2, w3 = take(L, dim), take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    rms_final = take(dim)
    cos, sin = take(seq_len, hs // 2)[:T, None], take(seq_len, hs // 2)[:T, None]
    wcls = emb if vocab > 0 else take(-vocab, dim)
    assert pos == flat.numel()

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(t):  # rotate the pairs (0, 1), (2, 3), ... of each head
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    x = emb[tokens]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(L):
        h = norm(x, rms_att[i])
        q, k = rope((h @ wq[i].T).view(T, n_heads, hs)), rope((h @ wk[i].T).view(T, n_kv, hs))
        v = (h @ wv[i].T).view(T, n_kv, hs)
        k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)  # GQA
        att = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs) + causal).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(T, dim) @ wo[i].T
        h = norm(x, rms_ffn[i])
        x = x + (torch.nn.functional.silu(h @ w1[i].T) * (h @ w3[i].T)) @ w2[i].T
    return norm(x, rms_final) @ wcls.T


@pytest.mark.parametrize("which", ["stories", "aidreams"])
def test_logits_match_llama2c_forward(request, which):
    path = {"stories": STORIES, "aidreams": AIDREAMS}[which]
    if not path.is_file():
        pytest.skip(f"{path} not found")
    model, tok = request.getfixturevalue(which)
    tokens = tok.encode("Once upon a time, a little dog found a big red ball in the park.")[:21]
    assert len(tokens) >= 18
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    want = reference_logits(path, tokens)
    assert got.shape == want.shape == (len(tokens), 512)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert want.std() > 1.0  # real, non-trivial logits
