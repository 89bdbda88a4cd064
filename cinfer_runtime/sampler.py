"""The sampler: last-token logits of each scheduled request -> its next token, for the whole batch at once.

Per row, in HF ``generate``'s order and in fp32: repetition penalty, then (sampling rows) temperature, top-k,
top-p, min-p; greedy rows take the argmax of the penalised logits, sampling rows draw from the filtered softmax.

Randomness is counter-based, so a seeded request is reproducible whatever it is batched with: the row's key is a
hash of (seed, step), and vocabulary entry ``i`` of the row gets the ``i``-th output of a splitmix64 stream started
at that key. 23 bits of it make a uniform ``u`` in (0, 1); the token is the Gumbel-max
``argmax(logit - log(-log u))`` over the filtered logits (filtered tokens are -inf and never win). Nothing depends
on a shared generator, the batch size or the row's position, and nothing syncs with the host.

On CUDA Triton kernels hash, add the noise and take the argmax in a single pass over the logits, each row split
into chunks over many programs (so a batch of one still fills the GPU; greedy rows use the same split argmax);
elsewhere the same arithmetic runs as torch int64 ops (two's-complement wrap-around stands in for uint64). Both
give the same uniforms bit for bit; tokens agree unless two noisy scores are within an ulp (not guaranteed across
devices).
"""
import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from cinfer_ops.launch import launch
from cinfer_ops.launch import num_sms as _num_sms
from cinfer_runtime.sampling_params import SamplingParams

# splitmix64's increment and finaliser multipliers (Steele, Lea, Flood 2014; Vigna's constants).
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB
UNIFORM_BITS = 23  # (k + 0.5) / 2**23 is exact in fp32 and lies strictly inside (0, 1): no log(0), no log(1) = 0


def _signed64(value: int) -> int:
    """The int64 with the same bit pattern as ``value`` mod 2**64."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic on int64)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 bit patterns (a bijection of 64-bit words). Returns a new tensor."""
    x = x ^ _shr(x, 30)
    x *= _signed64(SPLITMIX_MUL1)
    x ^= _shr(x, 27)
    x *= _signed64(SPLITMIX_MUL2)
    x ^= _shr(x, 31)
    return x


def row_keys(seeds: Tensor, steps: Tensor) -> Tensor:
    """seeds, steps: int64 [batch] -> int64 [batch], the start of each row's random stream.
    For a fixed seed distinct steps give distinct keys (mix64 is a bijection)."""
    return mix64(mix64(seeds) ^ steps)


def uniforms(keys: Tensor, vocab_size: int) -> Tensor:
    """keys: int64 [batch] -> fp32 [batch, vocab_size] in (0, 1): entry i of row b from splitmix64 output
    ``mix64(keys[b] + (i + 1) * gamma)``, its top UNIFORM_BITS bits plus one half, over 2**UNIFORM_BITS."""
    counters = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=keys.device)
    counters *= _signed64(SPLITMIX_GAMMA)
    bits = _shr(mix64(keys[:, None] + counters[None, :]), 64 - UNIFORM_BITS)
    return bits.to(torch.float32).add_(0.5).mul_(2.0 ** -UNIFORM_BITS)


def gumbel_argmax_torch(logits: Tensor, keys: Tensor) -> Tensor:
    """logits: fp32 [batch, vocab] (-inf = excluded), keys: int64 [batch] -> int64 [batch] token ids."""
    noise = uniforms(keys, logits.shape[1]).log_().neg_().log_()  # log(E), E ~ Exp(1)
    return (logits - noise).argmax(dim=-1)


@triton.jit
def _mix64(x):
    # x: uint64, so >> is a logical shift and * wraps, exactly like the int64 torch version.
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


# ---- split argmax on CUDA ----------------------------------------------------------------------------------------
# A row's argmax is split over (row, chunk) programs, so batch 1 occupies the GPU instead of one SM: kernel 1 writes
# each chunk's (max, first index of the max) to a small workspace, kernel 2 reduces a row's chunk partials. The
# compiled variants depend on dtype and GUMBEL only: chunk_size and num_chunks are runtime arguments.

SPLIT_BLOCK = 1024  # logits per loop iteration of a chunk program; a chunk is a whole number of blocks
PARTIALS_BLOCK = 256  # chunk partials per loop iteration of the reduction program
_NO_INDEX = tl.constexpr(2 ** 31 - 1)  # "none yet": above every index, so it loses every tie


@triton.jit
def _argmax_update(best_value, best_index, first_nan, value, index):
    # Lane-wise running argmax in torch.argmax's order: the larger value wins, equal values go to the smaller index,
    # and NaN beats every number. NaN compares false, so it never enters best_value; first_nan keeps its smallest
    # index apart.
    better = (value > best_value) | ((value == best_value) & (index < best_index))
    best_value = tl.where(better, value, best_value)
    best_index = tl.where(better, index, best_index)
    first_nan = tl.minimum(first_nan, tl.where(value != value, index, _NO_INDEX))
    return best_value, best_index, first_nan


@triton.jit
def _argmax_result(best_value, best_index, first_nan):
    # The lanes' combined (value, index): NaN and the first NaN's index if any lane saw one, else the maximum and
    # the smallest index holding it.
    nan_index = tl.min(first_nan, axis=0)
    top = tl.max(best_value, axis=0)
    top_index = tl.min(tl.where(best_value == top, best_index, _NO_INDEX), axis=0)
    has_nan = nan_index < _NO_INDEX
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, nan_index, top_index)


@triton.jit
def _chunk_argmax_kernel(logits_ptr, logits_row_stride, vocab_size, chunk_size, seeds_ptr, steps_ptr, partials_ptr,
                         BLOCK: tl.constexpr, GUMBEL: tl.constexpr, UNIFORM_BITS_: tl.constexpr):
    # Program (row, chunk): the argmax over logits[row, chunk * chunk_size:][:chunk_size], with GUMBEL of
    # logit - log(-log u) where u is the row's uniform at that index. The noise is a function of (key, index) alone,
    # so chunks draw it independently and no split changes a score. Writes the chunk's value (as int32 bits) to
    # partials[0, row, chunk] and its index to partials[1, row, chunk].
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    chunk_start = chunk * chunk_size
    chunk_stop = tl.minimum(chunk_start + chunk_size, vocab_size)
    if GUMBEL:
        seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
        step = tl.load(steps_ptr + row).to(tl.uint64, bitcast=True)
        key = _mix64(_mix64(seed) ^ step)
    row_ptr = logits_ptr + row * logits_row_stride
    lanes = tl.arange(0, BLOCK)
    best_value = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK], _NO_INDEX, tl.int32)
    first_nan = tl.full([BLOCK], _NO_INDEX, tl.int32)
    for start in range(chunk_start, chunk_stop, BLOCK):
        index = start + lanes
        # Lanes past the chunk read -inf at indices above every real one: they never win, not even a -inf tie.
        value = tl.load(row_ptr + index, mask=index < chunk_stop, other=float("-inf")).to(tl.float32)
        if GUMBEL:
            bits = _mix64(key + (index + 1).to(tl.uint64) * 0x9E3779B97F4A7C15) >> (64 - UNIFORM_BITS_)
            u = (bits.to(tl.float32) + 0.5) * (1.0 / (1 << UNIFORM_BITS_))
            value = value - tl.log(-tl.log(u))
        best_value, best_index, first_nan = _argmax_update(best_value, best_index, first_nan, value, index)
    value, index = _argmax_result(best_value, best_index, first_nan)
    slot = row * num_chunks + chunk
    tl.store(partials_ptr + slot, value.to(tl.int32, bitcast=True))
    tl.store(partials_ptr + tl.num_programs(0) * num_chunks + slot, index)


@triton.jit(do_not_specialize=["num_chunks"])
def _reduce_partials_kernel(partials_ptr, num_chunks, out_ptr, BLOCK: tl.constexpr):
    # One program per row: the argmax over its chunks' (value, index) partials, by the same rule. Chunks cover
    # increasing index ranges, so a chunk's first index of the maximum is the row's when the chunk wins.
    row = tl.program_id(0).to(tl.int64)
    index_plane = tl.num_programs(0).to(tl.int64) * num_chunks
    lanes = tl.arange(0, BLOCK)
    best_value = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK], _NO_INDEX, tl.int32)
    first_nan = tl.full([BLOCK], _NO_INDEX, tl.int32)
    for start in range(0, num_chunks, BLOCK):
        chunk = start + lanes
        in_row = chunk < num_chunks
        slot = row * num_chunks + chunk
        value = tl.load(partials_ptr + slot, mask=in_row, other=0).to(tl.float32, bitcast=True)
        value = tl.where(in_row, value, float("-inf"))
        index = tl.load(partials_ptr + index_plane + slot, mask=in_row, other=_NO_INDEX)
        best_value, best_index, first_nan = _argmax_update(best_value, best_index, first_nan, value, index)
    _, index = _argmax_result(best_value, best_index, first_nan)
    tl.store(out_ptr + row, index.to(tl.int64))


def split_for(batch: int, vocab_size: int, num_sms: int, block: int = SPLIT_BLOCK) -> tuple[int, int]:
    """(num_chunks, chunk_size) for a [batch, vocab_size] argmax: about two programs per SM in all, never more than
    one chunk per block of logits, and one chunk per row once the batch alone fills the GPU."""
    return _chunks_of(vocab_size, triton.cdiv(2 * num_sms, batch), block)


def _chunks_of(vocab_size: int, wanted: int, block: int) -> tuple[int, int]:
    """(num_chunks, chunk_size): at most ``wanted`` chunks (at least one), each a whole number of blocks;
    ``num_chunks = ceil(vocab_size / chunk_size)``, so no chunk is empty."""
    wanted = max(1, min(wanted, triton.cdiv(vocab_size, block)))
    chunk_size = triton.cdiv(triton.cdiv(vocab_size, wanted), block) * block
    return triton.cdiv(vocab_size, chunk_size), chunk_size


def _split_argmax(logits: Tensor, seeds: Tensor | None, steps: Tensor | None, num_chunks: int | None,
                  block: int) -> Tensor:
    """The two-kernel launch shared by argmax_triton and gumbel_argmax_triton (GUMBEL iff seeds is given)."""
    batch, vocab_size = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if not 0 < vocab_size < _NO_INDEX.value:
        raise ValueError(f"vocab size must be in [1, 2**31 - 1), got {vocab_size}")
    if num_chunks is None:
        num_chunks, chunk_size = split_for(batch, vocab_size, _num_sms(logits.device), block)
    else:
        num_chunks, chunk_size = _chunks_of(vocab_size, num_chunks, block)
    # One workspace for both halves of the partials (values as fp32 bits, then indices): a single allocation.
    partials = torch.empty((2, batch, num_chunks), dtype=torch.int32, device=logits.device)
    gumbel = seeds is not None
    launch(_chunk_argmax_kernel, (batch, num_chunks),
        logits, logits.stride(0), vocab_size, chunk_size, seeds if gumbel else partials,  # unread without GUMBEL
        steps if gumbel else partials, partials, BLOCK=block, GUMBEL=gumbel, UNIFORM_BITS_=UNIFORM_BITS, num_warps=4)
    launch(_reduce_partials_kernel, (batch,), partials, num_chunks, out, BLOCK=PARTIALS_BLOCK, num_warps=4)
    return out


def argmax_triton(logits: Tensor, *, num_chunks: int | None = None, block: int = SPLIT_BLOCK) -> Tensor:
    """``logits.argmax(dim=-1)`` split over many programs per row. logits: fp32/bf16/fp16 [batch, vocab], any row
    stride (a column stride other than 1 costs a copy). Returns int64 [batch]: the first index of the row maximum,
    or of the row's first NaN if it has one (torch.argmax's rule). num_chunks (how many chunks to aim for, default
    from ``split_for``) and block (a power of two) exist for tests, which split small vocabularies finely."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be fp32/bf16/fp16 [batch, vocab], got {logits.dtype} {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _split_argmax(logits, None, None, num_chunks, block)


def gumbel_argmax_triton(logits: Tensor, seeds: Tensor, steps: Tensor, *, num_chunks: int | None = None,
                         block: int = SPLIT_BLOCK) -> Tensor:
    """Fused ``gumbel_argmax_torch(logits, row_keys(seeds, steps))``, split over many programs per row like
    ``argmax_triton`` (same num_chunks and block), with torch.argmax's rules: the first index on ties, and a NaN
    score wins. logits: fp32 [batch, vocab] with unit column stride; seeds, steps: int64 [batch]. Returns int64
    [batch], the same for every split."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be fp32 [batch, vocab] with unit column stride, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    return _split_argmax(logits, seeds.contiguous(), steps.contiguous(), num_chunks, block)


@dataclass
class SamplingRow:
    """One sequence of the step, in batch order.

    seed: the request's effective seed (params.seed, or one the engine drew when None); any int, used mod 2**64.
    step: tokens generated so far for the request (0 for its first). token_ids: prompt + generated tokens so far
    (only read when params.repetition_penalty != 1).
    """
    params: SamplingParams
    seed: int
    step: int
    token_ids: list[int]


class Sampler:
    """Batched sampling over ``vocab_size`` logits on ``device`` for at most ``max_num_seqs`` rows a step."""

    def __init__(self, vocab_size: int, device: torch.device, max_num_seqs: int = 256):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_num_seqs = max_num_seqs
        self._pin = self.device.type == "cuda"
        self._use_triton = self.device.type == "cuda"

    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> Tensor:
        """logits: [batch, vocab_size] fp32/bf16/fp16 on ``device``; rows: one per logits row. Returns int64 [batch]
        token ids on ``device``, without synchronising with the host."""
        batch = len(rows)
        if logits.dim() != 2 or logits.shape != (batch, self.vocab_size):
            raise ValueError(f"logits must be [{batch}, {self.vocab_size}] (rows x vocab_size), "
                             f"got {tuple(logits.shape)}")
        if batch > self.max_num_seqs:
            raise ValueError(f"{batch} rows exceed max_num_seqs={self.max_num_seqs}")
        params = [r.params for r in rows]
        penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        sampling = [p.temperature != 0 for p in params]
        if not any(sampling) and not penalised:
            return self._argmax(logits)
        # A private fp32 copy: the penalty writes into it.
        x = logits.to(torch.float32, copy=bool(penalised))
        if penalised:
            x = self._apply_repetition_penalty(x, rows, penalised)
        if not any(sampling):
            return self._argmax(x)
        return self._sample(x, rows, sampling)

    def _argmax(self, x: Tensor) -> Tensor:
        """x: [batch, vocab] -> int64 [batch]. On CUDA the split kernel: torch's reduction gives a row one block,
        which leaves the GPU idle for a few rows over a large vocabulary."""
        return argmax_triton(x) if self._use_triton else x.argmax(dim=-1)

    def _upload(self, array: np.ndarray) -> Tensor:
        """One host array -> device, asynchronously from pinned memory on CUDA (torch's caching host allocator
        keeps the buffer alive until the copy has run)."""
        host = torch.from_numpy(array)
        if self._pin:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _apply_repetition_penalty(self, x: Tensor, rows: list[SamplingRow], penalised: list[int]) -> Tensor:
        """HF RepetitionPenaltyLogitsProcessor on x (fp32 [batch, vocab], modified in place and returned): every
        token in a penalised row's prompt or output (counted once) has its logit divided by the penalty if
        positive, multiplied by it otherwise. penalised: the indices of the rows with a penalty != 1."""
        lengths = [len(rows[i].token_ids) for i in penalised]
        index = np.empty((2, sum(lengths)), dtype=np.int64)
        index[0] = np.repeat(np.asarray(penalised, dtype=np.int64), lengths)
        index[1] = np.fromiter(chain.from_iterable(rows[i].token_ids for i in penalised), dtype=np.int64,
                               count=index.shape[1])
        penalty = np.ones(len(rows), dtype=np.float32)
        penalty[penalised] = [rows[i].params.repetition_penalty for i in penalised]
        index_d, penalty_d = self._upload(index), self._upload(penalty)
        # Touch only the seen entries: O(prompt + output) work instead of passes over [batch, vocab]. Repeated
        # tokens read the original logit and write the same value, so duplicates are harmless.
        rows_d, tokens_d = index_d[0], index_d[1]
        seen = x[rows_d, tokens_d]
        row_penalty = penalty_d[rows_d]
        x[rows_d, tokens_d] = torch.where(seen > 0, seen / row_penalty, seen * row_penalty)
        return x

    def _sample(self, x: Tensor, rows: list[SamplingRow], sampling: list[bool]) -> Tensor:
        batch, vocab_size = x.shape
        params = [r.params for r in rows]
        # Greedy rows ride along with neutral parameters; their token is replaced by the argmax at the end.
        floats = np.empty((4, batch), dtype=np.float32)
        floats[0] = [p.temperature if s else 1.0 for p, s in zip(params, sampling)]
        floats[1] = [p.top_p if s and p.top_p < 1 else math.inf for p, s in zip(params, sampling)]
        floats[2] = [math.log(p.min_p) if s and p.min_p > 0 else -math.inf for p, s in zip(params, sampling)]
        floats[3] = sampling
        # Rows of an even length, so that each row of ints_d starts 16-byte aligned whatever the batch: Triton
        # compiles a kernel variant per pointer alignment, and seeds/steps would otherwise flip with its parity.
        ints = np.zeros((3, batch + batch % 2), dtype=np.int64)
        ints[0, :batch] = [p.top_k if s and 0 < p.top_k < vocab_size else vocab_size for p, s in zip(params, sampling)]
        ints[1, :batch] = [_signed64(r.seed) for r in rows]
        ints[2, :batch] = [r.step for r in rows]
        use_top_k = bool((ints[0, :batch] < vocab_size).any())
        use_top_p = bool(np.isfinite(floats[1]).any())
        use_min_p = bool(np.isfinite(floats[2]).any())
        floats_d, ints_d = self._upload(floats), self._upload(ints)[:, :batch]
        temperature, top_p, log_min_p = floats_d[0, :, None], floats_d[1, :, None], floats_d[2, :, None]
        top_k, seeds, steps = ints_d[0, :, None], ints_d[1], ints_d[2]

        greedy_tokens = self._argmax(x) if not all(sampling) else None
        # Shifting by the row max first keeps x / temperature finite for any temperature > 0; afterwards the
        # most likely token has logit exactly 0 and survives every filter.
        x = (x - x.amax(dim=-1, keepdim=True)) / temperature
        if use_top_k or use_top_p:
            x = _top_k_top_p(x, top_k, top_p, use_top_k, use_top_p)
        if use_min_p:
            # prob_i < min_p * max_prob  <=>  x_i - max_x < log(min_p), and max_x == 0.
            x = x.masked_fill(x < log_min_p, -math.inf)
        if self._use_triton:
            tokens = gumbel_argmax_triton(x, seeds, steps)
        else:
            tokens = gumbel_argmax_torch(x, row_keys(seeds, steps))
        if greedy_tokens is not None:
            tokens = torch.where(floats_d[3] > 0, tokens, greedy_tokens)
        return tokens


def _top_k_top_p(x: Tensor, top_k: Tensor, top_p: Tensor, use_top_k: bool, use_top_p: bool) -> Tensor:
    """x: fp32 [batch, vocab]; top_k: int64 [batch, 1] in 1..vocab (vocab = off); top_p: fp32 [batch, 1] (inf = off).

    Top-k keeps every token at least as likely as the k-th (ties included, as HF's TopKLogitsWarper). Top-p then
    keeps a token iff the probability of the tokens sorted before it is < top_p: the smallest prefix reaching
    top_p, never empty. The stable sort orders ties by token id, so the kept set depends on the row alone."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    if use_top_k:
        kth = sorted_x.gather(1, top_k - 1)
        sorted_x = sorted_x.masked_fill(sorted_x < kth, -math.inf)
    if use_top_p:
        probs = sorted_x.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        sorted_x = sorted_x.masked_fill(before >= top_p, -math.inf)
    return torch.empty_like(x).scatter_(1, order, sorted_x)
