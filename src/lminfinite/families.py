"""One table of model families: how LM-Infinite applies to each transformers `model_type`, or why not.

Each entry of `FAMILIES` says how a family encodes positions and what `enable()` needs to know:

- `rope`: rotary positions, applied inside attention modules that route through transformers'
  AttentionInterface; `interleaved` when the rotary pairs dimensions (2i, 2i+1) (GPT-J, CodeGen,
  Cohere) rather than (i, i + d/2) (rotate_half: Llama and most others). Where the installed transformers
  computes a RoPE family's attention in the attention modules themselves (GPT-J and CodeGen on 5.19),
  `family_of` marks it `own_attention` and enable() routes it (`compat.py`); a RoPE family of the table whose
  modules bypass the AttentionInterface otherwise is refused, never run unmodified;
- `alibi`: ALiBi biases added by the model's own attention code, routed by an `alibi.Adapter`;
- `absolute`: absolute position embeddings: refused (the distance cap means nothing there);
- `refused`: a relative-position family whose attention the Λ kernels do not reproduce, with the reason.

Adding a family is one entry here and a tiny config in `tests/test_families.py` (the invariants run on
every entry of its matrix). A model type not in the table is tried by looking: it is accepted when each
attention module's forward looks its attention function up in transformers' AttentionInterface
(`ALL_ATTENTION_FUNCTIONS` in its source) and a rotary embedding is found.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import transformers
from torch import nn

from . import alibi, compat
from .positions import Rope, find_rope


@dataclass(frozen=True)
class Family:
    """How LM-Infinite applies to one model family (see the module docstring)."""

    positions: str  # "rope", "alibi", "absolute" or "refused"
    interleaved: bool = False  # rotary pairs dimensions (2i, 2i+1)
    alibi: alibi.Adapter | None = None  # ALiBi families: the adapter of their attention modules
    reason: str = ""  # refused families: why
    # The decoder's layers drop the forward's keyword arguments before calling attention, so the plan
    # goes through the mask (`attention.NAME_VIA_MASK`); always so for ALiBi adapters.
    drops_kwargs: bool = False
    # The installed transformers computes this family's attention inside each attention module (GPT-J and
    # CodeGen on transformers 5.19: `compat.py`), routed to the AttentionInterface by `enable()`; set by
    # `family_of` from the model, never in the table. Their blocks drop keyword arguments too.
    own_attention: bool = False

    def __post_init__(self) -> None:
        if self.positions not in ("rope", "alibi", "absolute", "refused"):
            raise ValueError(f"unknown positions kind {self.positions!r}")
        if (self.positions == "alibi") != (self.alibi is not None):
            raise ValueError("an ALiBi family needs its adapter, and only ALiBi families have one")
        if (self.positions == "refused") != bool(self.reason):
            raise ValueError("a refused family needs its reason, and only refused families have one")
        if self.own_attention and self.positions != "rope":
            raise ValueError("only a RoPE family is routed from its own attention code (compat.py)")
        if self.alibi is not None or self.own_attention:
            object.__setattr__(self, "drops_kwargs", True)


ROPE = Family("rope")
INTERLEAVED = Family("rope", interleaved=True)
ABSOLUTE = Family("absolute")
_MLA = "its multi-head latent attention rotates the trailing dimensions of each head, not the leading ones"
_LLAMA4 = "its complex-valued RoPE, chunked attention and NoPE temperature tuning are not handled"

FAMILIES: dict[str, Family] = {
    # RoPE through the AttentionInterface (each tested in tests/test_families.py or test_models.py)
    "llama": ROPE,
    "mistral": ROPE,
    "qwen2": ROPE,
    "qwen3": ROPE,
    "olmo2": ROPE,
    "phi3": ROPE,  # LongRoPE held at its short factors (positions.py)
    "gemma2": ROPE,  # logit softcapping
    "gemma3_text": ROPE,  # per-layer-type RoPE frequencies
    "gpt_neox": ROPE,  # partial rotary
    "stablelm": Family("rope", drops_kwargs=True),  # its decoder layers call attention without **kwargs
    "phi": ROPE,
    "smollm3": ROPE,  # layers without RoPE keep the Λ mask
    "gptj": INTERLEAVED,  # a sin/cos table sized by n_positions (grown on demand)
    "codegen": INTERLEAVED,
    "cohere": INTERLEAVED,
    # ALiBi in the model's own attention code
    "mpt": Family("alibi", alibi=alibi.MPT),
    "bloom": Family("alibi", alibi=alibi.BLOOM),
    # absolute positions
    **dict.fromkeys(
        (
            "gpt2",
            "opt",
            "bert",
            "roberta",
            "gpt_bigcode",
            "biogpt",
            "xglm",
            "ctrl",
            "transfo-xl",
            "distilbert",
            "electra",
            "xlm",
            "openai-gpt",
            "gpt_neo",
            "imagegpt",
        ),
        ABSOLUTE,
    ),
    # relative positions, attention the Λ kernels do not reproduce
    "falcon": Family(
        "refused",
        reason="it does not route attention through transformers' AttentionInterface (its attention code, "
        "with RoPE or ALiBi, is its own)",
    ),
    "gpt_oss": Family("refused", reason="its learned attention sinks (`s_aux`) are not part of the Λ kernels"),
    "deepseek_v2": Family("refused", reason=_MLA),
    "deepseek_v3": Family("refused", reason=_MLA),
    "llama4_text": Family("refused", reason=_LLAMA4),
    "llama4": Family("refused", reason=_LLAMA4),
    "cohere2": Family(
        "refused", reason="its full-attention layers have no RoPE while sharing the rotary module (not yet told apart)"
    ),
}


def plan_via_mask(family: Family | None) -> bool:
    """Whether the plan reaches attention through the mask (`attention.NAME_VIA_MASK`): for families that
    drop keyword arguments, and for model types not in the table (their layers are not known)."""
    return family is None or family.drops_kwargs


def family_of(model: nn.Module) -> Family | None:
    """The table's entry for `model`'s `model_type` (None for a type not in the table), with `own_attention`
    set where the installed transformers computes its attention inside the attention modules (compat.py)."""
    family = FAMILIES.get(getattr(model.config, "model_type", "") or "")
    if family is not None and family.positions == "rope" and compat.computes_own_attention(model):
        return replace(family, own_attention=True)
    return family


def declares_alibi(config) -> bool:
    """Whether a config declares ALiBi (Bloom, MPT's `attn_config.alibi`, Falcon's `alibi`)."""
    attn_config = getattr(config, "attn_config", None)
    family = FAMILIES.get(getattr(config, "model_type", "") or "")
    return (
        (family is not None and family.positions == "alibi")
        or bool(getattr(config, "alibi", False))
        or bool(getattr(attn_config, "alibi", False))
    )


def _rotary_style(decoder: nn.Module, family: Family | None) -> str | None:
    """ "interleaved" or "half" for a family in the table; for another model type, "interleaved" when its
    rotary module is named after an interleaved family of the table (e.g. a GPT-J derivative), else None
    (the rotary kind's usual pairing)."""
    if family is not None:
        return "interleaved" if family.interleaved else "half"
    tags = [name.replace("_", "") for name, f in FAMILIES.items() if f.interleaved]
    for module in decoder.modules():
        name = type(module).__name__.lower()
        if "rotary" in name and any(tag in name for tag in tags):
            return "interleaved"
    return None


def rope_of(decoder: nn.Module, family: Family | None) -> Rope | None:
    """The rotary embedding of `decoder` (the module owning the layers), paired as its family says."""
    if family is not None and family.positions != "rope":
        return None
    return find_rope(decoder, _rotary_style(decoder, family))


def _forward_source(module: nn.Module) -> str | None:
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None


def routes_attention_interface(module: nn.Module) -> bool:
    """Whether an attention layer's forward looks its attention function up in transformers'
    AttentionInterface (`ALL_ATTENTION_FUNCTIONS`); class flags such as `_supports_sdpa` do not tell
    (Falcon sets it and computes attention itself). The fallback for model types not in the table."""
    source = _forward_source(module)
    return source is not None and "ALL_ATTENTION_FUNCTIONS" in source


def _bypasses_attention_interface(module: nn.Module) -> bool:
    """Whether an attention layer's forward, read from its source, does not use the AttentionInterface
    (False when the source cannot be read: a RoPE family of the table is then trusted)."""
    source = _forward_source(module)
    return source is not None and "ALL_ATTENTION_FUNCTIONS" not in source


def check(model: nn.Module, family: Family | None, attention_modules: list[nn.Module], rope: Rope | None) -> None:
    """Refuse, with the reason, a model LM-Infinite cannot be applied to."""
    model_type = getattr(model.config, "model_type", "?")
    name = f"{type(model).__name__} ({model_type})"
    if family is not None and family.positions == "absolute":
        raise ValueError(
            f"{name} uses absolute position embeddings; LM-Infinite needs a model "
            "with relative positions (RoPE or ALiBi): its distance cap has no meaning for absolute positions"
        )
    if declares_alibi(model.config) and (family is None or family.alibi is None):
        supported = " and ".join(t.upper() if t == "mpt" else t.capitalize() for t, f in FAMILIES.items() if f.alibi)
        raise ValueError(
            f"{name}: ALiBi is supported for {supported} only: this model adds its ALiBi biases inside its "
            "own attention code, which lminfinite does not adapt"
        )
    if family is not None and family.positions == "refused":
        raise ValueError(f"{name} is not supported yet: {family.reason}")
    if family is not None and family.alibi is not None:
        family.alibi.check(model)
        return
    if (
        family is not None
        and family.positions == "rope"
        and not family.own_attention
        and any(map(_bypasses_attention_interface, attention_modules))
    ):
        raise ValueError(
            f"{name}: in the installed transformers ({transformers.__version__}) its attention modules compute "
            "attention themselves, not through transformers' AttentionInterface, so lminfinite cannot plug into "
            "them"
        )
    if family is None and (not attention_modules or not all(map(routes_attention_interface, attention_modules))):
        raise ValueError(
            f"{name} does not route attention through transformers' AttentionInterface, "
            "so lminfinite cannot plug into it"
        )
    if rope is None:
        raise ValueError(
            f"{name} has no rotary embedding that lminfinite recognises; "
            "LM-Infinite needs relative positions (RoPE or ALiBi)"
        )
