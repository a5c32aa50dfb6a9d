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


def tracing(context):
    """Re-enter a saved tracing context (so a later compile sees the same symbolic shapes)."""
    from torch._guards import tracing as _tracing

    return _tracing(context)


def mode_options(mode: str) -> dict:
    """The Inductor config patches of a ``torch.compile`` mode (e.g. ``"max-autotune"``)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))
