"""Block manager: a hypothesis state machine over grow/free, checking ownership and accounting after every step."""
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cinfer_runtime.block_manager import BlockManager
from cinfer_runtime.config import cdiv

NUM_BLOCKS = 12
BLOCK_SIZE = 8
SEQ_IDS = st.integers(0, 5)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.num_tokens: dict[int, int] = {}   # model: tokens each live sequence holds room for

    @rule(seq_id=SEQ_IDS, extra=st.integers(0, 3 * BLOCK_SIZE))
    def grow(self, seq_id, extra):
        before = self.num_tokens.get(seq_id, 0)
        target = before + extra
        need = max(cdiv(target, BLOCK_SIZE) - cdiv(before, BLOCK_SIZE), 0)
        assert self.bm.num_new_blocks(seq_id, target) == need
        fits = need <= self.bm.num_free_blocks
        assert self.bm.can_grow(seq_id, target) == fits
        free_before = self.bm.num_free_blocks
        old_table = list(self.bm.block_tables.get(seq_id, []))
        if fits:
            table = self.bm.grow(seq_id, target)
            self.num_tokens[seq_id] = target
            assert table[: len(old_table)] == old_table, "growing must never move existing blocks"
            assert self.bm.num_free_blocks == free_before - need
        else:
            with pytest.raises(RuntimeError):
                self.bm.grow(seq_id, target)
            assert self.bm.num_free_blocks == free_before
            assert self.bm.block_tables.get(seq_id, []) == old_table

    @precondition(lambda self: self.num_tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.num_tokens)))
        held = len(self.bm.block_tables.get(seq_id, []))
        free_before = self.bm.num_free_blocks
        self.bm.free(seq_id)
        del self.num_tokens[seq_id]
        assert seq_id not in self.bm.block_tables
        assert self.bm.num_free_blocks == free_before + held

    @rule(seq_id=SEQ_IDS)
    def free_unknown_is_noop(self, seq_id):
        if seq_id not in self.num_tokens:
            free_before = self.bm.num_free_blocks
            self.bm.free(seq_id)
            assert self.bm.num_free_blocks == free_before

    @invariant()
    def ownership_and_accounting(self):
        owned = [b for table in self.bm.block_tables.values() for b in table]
        free = self.bm._free
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert not set(owned) & set(free), "a block is both owned and free"
        assert len(owned) + len(free) == NUM_BLOCKS
        assert set(owned) | set(free) == set(range(NUM_BLOCKS))
        for seq_id, table in self.bm.block_tables.items():
            assert len(table) == cdiv(self.num_tokens[seq_id], BLOCK_SIZE)

    def teardown(self):
        for seq_id in list(self.num_tokens):
            self.bm.free(seq_id)
        assert sorted(self.bm._free) == list(range(NUM_BLOCKS)), "blocks were lost"
        assert not self.bm.block_tables


TestBlockManager = BlockManagerMachine.TestCase
