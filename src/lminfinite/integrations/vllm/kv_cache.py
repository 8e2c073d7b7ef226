"""Bounded KV per request: a KV-cache spec that keeps the blocks of the first G and the last L tokens.

`LambdaAttentionSpec` is a sliding-window spec (window `L`) that also keeps the first `ceil(G / block)`
blocks; `LambdaManager` is vLLM's `SlidingWindowManager` except that it never frees those leading blocks,
so it frees the middle: a request holds at most `ceil(G / block) + ceil((L - 1 + in-flight tokens) / block)
+ 1` blocks however long it runs, and vLLM sizes its pool and admits requests with that bound (which is
why `max_model_len` can be far above the model's context). A prefix-cache hit is used only when the
blocks of the starting tokens are cached too.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
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
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        computed, hit = super().find_longest_cache_hit(
            block_hashes,
            max_length,
            kv_cache_group_ids,
            block_pool,
            kv_cache_spec,
            drop_eagle_block,
            alignment_tokens,
            dcp_world_size,
            pcp_world_size,
        )
        assert isinstance(kv_cache_spec, LambdaAttentionSpec)
        leading = min(kv_cache_spec.n_global_blocks, len(computed[0]))
        if hit == 0 or leading == 0:
            return computed, hit
        hashes = resolve_block_hashes(
            block_hashes,
            block_pool.hash_block_size,
            kv_cache_spec.block_size,
            supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
            alignment_tokens=alignment_tokens,
        )
        for i in range(leading):
            if not computed[0][i].is_null:
                continue
            cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
            if cached is None:  # the starting tokens are gone: no usable hit
                return tuple([] for _ in kv_cache_group_ids), 0
            for blocks, block in zip(computed, cached, strict=True):
                blocks[i] = block
        return computed, hit
