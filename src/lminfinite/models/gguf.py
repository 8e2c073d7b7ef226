"""GGUF models: loaded through transformers' own GGUF support, dequantized once, cached by content.

`load_gguf(path)` checks the file (exists, GGUF magic, readable header and tensor table, an
architecture transformers can load), then looks for a cached copy keyed by the sha256 of the
file's bytes (computed in streaming fashion on every load, so a changed file is never served stale,
whatever its name, size or mtime). On a miss, transformers dequantizes the file
(`from_pretrained(folder, gguf_file=name)`: ~20 s for a 135M model) and the result -- weights as
safetensors, config, generation config, tokenizer with its chat template -- is written to a
temporary folder and renamed into place, so an interrupted first load never leaves a broken entry.
Later loads read the safetensors (seconds).

Cache folder: `$LMINFINITE_CACHE`, else `$XDG_CACHE_HOME/lminfinite`, else `~/.cache/lminfinite`;
entries live in `gguf/<sha256>/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"
ENTRY_MARKER = "lminfinite-gguf.json"  # written last: an entry without it is incomplete
STALE_TMP_SECONDS = 24 * 3600  # temporary folders older than this (a killed first load) are removed

# How many times this process dequantized a GGUF file (a cache hit does not): tests read it.
dequantized = 0


def cache_dir() -> Path:
    """The lminfinite cache folder: `$LMINFINITE_CACHE`, else `$XDG_CACHE_HOME/lminfinite`, else ~/.cache."""
    env = os.environ.get("LMINFINITE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lminfinite"


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(path: str | os.PathLike) -> str:
    """Validate a GGUF file without loading its weights; returns its architecture (e.g. 'llama').

    Raises FileNotFoundError (missing) or ValueError (empty, not GGUF, truncated or corrupt, or an
    architecture transformers cannot load), each saying which file and why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a GGUF model")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file starts with b'GGUF')")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("loading .gguf files needs the `gguf` package: pip install 'lminfinite[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("no general.architecture field")
        arch = str(field.contents())
        if not reader.tensors:
            raise ValueError("no tensors")
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"{path} is a truncated or corrupt GGUF file ({size} bytes; reading it failed: {reason})"
        ) from None
    if end > size:
        raise ValueError(f"{path} is a truncated GGUF file: its tensors need {end} bytes, the file has {size}")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two are not models
    if arch not in supported:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported by transformers' GGUF loader "
            f"(supported: {', '.join(supported)})"
        )
    return arch


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, cache: str | os.PathLike | None = None):
    """(model in eval mode, tokenizer) from a GGUF file, through the content-keyed cache.

    `cache`: the cache folder (default `cache_dir()`). The tokenizer pads on the left and has a pad
    token; its chat template is the one stored in the GGUF file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    entry = root / "gguf" / file_sha256(path)
    if not (entry / ENTRY_MARKER).is_file():
        check_gguf(path)
        _build_entry(path, entry)
    return _load_entry(entry, dtype)


def cached_entry(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path | None:
    """The complete cache folder of a GGUF file's current content, or None when it is not cached."""
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    entry = root / "gguf" / file_sha256(path)
    return entry if (entry / ENTRY_MARKER).is_file() else None


def _build_entry(path: Path, entry: Path) -> None:
    """Dequantize `path` with transformers and write the cache entry atomically (temp folder + rename)."""
    global dequantized
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = entry.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the GGUF cache folder {parent} ({e.strerror}); set LMINFINITE_CACHE") from None
    _remove_stale_tmp(parent)
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path}: transformers could not load this GGUF file ({reason})") from None
    dequantized += 1
    # The weights are plain float tensors now; the GGUF "quantizer" only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name[:16]}-", dir=parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "source": str(path),
            "sha256": entry.name,
            "bytes": path.stat().st_size,
            "dequantize_seconds": round(time.perf_counter() - start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / ENTRY_MARKER).write_text(json.dumps(info, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is as readable as the rest of the cache
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / ENTRY_MARKER).is_file():  # not a concurrent writer's complete entry
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for tmp in parent.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _load_entry(entry: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(entry), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
