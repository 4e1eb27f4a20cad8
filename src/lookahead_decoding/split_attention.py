"""Split-KV attention for steps of few query rows: the cache is cut into spans that the device reads in parallel.

A decoding step has one query per row (a lookahead step a few dozen), so a flash-attention kernel that tiles the
queries gets one tile per KV head: at batch 1 a handful of the device's 132 multiprocessors read the whole cache
while the rest idle (cuDNN's flash kernel spent 22 µs a layer on one query over 1,152 slots in Llama-3-8B's shape,
docs/benchmarks.md). Here each (row, KV head) has one program per span of the cache and per block of up to 64 of
its folded query rows; every span yields its rows' running maximum, sum of exponentials and weighted values, and
a second kernel combines the spans into the softmax over the whole cache (the flash-decoding scheme). The query
heads that share a KV head are folded into the query rows as in `attention.py`, so K and V are read once per KV
head.

The step's mask is an additive one (the engine's, `model_adapter.attention_mask`) or a boolean one, with one row
per query, one per folded query row, or one for all, read in place: nothing is expanded or copied. The kernels are
Triton's; without Triton (or off CUDA) `attention.py` keeps SDPA. `TRITON_INTERPRET=1` runs them on the CPU (tests).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only torch): attention.py uses SDPA
    triton = None

SLOTS_PER_BLOCK = 64  # cache slots one loop iteration reads
ROWS_PER_PROGRAM = 64  # folded query rows one program attends for (more rows: more programs per span)
# Folded query rows × head dims per KV head up to which the kernel beat cuDNN's flash kernel (H100, bf16,
# docs/benchmarks.md): SmolLM2's 64 dims won at every row count to 252, Llama-3-8B's 128 dims to 128 rows and lost
# from 192 on, where cuDNN's query tiles fill the device themselves.
MAX_QUERY_ELEMENTS = 16_384
PROGRAMS_WANTED = 256  # about two waves over an H100's or H200's 132 multiprocessors; spans are split to reach it
DEVICES = ("cuda",)  # where `applies` sends calls here; the tests add "cpu" under TRITON_INTERPRET=1


def capable(device: torch.device) -> bool:
    """A CUDA device of compute capability 8.0 or more (Ampere on: Triton's bf16 dot products need it, and the kernel
    was measured on Hopper only); any other device the tests send here."""
    return device.type != "cuda" or torch.cuda.get_device_properties(device).major >= 8


def applies(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether `split_kv_attention` serves this call: Triton present, the tensors on a capable CUDA device, few
    folded query rows (at most `MAX_QUERY_ELEMENTS` with their head dims), and a mask of [B or 1, 1, rows, L] that is
    additive or boolean."""
    folded_rows = query.shape[2] * (query.shape[1] // key.shape[1])
    return (triton is not None and query.device.type in DEVICES and capable(query.device)
            and folded_rows * query.shape[-1] <= MAX_QUERY_ELEMENTS
            and query.shape[1] % key.shape[1] == 0 and mask.dim() == 4 and mask.shape[1] == 1
            and mask.shape[-1] == key.shape[2] and (mask.dtype == torch.bool or mask.is_floating_point()))


def mask_for_heads(mask: torch.Tensor, length: int, groups: int) -> torch.Tensor:
    """The rows of a step's mask [B or 1, 1, R, L] for `length` queries of heads with `groups` query heads per KV
    head: as it is with one row, one per query or one per folded row; a mask folded for other heads (another group
    count, `model_adapter` folds once per forward) is cut to its first `length` rows, which are the mask."""
    return mask if mask.shape[2] in (1, length, groups * length) else mask[:, :, :length]


def dot_size(size: int) -> int:
    """A block dimension for `size` elements: a power of two, at least the 16 that tl.dot takes."""
    return max(16, triton.next_power_of_2(size))


def split_kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                       scaling: float | None) -> torch.Tensor:
    """Attention of query [B, H, Q, D] over key/value [B, H_kv, L, D] under `mask` [B or 1, 1, R, L] with R one of
    Q, groups · Q (folded) or 1, or folded for other heads (its first Q rows are the mask); additive, or boolean:
    True attends. Returns [B, Q, H, D], the layout attention functions return."""
    batch, heads, length, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    folded_rows = groups * length
    mask = mask_for_heads(mask, length, groups)
    row_block = min(ROWS_PER_PROGRAM, dot_size(folded_rows))
    row_blocks = triton.cdiv(folded_rows, row_block)
    units = batch * kv_heads
    blocks = triton.cdiv(slots, SLOTS_PER_BLOCK)
    splits = max(1, min(blocks, PROGRAMS_WANTED // (units * row_blocks)))
    blocks_per_split = triton.cdiv(blocks, splits)
    splits = triton.cdiv(blocks, blocks_per_split)
    output = torch.empty(batch, length, heads, value.shape[-1], dtype=query.dtype, device=query.device)
    partial_shape = (units, splits, row_blocks * row_block)
    partial_max = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
    value_block = dot_size(value.shape[-1])
    partial_values = torch.empty(*partial_shape, value_block, dtype=torch.float32, device=query.device)
    scale = 1.0 / math.sqrt(dim) if scaling is None else scaling
    mask_batch_stride = 0 if mask.shape[0] == 1 else mask.stride(0)
    mask_row_stride = 0 if mask.shape[2] == 1 else mask.stride(2)
    _span_kernel[(units, splits, row_blocks)](
        query, key, value, mask, output, partial_max, partial_sum, partial_values,
        *query.stride(), *key.stride(), *value.stride(), mask_batch_stride, mask_row_stride, mask.stride(3),
        *output.stride()[:3],
        kv_heads, groups, length, folded_rows, mask.shape[2], slots, dim, value.shape[-1], scale,
        blocks_per_split * SLOTS_PER_BLOCK,
        DIM=dot_size(dim), BLOCK=SLOTS_PER_BLOCK, BOOLEAN_MASK=mask.dtype == torch.bool,
        FP32=query.dtype == torch.float32, SINGLE=splits == 1, ROWS=row_block, VALUE_DIM=value_block)
    if splits > 1:
        _combine_kernel[(units, folded_rows)](
            partial_max, partial_sum, partial_values, output, *output.stride()[:3],
            kv_heads, groups, length, value.shape[-1], splits, row_blocks * row_block,
            SPLITS=triton.next_power_of_2(splits), VALUE_DIM=value_block)
    return output


if triton is not None:
    # Triton compiles a kernel apart for each integer argument equal to 1 or divisible by 16 unless told not to:
    # these vary with the step's shape and width, and knowing them gains nothing, so one compilation serves all.
    @triton.jit(do_not_specialize=["length", "folded_rows", "mask_rows", "slots", "span"])
    def _span_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, max_ptr, sum_ptr, values_ptr,
                     q_sb, q_sh, q_sq, q_sd, k_sb, k_sh, k_sl, k_sd, v_sb, v_sh, v_sl, v_sd,
                     m_sb, m_sr, m_sl, o_sb, o_sq, o_sh,
                     kv_heads, groups, length, folded_rows, mask_rows, slots, dim, value_dim, scale, span,
                     ROWS: tl.constexpr, DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK: tl.constexpr,
                     BOOLEAN_MASK: tl.constexpr, FP32: tl.constexpr, SINGLE: tl.constexpr):
        """One (row, KV head), one span of the cache and one block of ROWS folded query rows: their running max,
        sum and weighted values (folded row r is query head h_kv · groups + r // length at position r % length)."""
        unit = tl.program_id(0)
        split = tl.program_id(1)
        b = unit // kv_heads
        h = unit % kv_heads
        rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        live_rows = rows < folded_rows
        group = rows // length
        position = rows % length
        dims = tl.arange(0, DIM)
        value_dims = tl.arange(0, VALUE_DIM)
        q = tl.load(q_ptr + b * q_sb + (h * groups + group)[:, None] * q_sh + position[:, None] * q_sq
                    + dims[None, :] * q_sd, mask=live_rows[:, None] & (dims[None, :] < dim), other=0.0)
        mask_row = rows % mask_rows
        running_max = tl.full([ROWS], float("-inf"), tl.float32)
        running_sum = tl.zeros([ROWS], tl.float32)
        weighted = tl.zeros([ROWS, VALUE_DIM], tl.float32)
        precision: tl.constexpr = "ieee" if FP32 else "tf32"
        start = split * span
        for offset in range(start, tl.minimum(start + span, slots), BLOCK):
            columns = offset + tl.arange(0, BLOCK)
            live_columns = columns < slots
            k = tl.load(k_ptr + b * k_sb + h * k_sh + columns[None, :] * k_sl + dims[:, None] * k_sd,
                        mask=live_columns[None, :] & (dims[:, None] < dim), other=0.0)
            scores = (tl.dot(q, k, input_precision=precision) * scale).to(tl.float32)  # scale may come as fp64
            masked = live_rows[:, None] & live_columns[None, :]
            allowed = tl.load(mask_ptr + b * m_sb + mask_row[:, None] * m_sr + columns[None, :] * m_sl, mask=masked,
                              other=0)
            if BOOLEAN_MASK:
                scores = tl.where(allowed != 0, scores, float("-inf"))
            else:
                scores = scores + allowed.to(tl.float32)
            scores = tl.where(live_columns[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with nothing allowed yet
            weights = tl.exp(scores - shift[:, None])
            decay = tl.exp(running_max - shift)
            running_sum = running_sum * decay + tl.sum(weights, 1)
            v = tl.load(v_ptr + b * v_sb + h * v_sh + columns[:, None] * v_sl + value_dims[None, :] * v_sd,
                        mask=live_columns[:, None] & (value_dims[None, :] < value_dim), other=0.0)
            weighted = weighted * decay[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=precision)
            running_max = new_max
        if SINGLE:
            total = tl.where(running_sum == 0.0, 1.0, running_sum)
            out = (out_ptr + b * o_sb + position[:, None] * o_sq + (h * groups + group)[:, None] * o_sh
                   + value_dims[None, :])
            tl.store(out, (weighted / total[:, None]).to(out_ptr.dtype.element_ty),
                     mask=live_rows[:, None] & (value_dims[None, :] < value_dim))
        else:
            partial = (unit * tl.num_programs(1) + split) * tl.num_programs(2) * ROWS + rows
            tl.store(max_ptr + partial, running_max)
            tl.store(sum_ptr + partial, running_sum)
            tl.store(values_ptr + partial[:, None] * VALUE_DIM + value_dims[None, :], weighted)

    @triton.jit(do_not_specialize=["length", "splits", "padded_rows"])
    def _combine_kernel(max_ptr, sum_ptr, values_ptr, out_ptr, o_sb, o_sq, o_sh,
                        kv_heads, groups, length, value_dim, splits, padded_rows,
                        VALUE_DIM: tl.constexpr, SPLITS: tl.constexpr):
        """The softmax of one folded query row of one (row, KV head) over every span, all spans read at once: each
        span's sums rescaled to the largest maximum."""
        unit = tl.program_id(0)
        row = tl.program_id(1)
        b = unit // kv_heads
        h = unit % kv_heads
        spans = tl.arange(0, SPLITS)
        live_spans = spans < splits
        value_dims = tl.arange(0, VALUE_DIM)
        partial = (unit * splits + spans) * padded_rows + row
        span_max = tl.load(max_ptr + partial, mask=live_spans, other=float("-inf"))
        overall_max = tl.max(span_max, 0)
        span_weight = tl.exp(span_max - tl.where(overall_max == float("-inf"), 0.0, overall_max))
        total = tl.sum(tl.load(sum_ptr + partial, mask=live_spans, other=0.0) * span_weight, 0)
        span_values = tl.load(values_ptr + partial[:, None] * VALUE_DIM + value_dims[None, :],
                              mask=live_spans[:, None], other=0.0)
        weighted = tl.sum(span_values * span_weight[:, None], 0)
        total = tl.where(total == 0.0, 1.0, total)
        out = out_ptr + b * o_sb + (row % length) * o_sq + (h * groups + row // length) * o_sh + value_dims
        tl.store(out, (weighted / total).to(out_ptr.dtype.element_ty), mask=value_dims < value_dim)
