"""Shared fixtures: the real assets (stories260K); helpers for tests are in helpers.py.

Tests run torch on one thread unless LMINFINITE_TEST_THREADS says otherwise: their tensors are tiny, and
on a busy 2-core machine a second thread's spin-waits made a 3-row decode step 100x slower.
"""

from __future__ import annotations

import os

import pytest
import torch

from lminfinite.models.assets import asset

torch.set_num_threads(int(os.environ.get("LMINFINITE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def stories_path():
    path = asset("models", "stories260K", "stories260K.bin")
    if not path.exists():
        pytest.skip(f"stories260K not found at {path} (set LMINFINITE_ASSETS)")
    return path


@pytest.fixture(scope="session")
def stories(stories_path):
    from lminfinite.models.llama2c import load_llama2c

    return load_llama2c(stories_path)


@pytest.fixture(autouse=True)
def _stories_left_as_found(request):
    """A test that used the shared stories260K model leaves it unmodified, whatever it did or how it ended."""
    yield
    if "stories" in request.fixturenames:
        import lminfinite

        lminfinite.disable(request.getfixturevalue("stories")[0])


@pytest.fixture
def lambda_stories(stories):
    """stories260K enabled with LM-Infinite (G=10, L=512) for one test, disabled afterwards even if it fails."""
    import lminfinite

    model, tok = stories
    lminfinite.enable(model, n_global=10, n_local=512)
    try:
        yield model, tok
    finally:
        lminfinite.disable(model)
