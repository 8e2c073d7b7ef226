"""The README's Python examples run as written, in order, in one namespace (on stories260K)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lminfinite

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(stories_path, monkeypatch, capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for path in re.findall(r'"(\.\./shared/[^"]+)"', text):
        if not (README.parent / path).exists():
            pytest.skip(f"the README's example path {path} is not here")
    monkeypatch.chdir(README.parent)  # the examples use paths relative to the project root
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    model = namespace["model"]
    assert lminfinite.is_enabled(model) and model._lminfinite.config.top_k == 5
    assert namespace["nll"].shape == (1, namespace["long_ids"].shape[1] - 1)
    assert torch.isfinite(namespace["nll"]).all()
    assert len(capsys.readouterr().out) > 20  # the decoded continuation and the stream were printed
