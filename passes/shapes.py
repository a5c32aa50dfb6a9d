"""Shape helpers over Dynamo FX graphs: sizes as sympy expressions (never specialising a
SymInt) and the axis mapping of reshapes."""
from __future__ import annotations

import sympy
import torch
import torch.fx


def example_value(node):
    """The fake tensor (or tuple of them) Dynamo recorded for ``node``, or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_shape(node) -> tuple | None:
    """The shape of ``node``'s tensor value as a tuple of ints / SymInts, or None."""
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return None


def expr(size) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression, without specialising it."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def same_size(a, b) -> bool:
    """Provably equal sizes (structural sympy equality; unknown counts as different)."""
    return sympy.simplify(expr(a) - expr(b)) == 0


def static_int(size) -> int | None:
    """The size as an int if it is a plain int (or a SymInt whose expression is a constant)."""
    e = expr(size)
    return int(e) if e.is_Integer else None


def size_hint(size) -> int:
    """The traced value of a size, for decisions that are reported as taken on the traced size."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else int(size.node.expr.subs({}))
    return int(size)


def reshape_groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes whose size products are equal.

    Returns ``[(input axes, output axes), ...]`` covering both shapes in order, or None when the
    products cannot be matched symbolically. A size-1 axis joins the group that follows it.
    """
    ins, outs = [expr(s) for s in in_shape], [expr(s) for s in out_shape]
    groups, i, j = [], 0, 0
    while i < len(ins) or j < len(outs):
        gi, gj = [], []
        pi, pj = sympy.Integer(1), sympy.Integer(1)
        if i < len(ins):
            gi.append(i)
            pi *= ins[i]
            i += 1
        if j < len(outs):
            gj.append(j)
            pj *= outs[j]
            j += 1
        while sympy.simplify(pi - pj) != 0:
            # Grow the side whose product is "smaller" (divides the other); symbolic sizes
            # compare by divisibility of the expressions.
            grow_in = j >= len(outs) or (i < len(ins) and _divides(pi, pj))
            if grow_in and i < len(ins):
                gi.append(i)
                pi *= ins[i]
                i += 1
            elif j < len(outs):
                gj.append(j)
                pj *= outs[j]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _divides(a: sympy.Expr, b: sympy.Expr) -> bool:
    q = sympy.simplify(b / a)
    if q.is_Integer or q.is_Rational:
        return q > 1
    # Symbolic: a divides b when the quotient has no denominator.
    return sympy.fraction(sympy.together(q))[1] == 1
