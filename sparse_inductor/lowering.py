"""Inductor lowerings of the block-sparse ops as Triton templates.

Under ``torch.compile`` the forward and backward custom ops are rendered from the templates of
:mod:`kernel_templates.inductor_templates` (the same ``@triton.jit`` arithmetic as the eager
kernels), autotuned over a few warp/stage configurations, with the main output (``out``, or
``dK`` in the backward) written by Inductor's ``store_output`` so that pointwise epilogues fuse
into the kernel. Extra outputs (LSE; dQ and dV) are buffers allocated here and passed as mutated
inputs.

Templates are used on CUDA, and on CPU when ``torch._inductor.config.cpu_backend == "triton"``
(with ``TRITON_INTERPRET=1``; tests). Otherwise, and for float64, the op stays an extern call
to its eager implementation. If the lowering cannot be built on this torch, the op stays an
extern call too, with a warning on the ``sparse_inductor`` logger: slower, never wrong.

Registration is lazy (:func:`ensure_registered`, called by the ops' fake implementations, i.e.
whenever a graph holding the op is traced), so importing the package does not import Inductor.
"""
from __future__ import annotations

import logging

import torch

from . import _compat, triton_launch

log = logging.getLogger("sparse_inductor")

TEMPLATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FWD_NAME = "sparse_inductor_block_sparse_fwd"
BWD_NAME = "sparse_inductor_block_sparse_bwd"

_state = {"registered": False, "error": None}


def _grid(num_programs, batch, heads, meta):
    return (num_programs, batch * heads, 1)


def _configs(device_type: str, block: int, head_dim: int) -> list[dict]:
    """Launch configurations to autotune over (one under the interpreter: nothing to tune)."""
    default = triton_launch.default_config(block, head_dim)
    if device_type != "cuda":
        return [default]
    configs = [default]
    # 8 warps ran both kernels about 2x slower at 64-token blocks on the H100 (benchmarks/NOTES.md):
    # only stages are tuned there; 8 warps are tried for larger blocks.
    for warps in (4, 8) if block >= 128 else (4,):
        for stages in (2, 3, 4):
            cfg = {"num_warps": warps, "num_stages": stages}
            if cfg not in configs and not (stages == 4 and block * triton_launch.head_block(head_dim) > 64 * 128):
                configs.append(cfg)
    return configs


class _TemplateLowering:
    def __init__(self, api: _compat.InductorAPI):
        self.api = api
        self.grid = api.SymbolicGridFn(_grid)
        self._templates = {}

    def template(self, backward: bool, memory_order: tuple):
        """The template storing into a buffer with dims in ``memory_order`` (built once)."""
        from kernel_templates import inductor_templates

        key = (backward, memory_order)
        if key not in self._templates:
            name = (BWD_NAME if backward else FWD_NAME) + "_" + "".join(map(str, memory_order))
            make = inductor_templates.backward_source if backward else inductor_templates.forward_source
            self._templates[key] = self.api.triton_template(name, self.grid, make(memory_order))
        return self._templates[key]

    # ---- helpers ------------------------------------------------------------------------
    def _why_not(self, q, q_slots) -> str | None:
        device = q.get_device()
        if len(q_slots.get_size()) != 3:  # the templates index query tables per head
            return "query tables shared by the heads ([B, n]) have no template"
        if q.get_dtype() not in TEMPLATE_DTYPES:
            return f"dtype {q.get_dtype()} has no template"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and self.api.config.cpu_backend == "triton":
            return None
        return f"device {device.type} uses its own implementation"

    def _fallback(self, op, args, reason: str, warn: bool = False):
        (log.warning if warn else log.debug)("sparse_inductor: %s stays an extern call (%s)", op, reason)
        return self.api.fallback_handler(op, add_to_fallback_set=False)(*args)

    def _output_layout(self, index: int, like):
        """For output ``index``: the memory order of the layout its fake promised (``empty_like``
        of an input), and a contiguous layout of the dims in that order for the template."""
        size, stride = self.api.fake_output_size_stride(index)
        hint = self.api.hint
        # Outermost first; a tie (size-1 dims) keeps the logical order.
        order = tuple(sorted(range(4), key=lambda d: (-hint(stride[d]), d)))
        layout = self.api.FixedLayout(like.get_device(), like.get_dtype(), [size[d] for d in order])
        return order, layout

    def _logical_view(self, buffer, order):
        """The template's buffer viewed back in ``[B, H, L, D]`` order (strides as the fake's)."""
        inverse = [order.index(d) for d in range(4)]
        return self.api.lowerings[torch.ops.aten.permute.default](buffer, inverse)

    def _output_buffer(self, index: int, like):
        size, stride = self.api.fake_output_size_stride(index)
        return self.api.empty_strided(size, stride, dtype=like.get_dtype(), device=like.get_device())

    def _meta(self, q, q_slots, q_counts, kv_slots, kv_counts, scale, causal_tokens=0):
        hint = self.api.hint
        block = hint(kv_slots.get_size()[-1]) // hint(kv_counts.get_size()[-1])
        block_m = hint(q_slots.get_size()[-1]) // hint(q_counts.get_size()[-1])
        head_dim = hint(q.get_size()[3])
        meta = {
            "BLOCK": block, "BLOCK_M": block_m, "BLOCK_D": triton_launch.head_block(head_dim),
            "SM_SCALE": float(scale), **triton_launch.kernel_flags(q.get_dtype()), **triton_launch.pack_meta(),
            "CAUSAL_TOKENS": int(causal_tokens),
        }
        return meta, _configs(q.get_device().type, block, head_dim)

    def _table_generators(self, first: int, q, k, q_slots, q_counts, kv_slots, kv_counts, kv_indices,
                          lists_first: int, extra_lists: bool):
        """Valid index tensors for autotuning (random ones would read out of bounds)."""
        hint = self.api.hint
        Lq, Lk = hint(q.get_size()[2]), hint(k.get_size()[2])
        block_m = hint(q_slots.get_size()[-1]) // hint(q_counts.get_size()[-1])
        block = hint(kv_slots.get_size()[-1]) // hint(kv_counts.get_size()[-1])
        Mq, Mk = hint(q_counts.get_size()[-1]), hint(kv_counts.get_size()[-1])
        width = hint(kv_indices.get_size()[3])

        def table(fill):
            def make(node):
                size = [hint(s) for s in node.get_size()]
                out = torch.empty(size, dtype=node.get_dtype(), device=node.get_device())
                out.copy_(fill(size).to(out.dtype))
                return out
            return make

        def positions(length):
            return table(lambda size: (torch.arange(size[-1]) % length).expand(size))

        gens = {
            first: positions(Lq), first + 1: positions(Lk),
            first + 2: table(lambda size: torch.full(size, block_m)),
            first + 3: table(lambda size: torch.full(size, block)),
            lists_first: table(lambda size: torch.full(size, width)),
            lists_first + 1: table(lambda size: (torch.arange(size[-1]) % Mk).expand(size)),
        }
        if extra_lists:  # kv-major lists: about as many entries per row as the query-major ones
            gens[lists_first + 2] = table(lambda size: torch.full(size, min(width, Mq)))
            gens[lists_first + 3] = table(lambda size: (torch.arange(size[-1]) % Mq).expand(size))
        return gens

    # ---- lowerings ----------------------------------------------------------------------
    def forward(self, q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale,
                kernel_version=0, causal_tokens=0):
        op = torch.ops.sparse_inductor.block_sparse_attn_fwd.default
        args = (q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale)
        reason = self._why_not(q, q_slots)
        if reason is not None:
            return self._fallback(op, (*args, kernel_version, causal_tokens), reason)
        try:
            return self._forward(*args, causal_tokens)
        except Exception as error:  # an Inductor change must cost speed, never correctness
            return self._fallback(op, (*args, kernel_version, causal_tokens), f"template failed: {error!r}", warn=True)

    def _forward(self, q, k, v, q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices, scale,
                 causal_tokens=0):
        api = self.api
        q, k, v = (api.fixed_input(x) for x in (q, k, v))
        tables = [api.contiguous_input(t) for t in (q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks, kv_indices)]
        B, H, Lq, _ = q.get_size()
        order, layout = self._output_layout(0, q)
        lse = api.empty_strided([B, H, Lq], None, dtype=torch.float32, device=q.get_device())
        Mq = tables[2].get_size()[-1]
        meta, configs = self._meta(q, tables[0], tables[2], tables[1], tables[3], scale, causal_tokens)
        inputs = [q, k, v, lse, *tables]
        choices = []
        for cfg in configs:
            self.template(False, order).maybe_append_choice(
                choices, input_nodes=inputs, layout=layout, mutated_inputs=[lse], call_sizes=[Mq, B, H],
                **cfg, **meta)
        if not choices:
            raise RuntimeError("no template configuration could be generated")
        gens = self._table_generators(4, q, k, tables[0], tables[2], tables[1], tables[3], tables[5], 8,
                                      extra_lists=False)
        out = api.autotune(FWD_NAME, choices, inputs, layout, gens)
        return self._logical_view(out, order), lse

    def backward(self, grad_out, q, k, v, lse, delta, q_slots, kv_slots, q_counts, kv_counts,
                 kv_num_blocks, kv_indices, q_num_blocks, q_indices, scale, kernel_version=0, causal_tokens=0):
        op = torch.ops.sparse_inductor.block_sparse_attn_bwd.default
        args = (grad_out, q, k, v, lse, delta, q_slots, kv_slots, q_counts, kv_counts,
                kv_num_blocks, kv_indices, q_num_blocks, q_indices, scale)
        reason = self._why_not(q, q_slots)
        if reason is not None:
            return self._fallback(op, (*args, kernel_version, causal_tokens), reason)
        try:
            return self._backward(*args, causal_tokens)
        except Exception as error:
            return self._fallback(op, (*args, kernel_version, causal_tokens), f"template failed: {error!r}", warn=True)

    def _backward(self, grad_out, q, k, v, lse, delta, q_slots, kv_slots, q_counts, kv_counts,
                  kv_num_blocks, kv_indices, q_num_blocks, q_indices, scale, causal_tokens=0):
        api = self.api
        q, k, v, grad_out = (api.fixed_input(x) for x in (q, k, v, grad_out))
        lse, delta = api.contiguous_input(lse), api.contiguous_input(delta)
        tables = [api.contiguous_input(t) for t in (q_slots, kv_slots, q_counts, kv_counts, kv_num_blocks,
                                                    kv_indices, q_num_blocks, q_indices)]
        B, H, _, _ = q.get_size()
        order, layout = self._output_layout(1, k)
        dq, dv = self._output_buffer(0, q), self._output_buffer(2, v)
        programs = tables[2].get_size()[-1] + tables[3].get_size()[-1]
        meta, configs = self._meta(q, tables[0], tables[2], tables[1], tables[3], scale, causal_tokens)
        inputs = [q, k, v, grad_out, lse, delta, dq, dv, *tables]
        choices = []
        for cfg in configs:
            self.template(True, order).maybe_append_choice(
                choices, input_nodes=inputs, layout=layout, mutated_inputs=[dq, dv],
                call_sizes=[programs, B, H],
                **cfg, **meta)
        if not choices:
            raise RuntimeError("no template configuration could be generated")
        gens = self._table_generators(8, q, k, tables[0], tables[2], tables[1], tables[3], tables[5], 12,
                                      extra_lists=True)
        dk = api.autotune(BWD_NAME, choices, inputs, layout, gens)
        return dq, self._logical_view(dk, order), dv


def ensure_registered() -> bool:
    """Register the template lowerings once. Returns whether they are in place; if they cannot
    be built on this torch, logs a warning once and the ops stay extern calls."""
    if _state["registered"] or _state["error"] is not None:
        return _state["registered"]
    try:
        api = _compat.inductor_api()
        lowering = _TemplateLowering(api)
        api.register_lowering(torch.ops.sparse_inductor.block_sparse_attn_fwd.default,
                              type_promotion_kind=None)(lowering.forward)
        api.register_lowering(torch.ops.sparse_inductor.block_sparse_attn_bwd.default,
                              type_promotion_kind=None)(lowering.backward)
        _state["registered"] = True
    except Exception as error:  # pragma: no cover - depends on the torch version
        _state["error"] = error
        log.warning("sparse_inductor: Inductor template lowering unavailable on torch %s (%r); the block-sparse "
                    "ops run as extern calls of their eager kernels", torch.__version__, error)
    return _state["registered"]
