"""Inductor ``TritonTemplate`` sources for the block-sparse attention forward and backward.

Each source is a thin Jinja entry point plus the *source text* of the ``@triton.jit`` helpers
of :mod:`kernel_templates.block_sparse_attention`, so the template and the eager kernels run
the same arithmetic. The entry points differ from the eager ones only in their argument
plumbing (``def_kernel`` / ``size`` / ``stride``) and in storing the main output through
``store_output``, which is where Inductor fuses epilogues.
"""
import inspect

from kernel_templates import block_sparse_attention as _k


def _sources(*fns) -> str:
    return "\n\n" + "\n\n".join(inspect.getsource(fn.fn) for fn in fns)


_TABLE_STRIDES = (
    '{{stride("Q_SLOTS", 0)}}, {{stride("Q_SLOTS", 1)}}, {{stride("KV_SLOTS", 0)}}, '
    '{{stride("Q_COUNTS", 0)}}, {{stride("Q_COUNTS", 1)}}, {{stride("KV_COUNTS", 0)}}'
)


def _strides(*names: str) -> str:
    return ", ".join(f'{{{{stride("{n}", {i})}}}}' for n in names for i in range(3))


#: Index names of the output tile, in the logical ``[B, H, L, D]`` order.
OUTPUT_INDICES = ("idx_b", "idx_h", "idx_n", "idx_d")

_FORWARD = (
    '''{{def_kernel("Q", "K", "V", "LSE", "Q_SLOTS", "KV_SLOTS", "Q_COUNTS", "KV_COUNTS", "KV_NUM_BLOCKS", "KV_INDICES")}}
    H = {{size("Q", 1)}}
    m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    out, rows, offs_d, mask = fwd_tile(
        Q, K, V, LSE, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
        b, h, m, H, {{size("Q", 2)}}, {{size("Q_COUNTS", 2)}}, {{size("KV_COUNTS", 1)}}, {{size("KV_INDICES", 3)}},
        {{size("Q", 3)}}, SM_SCALE,
        ''' + _TABLE_STRIDES + ''',
        ''' + _strides("Q", "K", "V") + ''',
        BLOCK, BLOCK_M, BLOCK_D, UPCAST, IEEE, CHUNK, CAUSAL_TOKENS,
    )
    idx_b = b
    idx_h = h
    idx_n = rows[:, None]
    idx_d = offs_d[None, :]
    {{store_output(STORE_INDICES, "out", "mask", val_shape=("BLOCK_M", "BLOCK_D"))}}
'''
    + _sources(_k._dot, _k._block_rows, _k._chunk_blocks, _k._packed_rows, _k._load_rows, _k._kv_list, _k._packed_kv,
               _k._causal_block, _k._softmax_step, _k.fwd_tile)
)

_BACKWARD = (
    '''{{def_kernel("Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "DV", "Q_SLOTS", "KV_SLOTS", "Q_COUNTS", "KV_COUNTS", "KV_NUM_BLOCKS", "KV_INDICES", "Q_NUM_BLOCKS", "Q_INDICES")}}
    H = {{size("Q", 1)}}
    NUM_KV_BLOCKS = {{size("KV_COUNTS", 1)}}
    pid = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    if pid < NUM_KV_BLOCKS:
        dk, rows, offs_d, mask = dkdv_tile(
            Q, K, V, DO, LSE, DELTA, DV, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, Q_NUM_BLOCKS, Q_INDICES,
            b, h, pid, H, {{size("Q", 2)}}, NUM_KV_BLOCKS, {{size("Q_INDICES", 3)}}, {{size("Q", 3)}}, SM_SCALE,
            ''' + _TABLE_STRIDES + ''',
            ''' + _strides("Q", "K", "V", "DO", "DV") + ''',
            BLOCK, BLOCK_M, BLOCK_D, UPCAST, IEEE, CAUSAL_TOKENS,
        )
        idx_b = b
        idx_h = h
        idx_n = rows[:, None]
        idx_d = offs_d[None, :]
        {{store_output(STORE_INDICES, "dk", "mask", indent_width=8, val_shape=("BLOCK", "BLOCK_D"))}}
    else:
        dq_tile(
            Q, K, V, DO, LSE, DELTA, DQ, Q_SLOTS, KV_SLOTS, Q_COUNTS, KV_COUNTS, KV_NUM_BLOCKS, KV_INDICES,
            b, h, pid - NUM_KV_BLOCKS, H, {{size("Q", 2)}}, {{size("Q_COUNTS", 2)}}, NUM_KV_BLOCKS,
            {{size("KV_INDICES", 3)}}, {{size("Q", 3)}}, SM_SCALE,
            ''' + _TABLE_STRIDES + ''',
            ''' + _strides("Q", "K", "V", "DO", "DQ") + ''',
            BLOCK, BLOCK_M, BLOCK_D, UPCAST, IEEE, CHUNK, CAUSAL_TOKENS,
        )
'''
    + _sources(_k._dot, _k._block_rows, _k._chunk_blocks, _k._packed_rows, _k._load_rows, _k._kv_list, _k._packed_kv,
               _k._causal_block, _k._gradient_lse2, _k._dq_step, _k.dq_tile, _k._group_rows, _k._dkdv_step,
               _k.dkdv_tile)
)


def _with_store_order(source: str, memory_order) -> str:
    """The source storing its main output into a buffer whose dims are the logical ``[B, H, L, D]``
    dims in ``memory_order`` (outermost first). Inductor fuses an epilogue only when it walks the
    buffer in its own order, so the buffer is made contiguous in the order the model's layout has
    (e.g. ``[B, L, H, D]`` for ``q = x.view(B, L, H, D).transpose(1, 2)``)."""
    indices = "(" + ", ".join(f'"{OUTPUT_INDICES[d]}"' for d in memory_order) + ")"
    return source.replace("STORE_INDICES", indices)


def forward_source(memory_order=(0, 1, 2, 3)) -> str:
    return _with_store_order(_FORWARD, memory_order)


def backward_source(memory_order=(0, 1, 2, 3)) -> str:
    return _with_store_order(_BACKWARD, memory_order)
