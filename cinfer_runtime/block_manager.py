"""The KV cache's block allocator: a free list, one block table per sequence and (optionally) a prefix cache. Plain
Python, no tensors.

Block ``b`` holds slots ``b * block_size .. (b + 1) * block_size - 1`` of every layer's cache; a sequence's
token at position ``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Prefix caching (``enable_prefix_caching``): once a block's ``block_size`` tokens are computed, the block is keyed by
its tokens and everything before them (a SHA-256 chain over the token ids, so equal keys mean equal prefixes).
A new request whose leading full blocks have keys in the cache takes those blocks as they are and starts computing
after them (``match_prefix`` / ``take_prefix``). Shared blocks are read-only: a sequence only writes positions
past its computed tokens, and a prefix match always leaves at least its last token to compute, which lands in a
block of its own. Blocks are reference-counted; one whose last owner frees it keeps its key and contents and
becomes *evictable*: it still counts as free, and is handed out (its key dropped) only when no plain free block
is left, least recently freed first.
"""
import hashlib
from collections import OrderedDict

from cinfer_runtime.config import cdiv


def _block_key(parent: bytes, tokens: list[int]) -> bytes:
    digest = hashlib.sha256(parent)
    digest.update(b"".join(t.to_bytes(8, "little", signed=True) for t in tokens))
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # A stack: the most recently freed block is reused first (its pages are likeliest to still be in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.block_tables: dict[int, list[int]] = {}
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}               # cached block -> its key
        self._block_of: dict[bytes, int] = {}             # key -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self._seq_keys: dict[int, list[bytes]] = {}       # sequence -> keys of its leading full blocks
        self.num_cached_tokens = 0                        # tokens served from the prefix cache so far (stats)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def free_block_ids(self) -> list[int]:
        """Every block no sequence holds: the free list, then the evictable cached blocks."""
        return self._free + list(self._evictable)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks ``seq_id`` still lacks to hold its first ``num_tokens`` tokens."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(cdiv(num_tokens, self.block_size) - have, 0)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.num_new_blocks(seq_id, num_tokens) <= self.num_free_blocks

    def _take_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def grow(self, seq_id: int, num_tokens: int) -> list[int]:
        """Extend ``seq_id``'s table (created if new) to cover ``num_tokens`` tokens; returns the table."""
        need = self.num_new_blocks(seq_id, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks, {self.num_free_blocks} free")
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._take_block())
        return table

    def free(self, seq_id: int) -> None:
        """Release all of ``seq_id``'s blocks (no-op for a sequence holding none): each goes back to the free list,
        or, if it is cached and no other sequence holds it, to the evictable set."""
        self._seq_keys.pop(seq_id, None)
        for block in reversed(self.block_tables.pop(seq_id, ())):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    # ---- prefix cache ----------------------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached blocks holding the longest run of ``token_ids``' leading full blocks, leaving at least the
        last token uncovered (a step must compute something to produce logits). Empty when caching is off."""
        if not self.enable_prefix_caching:
            return []
        blocks, key = [], b""
        for i in range((len(token_ids) - 1) // self.block_size):
            key = _block_key(key, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_take_prefix(self, seq_id: int, blocks: list[int], num_tokens: int) -> bool:
        """Whether ``take_prefix(seq_id, blocks)`` followed by ``grow(seq_id, num_tokens)`` fits."""
        reclaimed = sum(1 for b in blocks if self._refs[b] == 0)  # evictable now, held once taken
        need = max(cdiv(num_tokens, self.block_size) - len(blocks), 0)
        return need <= self.num_free_blocks - reclaimed

    def take_prefix(self, seq_id: int, blocks: list[int]) -> int:
        """Start ``seq_id`` (holding no blocks) on the cached ``blocks`` (from ``match_prefix``); returns how many
        of its tokens they hold, i.e. its computed tokens."""
        assert seq_id not in self.block_tables, f"sequence {seq_id} already holds blocks"
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self.block_tables[seq_id] = list(blocks)
        self._seq_keys[seq_id] = [self._key_of[b] for b in blocks]
        self.num_cached_tokens += len(blocks) * self.block_size
        return len(blocks) * self.block_size

    def cache_computed(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Key the blocks of ``seq_id`` that ``num_computed`` computed tokens (``token_ids[:num_computed]``) have
        filled. A block whose key is already cached elsewhere stays private (its twin serves later matches)."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(seq_id, ())
        keys = self._seq_keys.setdefault(seq_id, [])
        for i in range(len(keys), min(num_computed // self.block_size, len(table))):
            key = _block_key(keys[-1] if keys else b"", token_ids[i * self.block_size:(i + 1) * self.block_size])
            keys.append(key)
            block = table[i]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key
