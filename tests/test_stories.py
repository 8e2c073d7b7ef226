"""The paper's central result on a real pretrained model (stories260K, 512-token context)."""

from __future__ import annotations

import pytest
import torch

import lminfinite
from lminfinite.models.assets import asset, read_text


def _windows(tok, n_windows=4, length=4096):
    text = read_text(asset("corpora", "tinystories_train_head.txt"))
    ids = tok(text[: 60 * n_windows * length // 10], return_tensors="pt")["input_ids"][0]
    assert ids.numel() >= n_windows * length
    return ids[: n_windows * length].view(n_windows, length)


def _nll(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


@pytest.mark.slow
def test_nll_stays_flat_far_beyond_the_training_length(stories):
    model, tok = stories
    ids = _windows(tok)
    vanilla = _nll(model, ids)
    lminfinite.enable(model, n_global=10, n_local=512)
    try:
        lam = _nll(model, ids)
    finally:
        lminfinite.disable(model)
    near, far = slice(0, 511), slice(2047, 4095)  # NLL of tokens 1-511 and 2048-4095
    assert 1.2 < lam[:, near].mean() < 1.6
    # identical inside the window: nothing changes for n <= L
    torch.testing.assert_close(lam[:, near], vanilla[:, near], atol=1e-4, rtol=0)
    # LM-Infinite: within 5% of the in-window NLL; vanilla: several times higher
    assert abs(lam[:, far].mean() / lam[:, near].mean() - 1) < 0.05
    assert vanilla[:, far].mean() > 3 * lam[:, near].mean()


@pytest.mark.slow
def test_score_in_chunks_equals_one_forward_on_real_text(stories):
    model, tok = stories
    ids = _windows(tok, n_windows=1, length=3000)
    lminfinite.enable(model, n_global=10, n_local=512)
    try:
        ref = _nll(model, ids)
        nll = lminfinite.score(model, ids, chunk_size=700)
    finally:
        lminfinite.disable(model)
    torch.testing.assert_close(nll, ref, atol=1e-4, rtol=1e-4)
