"""Bounded KV per request: a KV-cache spec that keeps the blocks of the first G and the last L tokens.

`LambdaAttentionSpec` is a sliding-window spec (window `L`) that also keeps the first `ceil(G / block)`
blocks; `LambdaManager` is vLLM's `SlidingWindowManager` except that it never frees those leading blocks,
so it frees the middle: a request holds at most `ceil(G / block) + ceil((L - 1 + in-flight tokens) / block)
+ 1` blocks however long it runs, and vLLM sizes its pool and admits requests with that bound (which is
why `max_model_len` can be far above the model's context). Prefix-cache hits are not used yet (see
`find_longest_cache_hit`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class LambdaAttentionSpec(SlidingWindowSpec):
    """Sliding window `L` (`sliding_window`) plus the blocks of the first `n_global` tokens."""

    n_global: int = 0

    @property
    def n_global_blocks(self) -> int:
        return cdiv(self.n_global, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + self.n_global_blocks, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, LambdaAttentionSpec)
            and spec.sliding_window == self.sliding_window
            and spec.n_global == self.n_global
            for spec in kv_cache_specs.values()
        )


class LambdaManager(SlidingWindowManager):
    """Frees the blocks between the starting tokens' blocks and the window."""

    def __init__(self, kv_cache_spec: LambdaAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.n_global_blocks = cdiv(kv_cache_spec.n_global, self.block_size)

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        if skipped <= 0 or request_id not in self.req_to_blocks:
            return
        last = min(skipped // self.block_size, len(self.req_to_blocks[request_id]))
        self._remove_blocks_in_range(request_id, self.n_global_blocks, last)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, *args, **kwargs):
        """No prefix-cache hit: a hit assembled from a sliding-window hit plus the cached blocks of the starting
        tokens gave wrong tokens in a mixed batch (tests/test_vllm_plugin.py), so every request computes its
        prompt (correct, at the cost of TTFT for long repeated prefixes) until that path is fixed."""
        return tuple([] for _ in kv_cache_group_ids), 0
