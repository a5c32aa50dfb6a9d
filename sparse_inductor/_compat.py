"""Every private torch API the project uses, in one place, with version shims.

Supported: torch 2.11 (the GPU machine) and 2.13 (CPU development and CI). DESIGN.md §5 lists
the differences met so far.
"""
from __future__ import annotations

import torch

TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def compile_fx(gm, example_inputs, config_patches=None):
    """Inductor's entry point (``torch._inductor.compile_fx.compile_fx``)."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, config_patches=config_patches)


#: Whether Inductor compiles our rewrite of a site whose text length is data-dependent (an unbacked
#: size: Mochi keeps each sample's valid prompt tokens with ``nonzero``). torch 2.11 does not (H200,
#: 2026-12-01): CPU graphs fail in the ``cat`` lowering ("Could not guard on data-dependent
#: expression"), GPU graphs in ``simplify_loops`` ("The argument '3 - 4*((((0))//2))' is not
#: comparable"), while the same model compiles dense. torch 2.13 compiles it on CPU (its GPU path is
#: untested: no 2.13 GPU build here); 2.12 is untested, so the gate is at 2.13. Below it such sites
#: stay dense with their reason.
UNBACKED_TEXT_SUPPORTED = TORCH_VERSION >= (2, 13)


def specialize_float(value) -> float:
    """``value`` as a graph constant while Dynamo traces (a guard on its value, so each value gets
    its own graph), unchanged elsewhere. Dynamo makes a float argument that changed between calls a
    graph input (automatic dynamic floats, ``torch._dynamo.config.specialize_float = False``); our
    fractions decide table sizes and index arithmetic, which then ran per call (NOTES, ninth
    session). ``guard_scalar`` traces on torch 2.11 and 2.13; ``guard_float`` is marked skipped."""
    from torch.fx.experimental.symbolic_shapes import guard_scalar

    return guard_scalar(value) if torch.compiler.is_compiling() else value


def has_unbacked_symbols(size) -> bool:
    """Whether a size (int or SymInt) depends on a data-dependent (unbacked) symbol."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return isinstance(size, torch.SymInt) and bool(free_unbacked_symbols(size))


def custom_graph_pass_base():
    """``torch._inductor.custom_graph_pass.CustomGraphPass``: a post-grad pass whose ``uuid()``
    is part of Inductor's FX-graph cache key."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


#: The Inductor config entry that holds our cache-keying pass.
CACHE_PASS_CONFIG_KEY = "post_grad_custom_post_pass"


def current_tracing_context():
    """Dynamo's tracing context while a backend runs (fake mode, shape env), or None."""
    from torch._guards import TracingContext

    return TracingContext.try_get()


_FALLBACK_LOCK = __import__("threading").RLock()


def compile_lock():
    """Dynamo's compile lock (an ``RLock``; held while Dynamo compiles a frame, so also while our
    backend compiles a graph's first variant). Later variants compile under it too: one lock, so
    no lock-order deadlock with a Dynamo compile in another thread."""
    try:
        from torch._dynamo.convert_frame import compile_lock as lock
    except ImportError:  # pragma: no cover - moved in some version: our own lock
        return _FALLBACK_LOCK
    return lock


def tracing(context):
    """Re-enter a saved tracing context (so a later compile sees the same symbolic shapes)."""
    from torch._guards import tracing as _tracing

    return _tracing(context)


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (``FakeTensorMode``, a proxy/functional mode of a tracer)
    is active, so that tensors created now are not plain tensors."""
    return torch._C._len_torch_dispatch_stack() > 0


_USER_ERRORS: dict = {}


def user_error(kind: type, message: str) -> Exception:
    """An exception of type ``kind`` (e.g. ``ValueError``) that Dynamo lets through unwrapped when
    a backend raises it while compiling: any other exception from a backend reaches the user as
    ``BackendCompilerFailed``. (Dynamo re-raises its ``ShortenTraceback`` exceptions as they are;
    the class also derives from ``kind``, so ``except ValueError`` catches it.)"""
    cls = _USER_ERRORS.get(kind)
    if cls is None:
        try:
            from torch._dynamo.exc import ShortenTraceback
        except ImportError:  # pragma: no cover - an older or newer Dynamo: a plain exception
            cls = kind
        else:
            def __init__(self, *args):
                ShortenTraceback.__init__(self, *args, first_useful_frame=None)

            cls = type(kind.__name__, (kind, ShortenTraceback), {"__init__": __init__, "__module__": kind.__module__,
                                                                "__doc__": kind.__doc__})
        _USER_ERRORS[kind] = cls
    try:
        return cls(message)
    except TypeError:  # pragma: no cover - another ShortenTraceback signature: a plain exception
        _USER_ERRORS[kind] = kind
        return kind(message)


def functorch_grad_active() -> bool:
    """Whether a ``torch.func`` differentiation transform (``grad``, ``vjp``, ``jacrev``, ``jvp``,
    ``jacfwd``, ``hessian``...) is active: custom ops whose autograd is registered through
    ``torch.library`` cannot run under those (``vmap`` alone can, through torch's per-sample
    fallback)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def functorch_active() -> bool:
    """Whether any ``torch.func`` transform (``vmap`` included) is active: the compact TMA path's
    autograd.Functions (permutations into compact order) have no vmap rule."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def has_forward_grad(*tensors) -> bool:
    """Whether any tensor is a forward-mode AD dual (``torch.autograd.forward_ad``): custom ops
    without a forward formula would silently drop its tangent."""
    if torch.compiler.is_compiling():
        return False
    from torch.autograd.forward_ad import unpack_dual

    return any(unpack_dual(t).tangent is not None for t in tensors)


def constant_when_traced(fn):
    """``fn`` with its result taken as a constant by Dynamo, as ``torch.compiler.assume_constant_result``
    marks it: for host-side facts such as a GPU's compute capability, which a traced graph cannot
    query. The marker is the attribute that decorator sets (torch 2.11 and 2.13); setting it here
    keeps Dynamo unimported at package import (the public decorator imports it: ~1.7 s).
    ``fn``'s arguments must be Python constants."""
    fn._dynamo_marked_constant = True
    return fn


def mode_options(mode: str) -> dict:
    """The Inductor config patches of a ``torch.compile`` mode (e.g. ``"max-autotune"``)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


# --------------------------------------------------------------------------------------------
# Inductor lowering API (used by sparse_inductor.lowering only).
# --------------------------------------------------------------------------------------------
class InductorAPI:
    """The private ``torch._inductor`` names the template lowering needs, resolved once."""

    def __init__(self):
        import inspect

        import sympy
        from torch._inductor import config, ir, lowering, select_algorithm
        from torch._inductor.virtualized import V

        self.config = config
        self.sympy = sympy
        self.V = V
        self.FixedLayout = ir.FixedLayout
        self.ExternKernel = ir.ExternKernel
        self.FlexibleLayout = ir.FlexibleLayout
        self.register_lowering = lowering.register_lowering
        self.fallback_handler = lowering.fallback_handler
        self.empty_strided = lowering.empty_strided
        self.lowerings = lowering.lowerings
        self.TritonTemplate = select_algorithm.TritonTemplate
        self.SymbolicGridFn = select_algorithm.SymbolicGridFn
        self._autotune = select_algorithm.autotune_select_algorithm
        self._template_takes_freeze = "always_freeze_layout" in inspect.signature(
            select_algorithm.TritonTemplate.__init__).parameters

    def triton_template(self, name: str, grid, source: str):
        # 2.13 grew ``always_freeze_layout``; our lowering freezes its inputs itself either way.
        extra = {"always_freeze_layout": True} if self._template_takes_freeze else {}
        return self.TritonTemplate(name=name, grid=grid, source=source, **extra)

    def autotune(self, name, choices, input_nodes, layout, input_gen_fns):
        """``autotune_select_algorithm``: a node in 2.11, ``(node, choice)`` in 2.13."""
        result = self._autotune(name, choices, input_nodes, layout, input_gen_fns=input_gen_fns)
        return result[0] if isinstance(result, tuple) else result

    def hint(self, expr) -> int:
        """An int for a (possibly symbolic) size: ``optimization_hint`` exists in 2.11 and 2.13
        (``size_hint`` is gone in 2.13)."""
        return int(self.V.graph.sizevars.optimization_hint(expr))

    def fake_output_size_stride(self, index: int):
        """Sizes and strides (sympy) of output ``index`` of the FX node being lowered, as its
        fake implementation computed them; the template's layout must match them."""
        fake = self.V.graph.current_node.meta["val"][index]

        def expr(s):
            return s.node.expr if isinstance(s, torch.SymInt) else self.sympy.Integer(s)

        return [expr(s) for s in fake.shape], [expr(s) for s in fake.stride()]

    def fixed_input(self, x):
        """Realize ``x`` with a unit last stride and freeze its layout, so the template's strides
        are final."""
        x = self.ExternKernel.require_stride1(self.ExternKernel.realize_input(x))
        if isinstance(x.get_layout(), self.FlexibleLayout):
            x.freeze_layout()
        return x

    def contiguous_input(self, x):
        x = self.ExternKernel.require_contiguous(self.ExternKernel.realize_input(x))
        if isinstance(x.get_layout(), self.FlexibleLayout):
            x.freeze_layout()
        return x


def inductor_api() -> InductorAPI:
    return InductorAPI()


# --------------------------------------------------------------------------------------------
# Functional collectives (torch.distributed._functional_collectives) in Dynamo graphs.
# --------------------------------------------------------------------------------------------
# 2.13 records every functional collective in ``_c10d_functional`` (its ops gained autograd); older
# versions record the autograd variants (``all_to_all_single_autograd``) in ``_c10d_functional_autograd``.
_FUNCTIONAL_COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")


def functional_collective_name(target) -> str | None:
    """The op name (``"all_to_all_single"``, ``"wait_tensor"``, ``"all_gather_into_tensor"``...)
    of a functional-collective FX target (an op overload or its packet), else None."""
    packet = getattr(target, "_overloadpacket", target)  # an OpOverload -> its OpOverloadPacket
    qualified = getattr(packet, "_qualified_op_name", None)
    if not isinstance(qualified, str):
        return None
    namespace, _, name = qualified.partition("::")
    return name if namespace in _FUNCTIONAL_COLLECTIVE_NAMESPACES else None


def process_group_rank_and_size(group_name) -> tuple[int, int] | None:
    """``(this process's rank in it, its size)`` for the process group a functional collective
    names (``_resolve_process_group``), or None if it cannot be resolved here."""
    import torch.distributed as dist

    if not isinstance(group_name, str) or not dist.is_available() or not dist.is_initialized():
        return None
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group_name)
        return dist.get_rank(group), dist.get_world_size(group)
    except (ImportError, LookupError, ValueError, RuntimeError):
        return None
