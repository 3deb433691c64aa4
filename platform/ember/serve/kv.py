"""The engine's KV memory: the rows of the running requests, allocated by need within a budget, and the prefix cache.

`RowCache` holds one `KVCache` whose rows are the running requests (the model attends over a row's cached
positions as they are, with no gather per step). It is sized by need, not for the worst case: its rows and
positions grow, each to a power of two (at most twice what is needed), to what the admitted requests can reach
(prompt + max_new_tokens, plus the prefill chunk's padding), and it is released when the engine is idle. Every
size it takes fits `budget_bytes`; `fits()` tells admission whether one more request would.

`PrefixCache` keeps the keys and values of prompt prefixes after their requests end, in blocks of `block_size`
tokens, as vLLM's automatic prefix caching does: a block is named by a hash of its tokens chained to the hash of the
block before it (so a name says the block's content and its position), and a later request that starts with the
same tokens (a shared system prompt, a chat's earlier turns, the `n` choices of one prompt) copies those blocks
into its row instead of reading them again. Full blocks only; an LRU bound in tokens, evicting the deepest blocks
of a chain first. The hash is BLAKE2b-128 over the token ids, so no two prefixes share a name by accident.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import torch

from ember.model.llama import KVCache, ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def block_hashes(tokens: list[int], block_size: int, known: list[bytes] = (), salt: str | None = None) -> list[bytes]:
    """The name of each full block of `tokens`: its tokens' hash chained to the previous block's name, the first
    chained to the request's `salt` (vLLM's `cache_salt`: only requests with the same salt share blocks). `known` are
    the names of its first blocks, already computed (a prompt's, when its answer is added): only the rest is hashed."""
    names = list(known)
    root = hashlib.blake2b(b"salt\0" + salt.encode(), digest_size=16).digest() if salt else b""
    previous = names[-1] if names else root
    ids = np.asarray(tokens, dtype=np.int64)
    for start in range(len(names) * block_size, len(ids) - block_size + 1, block_size):
        previous = hashlib.blake2b(previous + ids[start:start + block_size].tobytes(), digest_size=16).digest()
        names.append(previous)
    return names


class PrefixCache:
    """Blocks of keys and values by name, least recently used first; at most `max_tokens` tokens."""

    def __init__(self, max_tokens: int, block_size: int = 16):
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self.blocks: collections.OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self.queried = self.hit = 0  # prompt tokens looked up, and those found

    def __contains__(self, name: bytes) -> bool:
        return name in self.blocks

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def hit_rate(self) -> float:
        """Prompt tokens read from the cache over prompt tokens admitted, since the start."""
        return self.hit / self.queried if self.queried else 0.0

    def match(self, names: list[bytes]) -> int:
        """How many of the leading blocks are cached (and now the most recently used)."""
        n = 0
        while n < len(names) and names[n] in self.blocks:
            n += 1
        self._touch(names[:n])
        return n

    def copy_into(self, cache: KVCache, row: int, names: list[bytes], tokens: int) -> None:
        """The first `tokens` positions of `row` from the blocks `names` (cached: see `match`)."""
        k = torch.cat([self.blocks[n][0] for n in names], dim=2)[:, :, :tokens]  # (L, K, tokens, D)
        v = torch.cat([self.blocks[n][1] for n in names], dim=2)[:, :, :tokens]
        cache.k[:, row, :, :tokens] = k
        cache.v[:, row, :, :tokens] = v

    def store(self, cache: KVCache, row: int, names: list[bytes]) -> None:
        """Keeps the blocks `names` of `row` (its first len(names) full blocks) that the cache lacks."""
        if not self.max_blocks:
            return
        bs = self.block_size
        for i, name in enumerate(names):
            if name not in self.blocks:
                span = slice(i * bs, (i + 1) * bs)
                self.blocks[name] = (cache.k[:, row, :, span].clone(), cache.v[:, row, :, span].clone())
        self._touch(names)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def _touch(self, names: list[bytes]) -> None:
        """Most recently used, a chain's first block last: eviction takes the deepest blocks before their parents,
        so no cached block is left unreachable behind an evicted one."""
        for name in reversed(names):
            self.blocks.move_to_end(name)


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class RowCache:
    """The running requests' rows of keys and values (see the module doc): `cache` is None while nothing runs."""

    def __init__(self, cfg: ModelConfig, max_rows: int, max_len: int, budget_bytes: int | None, dtype, device):
        """`budget_bytes` None: room for every row at `max_len`."""
        self.cfg, self.max_rows, self.max_len, self.dtype, self.device = cfg, max_rows, max_len, dtype, device
        self.per_token = kv_bytes_per_token(cfg, torch.empty((), dtype=dtype).element_size())
        self.budget = budget_bytes if budget_bytes is not None else self.bytes_for(max_rows, max_len)
        self.cache: KVCache | None = None
        self.peak_bytes = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, positions) allocated."""
        return (0, 0) if self.cache is None else (self.cache.k.shape[1], self.cache.max_len)

    def bytes_for(self, rows: int, length: int) -> int:
        return rows * length * self.per_token

    @property
    def bytes(self) -> int:
        return self.bytes_for(*self.shape)

    def _sized(self, rows: int, length: int) -> tuple[int, int]:
        """The allocation for `rows` rows of `length` positions: each rounded up to a power of two (so growing
        reallocates rarely) where the budget allows, else exact."""
        rounded = (min(self.max_rows, _power_of_two(rows)), min(self.max_len, _power_of_two(length)))
        rounded = (max(rounded[0], self.shape[0]), max(rounded[1], self.shape[1]))
        return rounded if self.bytes_for(*rounded) <= self.budget else (rows, length)

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` rows of `length` positions fit the budget."""
        return rows <= self.max_rows and length <= self.max_len and self.bytes_for(rows, length) <= self.budget

    def ensure(self, rows: int, length: int, used_rows: int) -> None:
        """At least `rows` rows of `length` positions, keeping the first `used_rows` rows' contents (fits() holds)."""
        have_rows, have_len = self.shape
        if rows <= have_rows and length <= have_len:
            return
        new_rows, new_len = self._sized(rows, length)
        grown = KVCache(self.cfg, new_rows, new_len, dtype=self.dtype, device=self.device)
        if self.cache is not None and used_rows:
            n = min(have_len, new_len)
            grown.k[:, :used_rows, :, :n] = self.cache.k[:, :used_rows, :, :n]
            grown.v[:, :used_rows, :, :n] = self.cache.v[:, :used_rows, :, :n]
            grown.lengths[:used_rows] = self.cache.lengths[:used_rows]
        self.cache = grown
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def release(self) -> None:
        self.cache = None
