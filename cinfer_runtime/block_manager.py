"""The KV cache's block allocator: a free list and one block table per sequence. Plain Python, no tensors.

Block ``b`` holds slots ``b * block_size .. (b + 1) * block_size - 1`` of every layer's cache; a sequence's
token at position ``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
Tables only grow (as tokens are computed) and are released whole (on finish or preemption).
Prefix caching (sharing blocks between sequences) is out of scope: every block has exactly one owner.
"""
from cinfer_runtime.config import cdiv


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first (its pages are likeliest to still be in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.block_tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_new_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks ``seq_id`` still lacks to hold its first ``num_tokens`` tokens."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(cdiv(num_tokens, self.block_size) - have, 0)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.num_new_blocks(seq_id, num_tokens) <= len(self._free)

    def grow(self, seq_id: int, num_tokens: int) -> list[int]:
        """Extend ``seq_id``'s table (created if new) to cover ``num_tokens`` tokens; returns the table."""
        need = self.num_new_blocks(seq_id, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks, {len(self._free)} free")
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: int) -> None:
        """Return all of ``seq_id``'s blocks to the free list (no-op for a sequence holding none)."""
        table = self.block_tables.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))
