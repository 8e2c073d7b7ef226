"""Progress bars for long evaluations (tqdm on stderr)."""

from __future__ import annotations


def progress_bar(total: int, desc: str, unit: str, progress: bool | None = None):
    """A tqdm bar; `progress=None` shows it on a terminal only, True/False force it on/off."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress is None else not progress)
