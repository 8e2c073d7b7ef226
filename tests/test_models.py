"""enable() on Llama-style models: batching with left padding, RoPE scaling variants, re-rotation, dtypes,
training (gradients, checkpointing), reconfiguration and bad settings. The invariants every family meets
are in the family matrix (test_families.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import enable_checkpointing, logits, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import lminfinite
from lminfinite.positions import find_rope

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def _scaled_model(kind, dtype=torch.float32):
    params = SCALINGS[kind]
    if params is None:
        return tiny_model("llama", dtype=dtype)
    rope = {"rope_theta": 10000.0, **params}
    max_pos = 128 if "original_max_position_embeddings" in params else 32
    return tiny_model("llama", dtype=dtype, rope_parameters=rope, max_position_embeddings=max_pos)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padded_batch_equals_rows_alone(family):
    model = tiny_model(family)
    lminfinite.enable(model, n_global=3, n_local=16)
    lengths = [100, 71, 5]
    rows = [torch.randint(3, 101, (1, n)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - r.shape[1] :] = r
        mask[b, T - r.shape[1] :] = 1
    batched = logits(model, ids, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for b, r in enumerate(rows):
        alone = logits(model, r)
        torch.testing.assert_close(batched[b, T - r.shape[1] :], alone[0], atol=1e-5, rtol=1e-5)


def test_short_padded_batch_equals_unmodified_rows():
    model = tiny_model("llama")
    rows = [torch.randint(3, 101, (1, n)) for n in (32, 20)]
    ids = torch.zeros(2, 32, dtype=torch.long)
    mask = torch.zeros(2, 32, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 32 - r.shape[1] :], mask[b, 32 - r.shape[1] :] = r, 1
    refs = [logits(model, r)[0] for r in rows]
    lminfinite.enable(model, n_global=4)
    out = logits(model, ids, attention_mask=mask)
    for b, r in enumerate(rows):
        torch.testing.assert_close(out[b, 32 - r.shape[1] :], refs[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rope_scaling_variants(kind):
    model = _scaled_model(kind)
    ids = torch.randint(0, 101, (1, 32))
    ref = logits(model, ids)
    lminfinite.enable(model, n_global=4)
    assert model._lminfinite.config.n_local == 32  # original pretraining length where declared
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)
    long_ids = torch.randint(0, 101, (1, 200))
    lminfinite.enable(model, n_global=4, backend="naive")
    ref_long = logits(model, long_ids)
    lminfinite.enable(model, n_global=4, backend="torch", block_size=9)
    torch.testing.assert_close(logits(model, long_ids), ref_long, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rerotation_matches_model_rotary(kind):
    """Re-rotating a query from position p to D equals the model's own rotary at D (attention
    factors of yarn/llama3 applied once, not twice)."""
    model = _scaled_model(kind)
    rope = find_rope(model.model)
    x = torch.randn(1, 2, 3, 8)
    p, D = torch.tensor([[5, 17, 30]]), 20
    cos_p, sin_p = model.model.rotary_emb(x, p)
    cos_d, sin_d = model.model.rotary_emb(x, torch.full_like(p, D))
    at_p, _ = apply_rotary_pos_emb(x, x, cos_p, sin_p)
    at_d, _ = apply_rotary_pos_emb(x, x, cos_d, sin_d)
    moved = rope.rotate(at_p, *rope.cos_sin(D - p))
    torch.testing.assert_close(moved, at_d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.15), (torch.float16, 2e-2)])
def test_low_precision_models(dtype, atol):
    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(0, 101, (2, 160))
    lminfinite.enable(model, n_global=4, backend="naive")
    ref = logits(model, ids).float()
    lminfinite.enable(model, n_global=4, backend="torch", block_size=11)
    out = logits(model, ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_dynamic_rope_keeps_original_frequencies_beyond_L():
    model = _scaled_model("dynamic")
    original = model.model.rotary_emb.original_inv_freq.clone()
    lminfinite.enable(model, n_global=4)
    logits(model, torch.randint(0, 101, (1, 150)))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, original)


def test_training_mode_backward():
    model = tiny_model("llama").train()
    lminfinite.enable(model, n_global=2, n_local=8)
    ids = torch.randint(0, 101, (2, 50))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_enable_twice_is_idempotent_and_reconfigures():
    model = tiny_model("llama")
    lminfinite.enable(model, n_global=4, n_local=16)
    lminfinite.enable(model, n_global=4, n_local=16)
    assert len(model.model._forward_pre_hooks) == 1
    lminfinite.enable(model, n_global=2, n_local=8)
    assert model._lminfinite.config.n_local == 8
    lminfinite.disable(model)
    lminfinite.disable(model)
    assert len(model.model._forward_pre_hooks) == 0
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "kwargs,error",
    [({"n_global": -1}, "n_global"), ({"n_local": 0}, "n_local"), ({"backend": "tpu"}, "backend")],
)
def test_bad_parameters(kwargs, error):
    with pytest.raises(ValueError, match=error):
        lminfinite.enable(tiny_model("llama"), **kwargs)


def test_window_beyond_pretraining_length_warns_and_bad_types_fail():
    with pytest.warns(UserWarning, match="pretraining length 32"):
        lminfinite.enable(tiny_model("llama"), n_local=64)
    with pytest.raises(TypeError, match="limit_distance"):
        lminfinite.enable(tiny_model("llama"), n_local=16, limit_distance=7.5)


def test_limit_distance_beyond_window_warns():
    with pytest.warns(UserWarning, match="limit_distance"):
        lminfinite.enable(tiny_model("llama"), n_local=16, limit_distance=20)


def test_right_padding_refused():
    model = lminfinite.enable(tiny_model("llama"), n_local=16)
    with pytest.raises(ValueError, match="left padding"):
        logits(model, torch.ones(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """Layers re-run in backward must see their own forward's context, not the latest one."""
    ids = torch.randint(3, 101, (2, 60))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    other = torch.randint(3, 101, (1, 17))

    def grads(checkpointing):
        model = tiny_model("llama").train()
        lminfinite.enable(model, n_global=2, n_local=8)
        if checkpointing:
            enable_checkpointing(model, reentrant)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        model(input_ids=other, use_cache=False)  # a later forward before backward
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(grads(True), grads(False), atol=1e-5, rtol=1e-4)


def test_training_gradients_beyond_the_window_equal_the_naive_kernel():
    """The chunked kernel's gradients (beyond n_local, where its pieces merge) are the naive kernel's; an
    unpadded batch, which inference sends to the fused band path."""
    ids = torch.randint(3, 101, (2, 70))

    def grads(backend):
        model = tiny_model("llama").train()
        lminfinite.enable(model, n_global=2, n_local=8, backend=backend)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(grads("torch"), grads("naive"), atol=1e-5, rtol=1e-4)


def test_a_batch_whose_rows_all_start_with_one_pad_token_equals_naive():
    """Found by the property tests: keys [-1, 0, 1, ...] looked like a gap-free run to the chunked kernel,
    which then attended the padding column on its fused band path."""
    model = tiny_model("llama")
    ids = torch.randint(3, 101, (1, 60))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    lminfinite.enable(model, n_global=3, n_local=16, backend="naive")
    ref = logits(model, ids, attention_mask=mask)
    lminfinite.enable(model, n_global=3, n_local=16)
    torch.testing.assert_close(logits(model, ids, attention_mask=mask)[0, 1:], ref[0, 1:], atol=1e-5, rtol=1e-5)
