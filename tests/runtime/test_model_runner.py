"""ModelRunner's step assembly: the flattened tokens, positions and attention metadata it hands the compiled model,
checked against a per-request Python computation, and the padding rules (slot -1, empty padding sequences)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cinfer_runtime.block_manager import BlockManager
from cinfer_runtime.config import EngineConfig
from cinfer_runtime.cuda_graphs import StepGraphs, decode_buckets, prefill_buckets
from cinfer_runtime.model_runner import ModelRunner, warm_up_steps
from cinfer_runtime.sampler import Sampler
from cinfer_runtime.sampling_params import SamplingParams
from cinfer_runtime.scheduler import Scheduler
from cinfer_runtime.sequence import Sequence

BLOCK_SIZE = 8


class RecordingModel:
    """Stands in for the compiled model: records its inputs and returns logits favouring token 5."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.calls = []

    def __call__(self, input_ids, positions, meta):
        self.calls.append((input_ids.clone(), positions.clone(), {k: v.clone() for k, v in meta.__dict__.items()}))
        logits = torch.zeros(meta.logits_indices.shape[0], self.vocab)
        logits[:, 5] = 1.0
        return logits


def make_runner(max_num_seqs=4, budget=24):
    config = EngineConfig(block_size=BLOCK_SIZE, num_kv_blocks=64, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget, max_model_len=96).resolve(96)
    model = RecordingModel(16)
    return config, model, ModelRunner(model, config, torch.device("cpu"), Sampler(16, "cpu", max_num_seqs))


@given(prompt_lens=st.lists(st.integers(1, 40), min_size=1, max_size=4), steps=st.integers(1, 6))
def test_step_inputs_match_per_request_computation(prompt_lens, steps):
    config, model, runner = make_runner()
    sched = Scheduler(config, BlockManager(64, BLOCK_SIZE))
    for i, n in enumerate(prompt_lens):
        sched.add(Sequence(i, str(i), [(7 * i + j) % 15 + 1 for j in range(n)],
                           SamplingParams(max_tokens=50, temperature=0.0), 0, frozenset()))
    for _ in range(steps):
        out = sched.schedule()
        starts = [s.num_computed_tokens for s in out.seqs]
        sampled = runner.execute(out)
        assert sampled == [5] * sum(out.samples)
        input_ids, positions, meta = model.calls[-1]
        ids, pos, slots, qsl, lens, logits_idx = [], [], [], [0], [], []
        for s, start, n, table in zip(out.seqs, starts, out.num_new_tokens, out.block_tables):
            ids += s.token_ids[start:start + n]
            pos += list(range(start, start + n))
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + n)]
            qsl.append(qsl[-1] + n)
            lens.append(start + n)
            logits_idx.append(qsl[-1] - 1)
        assert input_ids.shape == positions.shape == (1, len(ids))
        assert input_ids[0].tolist() == ids and positions[0].tolist() == pos
        assert meta["slot_mapping"].tolist() == slots
        assert meta["query_start_loc"].tolist() == qsl
        assert meta["seq_lens"].tolist() == lens
        assert meta["logits_indices"].tolist() == logits_idx
        assert meta["block_tables"].shape == (len(out.seqs), config.max_blocks_per_seq)
        assert meta["block_tables"].dtype == meta["seq_lens"].dtype == meta["query_start_loc"].dtype == torch.int32
        assert meta["slot_mapping"].dtype == meta["logits_indices"].dtype == torch.int64
        for row, table in enumerate(out.block_tables):
            assert meta["block_tables"][row, :len(table)].tolist() == table
        sched.update(out, sampled)


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 24]
    assert decode_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64] + list(range(80, 257, 16))


def test_prefill_buckets():
    assert prefill_buckets(8192) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert prefill_buckets(100) == [16, 24, 32, 48, 64, 96, 100]  # the step budget is always the last bucket
    assert prefill_buckets(32) == [16, 24, 32]
    assert prefill_buckets(16) == [16]
    assert prefill_buckets(15) == []


def test_step_graph_shapes():
    graphs = StepGraphs(decode_buckets(20), prefill_buckets(100), max_batch=25)
    assert graphs.shape_for(3, 3, is_decode=True) == (4, 4)
    assert graphs.shape_for(24, 24, is_decode=True) == (24, 24)
    # A prefill step pads its tokens to a bucket and its sequences to one more than the tokens, or to the most a
    # step has (max_batch - 1): never as many sequences as tokens, the shape the ops take for a decode step.
    assert graphs.shape_for(3, 1, is_decode=False) == (16, 17)
    assert graphs.shape_for(17, 2, is_decode=False) == (24, 25)
    assert graphs.shape_for(40, 20, is_decode=False) == (48, 24)
    assert graphs.shape_for(100, 1, is_decode=False) == (100, 24)
    assert all(graphs.prefill_batch(t) != t for t in range(1, 200))
    assert graphs.shape_for(101, 1, is_decode=False) is None  # past the largest bucket: no graph
    with pytest.raises(ValueError, match="largest decode bucket"):
        graphs.shape_for(25, 25, is_decode=True)
    shapes = graphs.shapes
    assert shapes == sorted(set(shapes), reverse=True) and shapes[0] == (100, 24)
    assert {(b, b) for b in decode_buckets(20)} <= set(shapes)


@torch.no_grad()
def test_padding_to_a_graph_shape_leaves_logits_unchanged(model):
    # A CUDA graph replays a step padded to its shape. Run real steps (a prefill, then prefill chunks mixed with
    # decodes) through the compiled model twice, as they are and padded the way a graph pads them: the real
    # sequences' logits must not change, and the padding must write nothing to the caches.
    import cinfer_runtime

    engine = cinfer_runtime.compile(model, block_size=BLOCK_SIZE, num_kv_blocks=64, max_num_seqs=4,
                                    max_num_batched_tokens=40)
    runner = engine.runner
    assert runner.dev is runner.host  # CPU, synchronous: the model reads the host buffers
    for i, n in enumerate([30, 5, 17]):  # steps of 40 tokens, then 14 (padded to 16), then decodes
        engine.add_request([(11 * i + j) % 200 + 3 for j in range(n)], SamplingParams(max_tokens=4, temperature=0.0))
    graphs = StepGraphs(decode_buckets(4), prefill_buckets(40), max_batch=runner.host.seq_lens.shape[0])
    for _ in range(4):
        out = engine.scheduler.schedule()
        num_tokens, batch = runner._prepare(out)
        caches = [c.clone() for c in engine.k_caches + engine.v_caches]
        expected = runner.model(*runner.host.model_inputs(num_tokens, batch))[:batch].clone()
        written = [c.clone() for c in engine.k_caches + engine.v_caches]
        tokens, padded_batch = graphs.shape_for(num_tokens, batch, out.is_decode)
        for c, before in zip(engine.k_caches + engine.v_caches, caches):
            c.copy_(before)
        runner._pad(num_tokens, batch, tokens, padded_batch)
        logits = runner.model(*runner.host.model_inputs(tokens, padded_batch))
        assert logits.shape[0] == padded_batch
        torch.testing.assert_close(logits[:batch], expected)
        for c, after in zip(engine.k_caches + engine.v_caches, written):
            torch.testing.assert_close(c, after, equal_nan=True)
        sampled = logits[:batch].argmax(-1)
        engine.scheduler.update(out, [t for t, samples in zip(sampled.tolist(), out.samples) if samples])


def test_warm_up_steps_fit_the_static_buffers():
    # On a GPU the warm-up adds the steps that compile every Triton kernel variant (tests/ops/test_kernel_variants.py
    # checks which): a decode step at the largest batch and one as long as a step gets, here a single sequence (one
    # logits row for the sampler). They must fit the runner's buffers and write nothing to the caches.
    config, model, runner = make_runner(max_num_seqs=4, budget=24)
    steps = warm_up_steps(4, 24, config.max_model_len, all_variants=True)
    assert steps == [[3, 2], [1, 1], [1] * 4, [24]]
    assert warm_up_steps(4, 24, config.max_model_len, all_variants=False) == steps[:2]
    runner._warm_up_steps = steps
    runner.warm_up()
    assert len(model.calls) == len(steps)
    for q_lens, (input_ids, positions, meta) in zip(steps, model.calls):
        assert input_ids.shape == (1, sum(q_lens)) and meta["seq_lens"].tolist() == q_lens
        assert positions[0].tolist() == [p for n in q_lens for p in range(n)]
        assert (meta["slot_mapping"] == -1).all()
