"""`load_model()`: one name for every model the CLI and the eval suite accept.

- a llama2.c `.bin` checkpoint (its tokenizer beside it) -> `lminfinite.load_llama2c`;
- `stories260K` -> the bundled asset, else `karpathy/tinyllamas` on the HuggingFace hub;
- a hub name or a local folder -> `AutoModelForCausalLM` + `AutoTokenizer` (left padding).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .assets import asset

STORIES = "stories260K"
STORIES_REPO = "karpathy/tinyllamas"
STORIES_FILES = ("stories260K/stories260K.bin", "stories260K/tok512.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode on `device`, tokenizer) for a llama2.c `.bin`, `stories260K`, a hub name or folder."""
    torch_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    if name_or_path == STORIES:
        model, tokenizer = _load_llama2c(stories260k_path(), torch_dtype)
    elif Path(name_or_path).expanduser().is_file():
        model, tokenizer = _load_llama2c(Path(name_or_path).expanduser(), torch_dtype)
    else:
        model, tokenizer = _load_transformers(name_or_path, torch_dtype)
    return model.to(device).eval(), tokenizer


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; anything else is checked by torch."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def stories260k_path() -> Path:
    """The stories260K checkpoint: the bundled asset, else downloaded from the hub (with its tokenizer)."""
    bundled = asset("models", STORIES, "stories260K.bin")
    if bundled.is_file():
        return bundled
    try:
        from huggingface_hub import hf_hub_download

        paths = [Path(hf_hub_download(STORIES_REPO, name)) for name in STORIES_FILES]
    except Exception as e:
        raise FileNotFoundError(
            f"stories260K is not at {bundled} and could not be downloaded from {STORIES_REPO} "
            f"({type(e).__name__}); set LMINFINITE_ASSETS to a folder holding models/stories260K/, or download "
            f"{' and '.join(STORIES_FILES)} from https://huggingface.co/{STORIES_REPO} into one folder by hand "
            "and pass --model path/to/stories260K.bin"
        ) from None
    return paths[0]


def _load_llama2c(path: Path, dtype: torch.dtype):
    from .llama2c import load_llama2c

    if path.suffix != ".bin":
        raise ValueError(
            f"{path} is a file but not a llama2.c .bin checkpoint; give a .bin, a model folder or a hub name"
        )
    return load_llama2c(path, dtype=dtype)


def _load_transformers(name: str, dtype: torch.dtype):
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is a folder without config.json: not a transformers model folder")
    elif name.endswith(".bin") or not _HUB_ID.match(name):
        raise FileNotFoundError(f"unknown model {name!r}: no such file or folder, and not a HuggingFace hub name")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"unknown model {name!r}: not a local file or folder, and the HuggingFace hub could not provide it "
            f"({first})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
