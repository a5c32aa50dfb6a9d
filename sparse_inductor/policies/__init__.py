"""Selection policies (DESIGN.md §3.7): how each query tile's KV tiles are chosen.

One module per policy; every policy yields the same thing, query-major block lists with a
length per row, so the kernels and the compiler pass never know which policy made them.

- :class:`TopK` — VSA's fixed budget (the default: ``sparsity(0.875)`` is ``TopK(0.875)``).
- :class:`CumulativeMass` — BSA's adaptive budget: the fewest tiles holding a share of the
  coarse attention mass.
- :class:`Window`, :class:`Temporal`, :class:`Stripe` — Sparse-vDiT's static patterns (local 3D
  window, the same spatial place in every frame, fixed global tiles); unions with ``|``.
- :class:`Full`, :class:`Skip` — every tile / nothing (the head's output is 0).
- :class:`PerHead` — one policy per head; a :class:`~sparse_inductor.plan.Plan` maps module
  paths to per-head policies.

Query sparsity (BSA's ``query_keep``) composes with any of them and is a setting of
``sparsity(...)``, not a policy: it changes which query rows are computed, not the lists.
"""
from .base import Policy, SelectionContext
from .full import Full
from .mass import CumulativeMass
from .per_head import PerHead
from .skip import Skip
from .stripe import Stripe
from .temporal import Temporal
from .topk import TopK
from .union import Union
from .window import Window

__all__ = ["CumulativeMass", "Full", "PerHead", "Policy", "SelectionContext", "Skip", "Stripe", "Temporal", "TopK",
           "Union", "Window"]
