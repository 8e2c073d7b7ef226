"""Bounded KV per request: a KV-cache spec that keeps the blocks of the first G and the last L tokens.

`LambdaAttentionSpec` is a sliding-window spec (window `L`) that also keeps the first `ceil(G / block)`
blocks; `LambdaManager` is vLLM's `SlidingWindowManager` except that it never frees those leading blocks,
so it frees the middle: a request holds at most `ceil(G / block) + ceil((L - 1 + in-flight tokens) / block)
+ 1` blocks however long it runs, and vLLM sizes its pool and admits requests with that bound (which is
why `max_model_len` can be far above the model's context). Prefix caching works as for a sliding window: a
hit is the cached blocks of the window before the hit's end plus those of the starting tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock, resolve_block_hashes
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
    """vLLM's `SlidingWindowManager` that keeps the blocks of the starting tokens, so it frees only the middle.

    Every place where the sliding-window manager turns the blocks before the window into null blocks keeps the
    first `n_global_blocks` instead: freeing while a request grows (`remove_skipped_blocks`), and adopting a
    prefix-cache hit (`add_local_computed_blocks`: vLLM pads the hit's skipped blocks with nulls, the starting
    blocks included, which would leave the global branch reading the null block). A hit is vLLM's
    sliding-window hit (the window's blocks before the hit's end) plus the cached blocks of the starting tokens
    (`find_longest_cache_hit`); without those there is no hit.
    """

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

    def _kept_hit_blocks(
        self, new_computed_blocks: Sequence[KVCacheBlock], skipped_blocks: int
    ) -> dict[int, KVCacheBlock]:
        """The blocks of a hit (by index) that vLLM's sliding-window bookkeeping skips but the starting tokens need."""
        leading = min(self.n_global_blocks, skipped_blocks, len(new_computed_blocks))
        return {i: new_computed_blocks[i] for i in range(leading) if not new_computed_blocks[i].is_null}

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks, total_computed_tokens: int, *args, **kwargs
    ) -> int:
        """vLLM's count, plus the starting blocks of a hit that leave the free queue when the request takes them
        (vLLM counts the evictable blocks of the window part only)."""
        count = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, *args, **kwargs
        )
        if request_id in self.num_cached_block or not new_computed_blocks:
            return count
        skipped_blocks = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        skipped_blocks -= len(self.req_to_blocks.get(request_id, ()))
        return count + self._get_num_evictable_blocks(
            list(self._kept_hit_blocks(new_computed_blocks, skipped_blocks).values())
        )

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        """vLLM's adoption of a hit, then the starting blocks put back in place of the nulls it padded them with
        (touched, so they are held by this request and cannot be evicted)."""
        skipped_blocks = (
            self.get_num_skipped_tokens(num_local_computed_tokens + num_external_computed_tokens) // self.block_size
        )
        kept = self._kept_hit_blocks(new_computed_blocks, skipped_blocks)
        super().add_local_computed_blocks(
            request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens
        )
        if kept:
            self.block_pool.touch(list(kept.values()))
            blocks = self.req_to_blocks[request_id]
            for i, block in kept.items():
                blocks[i] = block

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
        """vLLM's sliding-window hit (the blocks of the window before the hit's end, nulls before them) with the
        cached blocks of the starting tokens in place of their nulls; no hit when one of those is not cached."""
        assert isinstance(kv_cache_spec, LambdaAttentionSpec)
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
        leading = min(kv_cache_spec.n_global_blocks, len(computed[0]))
        if hit == 0 or all(not computed[0][i].is_null for i in range(leading)):
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
            if cached is None:  # the starting tokens are no longer cached: no usable hit
                return tuple([] for _ in kv_cache_group_ids), 0
            for blocks, block in zip(computed, cached, strict=True):
                blocks[i] = block
        return computed, hit

    @classmethod
    def reachable_block_mask(
        cls, start_block: int, end_block: int, alignment_tokens, kv_cache_spec: KVCacheSpec, *args, **kwargs
    ):
        """vLLM's choice of the blocks worth caching for a sliding window, plus the starting tokens' blocks."""
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, kv_cache_spec, *args, **kwargs)
        if mask is not None:
            assert isinstance(kv_cache_spec, LambdaAttentionSpec)
            for i in range(start_block, min(end_block, kv_cache_spec.n_global_blocks)):
                mask[i - start_block] = True
        return mask
