"""ScoreMod: what happens to a logit between `q . k` and the softmax, written once for every kernel.

In the spirit of attention-gym's `score_mod`: one typed value holds the layer's scaling, its logit
softcapping (Gemma2) and its ALiBi slopes (MPT, Bloom), and one rule turns a raw dot product of a key
seen at distance `t` into the logit the softmax takes:

    logit = cap(scaling * q.k) - slope * t,    cap(s) = softcap * tanh(s / softcap)  (no cap: s)

A key in the local window is seen at its true distance `i - j`; a far key (a starting token, a top-k
middle key) at the capped distance `D` (with the StreamingLLM-style `sinks` baseline: `min(D, i) - j`),
which is `Alibi.far_distance`. With RoPE the far distance is in the rotation of the query and key, so
only the scaling and the cap apply. The dense kernels call `local` and `far` on the layouts they use;
FlexAttention gets the same rule elementwise (`elementwise`); the fused CPU band path applies the same
ALiBi bias decomposed into key-only terms (`kernels/torch_chunked.py`), checked against this rule by the
tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..positions import Alibi


def cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit softcapping: `softcap * tanh(scores / softcap)`; the scores unchanged without a cap."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


@dataclass(frozen=True)
class ScoreMod:
    """The logit of each key, from its dot product with the query and the distance it is seen at.

    scaling: the factor of the dot product (usually head_dim ** -0.5).
    softcap: logit softcapping (None: off).
    alibi: the model's ALiBi (None: RoPE; the distance is then in the rotations).
    """

    scaling: float
    softcap: float | None = None
    alibi: Alibi | None = None

    @property
    def plain(self) -> bool:
        """Only the scaling: no cap and no bias (fused kernels take this case directly)."""
        return self.softcap is None and self.alibi is None

    def to(self, device: torch.device) -> ScoreMod:
        """The same modification with the ALiBi slopes on `device`."""
        if self.alibi is None or self.alibi.slopes.device == device:
            return self
        return ScoreMod(self.scaling, self.softcap, self.alibi.to(device))

    def _logits(self, dots: torch.Tensor, distance, head_shape: tuple[int, ...]) -> torch.Tensor:
        scores = cap(dots * self.scaling, self.softcap)
        if self.alibi is not None:
            scores = scores + self.alibi.bias(distance(), head_shape)
        return scores

    def local(
        self, dots: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, head_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Logits of local keys: each seen at its true distance `q_idx - k_idx`. `q_idx`, `k_idx` broadcast
        like `dots` with the head dimensions (`head_shape`, laid out as in `dots`) left out."""
        return self._logits(dots, lambda: q_idx - k_idx, head_shape)

    def far(
        self, dots: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, head_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Logits of far keys (starting tokens, top-k middle keys): seen at the capped distance D."""
        alibi = self.alibi
        return self._logits(dots, lambda: alibi.far_distance(q_idx, k_idx) if alibi else 0, head_shape)

    def elementwise(self, q_idx: torch.Tensor, k_idx: torch.Tensor):
        """The local rule as FlexAttention's `score_mod(score, b, h, i, j)` (the score is already scaled),
        None when there is nothing to modify."""
        if self.plain:
            return None
        softcap = self.softcap
        slopes = None if self.alibi is None else self.alibi.slopes.to(torch.float32)

        def score_mod(score, b, h, i, j):
            score = cap(score, softcap)
            if slopes is not None:
                score = score - slopes[h] * (q_idx[b, i] - k_idx[b, j])
            return score

        return score_mod
