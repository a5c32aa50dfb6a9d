"""Oracles shared by the reliability and property tests (issue 18): the masked float64 reference
that touches nothing outside the kept tiles (so NaN semantics can be compared), NaN-aware
comparisons, and the documented top-k order."""
import math

import torch

from sparse_inductor.reference import tile_ids

NAN, INF = float("nan"), float("inf")


def masked_reference(q, k, v, selected, grid, tile, scale):
    """float64 ``(out, lse)``: every query row attends to the tokens of its tile's kept tiles only
    (gathered, so nothing outside them, NaN included, is ever touched); a row with no kept tile
    gets 0 and LSE -inf. Differentiable."""
    ids = tile_ids(grid, tile)
    B, H, N, D = q.shape
    q64, k64, v64 = (x.double() for x in (q, k, v))
    outs, lses = [], []
    for b in range(B):
        for h in range(H):
            out = q64.new_zeros(N, D)
            lse = q64.new_full((N,), -INF)
            for i in range(int(ids.max()) + 1):
                rows = torch.nonzero(ids == i).flatten()
                keys = torch.nonzero(selected[b, h, i][ids]).flatten()
                if len(keys) == 0:
                    continue
                s = q64[b, h, rows] @ k64[b, h, keys].T * scale
                out = out.index_put((rows,), torch.softmax(s, -1) @ v64[b, h, keys])
                lse = lse.index_put((rows,), torch.logsumexp(s, -1))
            outs.append(out)
            lses.append(lse)
    return torch.stack(outs).view(B, H, N, D), torch.stack(lses).view(B, H, N)


def assert_same_nonfinite_and_close(got, want, tol, what, nan_exact=True):
    """Non-finite at the same places (NaN at the same places unless ``nan_exact`` is False: an LSE
    over +inf scores may be +inf or NaN), finite values within ``tol`` of the largest one."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite at different places"
    if nan_exact:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at different places"
    if finite.any():
        err = (got[finite] - want[finite]).abs().max().item()
        assert err <= tol * max(1.0, want[finite].abs().max().item()), f"{what}: max error {err:.2e}"


def reference_top_k(row, k):
    """Columns of the k highest values of a list, NaN below everything (-inf included), ties to
    the lower column, in increasing order."""
    def key(j):
        x = row[j]
        return (math.isnan(x), 0.0 if math.isnan(x) else -x, j)

    return sorted(sorted(range(len(row)), key=key)[:k])
