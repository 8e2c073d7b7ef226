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


def read_text(path: str | os.PathLike) -> str:
    """Read a text corpus as the assets README says: utf-8-sig, CRLF normalised to LF."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")
