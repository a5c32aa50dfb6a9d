"""``sparse_inductor.fidelity``: what sparsity costs in output quality, measured on a model.

For every attention site the backend would make sparse, and over the whole model:

- **recall**: the share of the dense softmax mass that the kept tiles hold, averaged over the
  video query rows (1.0 means the selection drops nothing that dense attention looks at);
  **best-k recall** is the same for the k tiles per query tile that hold the most mass, the
  most any selection of that size can reach: a low recall with a high best-k recall blames the
  coarse selection, a low best-k recall says the attention itself is not sparse;
- **kept**: the share of the dense attention's query-key pairs that are computed (so
  ``1 - kept`` is the attention FLOPs saved);
- **site rel-L2**: ``‖o_sparse − o_dense‖ / ‖o_dense‖`` of the site's output, both computed on
  the inputs the site sees in the dense model;
- **output rel-L2**: the same for the model's output, sparse model against dense model;
- **PSNR**: of a diffusion sample drawn with sparse attention against the one drawn densely
  with the same seed and noise (``sample_fn``), optionally with the first steps dense.

The site measurements come from one dense forward pass with every
``F.scaled_dot_product_attention`` call intercepted (a ``TorchFunctionMode``); each site's grid
and text span are those :func:`sparse_inductor.explain` finds. Selection and attention follow
DESIGN.md §3 (the selection is :func:`sparse_inductor.select_blocks` on the site's own q, k).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .api import select_blocks
from .attention import sparse_attention
from .config import SparsityConfig, check_sparsity, current_config, make_config, sparsity as sparsity_context
from .layout import check_grid_and_tile, tile_layout

__all__ = ["FidelityResult", "attention_recall", "fidelity", "psnr", "ssim"]

#: Score elements per chunk of query rows when the dense softmax is formed (256 MiB in fp32),
#: so that recall at tens of thousands of tokens fits in memory.
CHUNK_ELEMENTS = 1 << 26

BACKENDS = ("sparse_inductor", "eager")


# ---------------------------------------------------------------------------------------------
# Recall and related per-site measures
# ---------------------------------------------------------------------------------------------
def _one_hot_tiles(grid, tile, device, dtype) -> tuple[Tensor, Tensor]:
    """``(one_hot [N, M], counts [M])``: the tile of each raster token under ``tile``."""
    layout = tile_layout(grid, tile, device)
    token_tile = layout.scatter_index // layout.block_size
    one_hot = F.one_hot(token_tile, layout.num_video_tiles).to(dtype)
    return one_hot, layout.counts.to(torch.float64)


def _sdpa_scores_chunks(q, k, scale, attn_mask, rows: range):
    """Yield ``(row_start, row_end, softmax probabilities [B, H, rows, L])`` of dense attention
    for the query rows ``rows``, a chunk at a time."""
    B, H, L, _ = k.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(work)
    step = max(1, CHUNK_ELEMENTS // max(1, B * H * L))
    for r0 in range(rows.start, rows.stop, step):
        r1 = min(rows.stop, r0 + step)
        s = (q[:, :, r0:r1].to(work) @ kf.transpose(-1, -2)) * scale
        if attn_mask is not None:
            mask = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., r0:r1, :]
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(work)
        yield r0, r1, torch.softmax(s, dim=-1)


@dataclass
class _SiteTally:
    """Sums for one (site, tile, sparsity) that make the reported means."""

    recall_sum: float = 0.0  # kept softmax mass summed over video query rows (and batch, heads)
    oracle_sum: float = 0.0  # the same for the best k tiles per query tile (most mass)
    rows: int = 0  # video query rows x batch x heads
    kept_pairs: float = 0.0  # computed query-key pairs
    pairs: float = 0.0  # dense query-key pairs
    diff2: float = 0.0  # ‖o_sparse − o_dense‖²
    ref2: float = 0.0  # ‖o_dense‖²

    @property
    def recall(self):
        return self.recall_sum / self.rows

    @property
    def oracle(self):
        return self.oracle_sum / self.rows

    @property
    def kept(self):
        return self.kept_pairs / self.pairs

    @property
    def rel_l2(self):
        return math.sqrt(self.diff2 / self.ref2) if self.ref2 > 0 else 0.0


def call_text_span(text_span, grid, L) -> tuple[int, int]:
    """An explain() row's ``text_span`` as ints for a call with ``L`` tokens: a data-dependent
    length (shown as its symbol, e.g. ``"u0"``: Mochi's valid prompt tokens) is what the call's
    other tokens leave."""
    before, after = text_span or (0, 0)
    n_video = math.prod(grid)
    if isinstance(before, str):
        before = L - n_video - after
    if isinstance(after, str):
        after = L - n_video - before
    return before, after


def refuse_masked_sites(name: str, sites: dict) -> None:
    """fidelity() and calibrate() measure sites through the key-padding path; a site rewritten under
    a block-causal mask (diffusion forcing) would be measured without its causality: refuse it."""
    masked = [r["module"] for r in sites.values() if r.get("mask")]
    if masked:
        raise NotImplementedError(
            f"{name}: site(s) {', '.join(masked)} are rewritten under a block-causal mask (diffusion forcing), which "
            f"{name}() does not measure yet; compare the compiled model with dense directly instead")


def key_padding(attn_mask):
    """A sparse site's bool mask as the op takes it: ``(key-padding mask [B, 1, 1, L], rows)``.
    The pass rewrites a ``[B, 1, 1, L]`` mask, one broadcast over the queries, and the outer product
    ``m_i & m_j`` of one (``[B, 1, L, L]``); for those, the keys some query sees, and ``rows``
    ``[B, 1, L, 1]``: the queries that see a key (a row that sees none is 0, as in SDPA). ``rows`` is
    ``None`` for a ``[B, 1, 1, L]`` mask."""
    if attn_mask is None or attn_mask.shape[-2] == 1:
        return attn_mask, None
    return attn_mask.any(dim=-2, keepdim=True), attn_mask.any(dim=-1, keepdim=True)


def _measure_site(q, k, v, attn_mask, scale, grid, text_before, text_after, tiles, specs,
                  outputs: bool = True) -> dict:
    """Recall, kept share and output error of one site for every (tile, spec).

    ``specs``: sparsities (``TopK``) or ``(key, policy, query_keep)`` triples; results are keyed
    by ``(tile, sparsity or key)``. ``q, k, v``: ``[B, H, L, D]`` with ``L = text_before + T*H*W
    + text_after``. Text queries attend to everything and text keys are always kept (DESIGN.md
    §3.5), so recall counts the video query rows, with their text mass as kept. Query rows that
    ``query_keep`` drops compute nothing (their output is copied), which the kept share counts.
    """
    from .policies import TopK

    B, H, L, D = q.shape
    N = math.prod(grid)
    tb = text_before
    scale = D ** -0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    one_hots = {tile: _one_hot_tiles(grid, tile, q.device, work) for tile in tiles}
    # mass[tile][b, h, i, j]: softmax mass of the rows of query tile i on the keys of KV tile j.
    mass = {tile: torch.zeros(B, H, oh.shape[1], oh.shape[1], dtype=torch.float64, device=q.device)
            for tile, (oh, _) in one_hots.items()}
    text_mass = torch.zeros((), dtype=torch.float64, device=q.device)
    for r0, r1, p in _sdpa_scores_chunks(q, k, scale, attn_mask, range(tb, tb + N)):
        p_video = p[..., tb:tb + N]
        text_mass += (p.sum(-1) - p_video.sum(-1)).sum(dtype=torch.float64)
        for tile, (one_hot, _) in one_hots.items():
            per_key_tile = p_video @ one_hot  # [B, H, rows, M]
            rows_tile = one_hot[r0 - tb:r1 - tb]  # [rows, M]
            mass[tile] += (rows_tile.transpose(0, 1) @ per_key_tile).to(torch.float64)

    if outputs:
        dense64 = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).to(torch.float64)
        ref2 = float((dense64 ** 2).sum())
    else:
        ref2 = 0.0
    qv, kv = q[:, :, tb:tb + N], k[:, :, tb:tb + N]
    results = {}
    for tile in tiles:
        counts = one_hots[tile][1]
        layout = tile_layout(grid, tile, q.device, text_before=text_before, text_after=text_after)
        # The best any choice of as many tiles per query tile can do: that many with the most mass.
        best = torch.cumsum(mass[tile].sort(dim=-1, descending=True).values, dim=-1)
        for spec in specs:
            key, policy, query_keep = (spec, TopK(spec), 1.0) if isinstance(spec, numbers.Real) else spec
            selection = select_blocks(qv, kv, grid, policy=policy, query_keep=query_keep, tile=tile, scale=scale)
            kept = selection.dense_mask()
            kept64 = kept.to(torch.float64)
            tally = _SiteTally(ref2=ref2, rows=B * H * N, pairs=float(B * H * L * L))
            tally.recall_sum = float(text_mass + (mass[tile] * kept64).sum())
            n_keep = kept.sum(-1, keepdim=True)  # [B, H, M, 1]
            tally.oracle_sum = float(text_mass + torch.where(
                n_keep > 0, best.gather(-1, (n_keep - 1).clamp(min=0)), 0).sum())
            rows = counts if selection.query_counts is None else selection.query_counts.to(torch.float64)
            kept_keys = (kept64 * counts).sum(-1) + (L - N)  # [B, H, M]: video + text keys per video row
            if policy.skip_heads(H) != (False,) * H:
                kept_keys = torch.where(torch.tensor(policy.skip_heads(H), device=q.device).view(1, H, 1), 0,
                                        kept_keys)
            text_rows = (L - N) * L * (B * H - B * sum(policy.skip_heads(H)))
            tally.kept_pairs = float((kept_keys * rows).sum()) + text_rows
            if outputs:
                key_mask, rows_with_keys = key_padding(attn_mask)
                sparse_out = sparse_attention(q, k, v, grid, policy=policy, query_keep=query_keep, tile=tile,
                                              scale=scale, text_before=text_before, text_after=text_after,
                                              key_padding_mask=key_mask, layout=layout)
                if rows_with_keys is not None:
                    sparse_out = torch.where(rows_with_keys, sparse_out, 0)
                tally.diff2 = float(((sparse_out.to(torch.float64) - dense64) ** 2).sum())
            results[(tile, key)] = tally
    return results


def attention_recall(q: Tensor, k: Tensor, grid, *, sparsity: float, tile=(4, 4, 4),
                     scale: float | None = None) -> float:
    """The share of dense softmax attention mass that the tiles kept at ``sparsity`` hold.

    For every query token: the sum of ``softmax(q kᵀ · scale)`` over the keys of the KV tiles
    its query tile keeps (:func:`sparse_inductor.select_blocks`); the mean over tokens, batch
    and heads. 1.0 at ``sparsity=0``; never increases with ``sparsity`` (the kept sets nest).

    Args:
        q, k: ``[B, H, N, D]`` in raster token order over ``grid``.
        grid: ``(T, H, W)`` with ``T * H * W == N``.
        sparsity: in ``[0, 1)``.
        tile: tile shape.
        scale: softmax scale, default ``1 / sqrt(D)``.
    """
    grid, tile = check_grid_and_tile(grid, tile)
    sparsity = check_sparsity(sparsity)
    select_blocks(q, k, grid, sparsity=sparsity, tile=tile)  # validates shapes, dtypes, N
    with torch.no_grad():
        tally = _measure_site(q, k, None, None, scale, grid, 0, 0, [tile], [sparsity], outputs=False)
    return tally[(tile, sparsity)].recall


def psnr(x: Tensor, ref: Tensor, peak: float = 1.0) -> float:
    """``10 log10(peak² / MSE)`` over all elements, in dB (``inf`` when ``x`` equals ``ref``)."""
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    mse = float(((x.to(torch.float64) - ref.to(torch.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def ssim(x: Tensor, ref: Tensor, peak: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01,
    K2 = 0.03) of images or videos ``[B, C, (T,) H, W]``, frame by frame and channel by channel;
    1.0 when equal. Frames smaller than the window use a window cut to their size."""
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.dim() not in (4, 5):
        raise ValueError(f"ssim: expected [B, C, H, W] or [B, C, T, H, W], got shape {tuple(x.shape)}")
    a, b = (t.to(torch.float64) for t in (x, ref))
    if a.dim() == 5:  # frames as images
        a, b = (t.transpose(1, 2).reshape(-1, t.shape[1], *t.shape[3:]) for t in (a, b))
    n, c, h, w = a.shape
    size = min(11, h, w)
    coords = torch.arange(size, dtype=torch.float64, device=a.device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


# ---------------------------------------------------------------------------------------------
# Intercepting the model's SDPA calls
# ---------------------------------------------------------------------------------------------
def _bind_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, enable_gqa=enable_gqa)


class _SDPAInterceptor(TorchFunctionMode):
    """Routes the n-th ``F.scaled_dot_product_attention`` call of one model call to
    ``handler(n, arguments)``; everything else runs unchanged."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            index = self.count
            self.count += 1
            return self.handler(index, _bind_sdpa(*args, **(kwargs or {})))
        return func(*args, **(kwargs or {}))


def _plain_sdpa(call):
    return F.scaled_dot_product_attention(**call)


class _EagerSparseModel:
    """Calls the model with its sparse sites replaced by the eager op, at the ``sparsity(...)``
    config in force at call time (as a model compiled with the backend would)."""

    def __init__(self, model, sites: dict, num_calls: int):
        self.model, self.sites, self.num_calls = model, sites, num_calls

    def _handle(self, index, call):
        site = self.sites.get(index)
        if site is None:
            return _plain_sdpa(call)
        cfg = current_config()
        policy = cfg.policy_for("" if site["module"] == "<top>" else site["module"])
        if policy.is_dense() and cfg.query_keep == 1.0:
            return _plain_sdpa(call)
        before, after = call_text_span(site["text_span"], site["grid"], call["query"].shape[2])
        key_mask, rows_with_keys = key_padding(call["attn_mask"])
        out = sparse_attention(call["query"], call["key"], call["value"], site["grid"], policy=policy,
                               query_keep=cfg.query_keep, tile=cfg.tile, scale=call["scale"], text_before=before,
                               text_after=after, key_padding_mask=key_mask,
                               layout=tile_layout(site["grid"], cfg.tile, call["query"].device,
                                                  text_before=before, text_after=after))
        return out if rows_with_keys is None else torch.where(rows_with_keys, out, 0)

    def __call__(self, *args, **kwargs):
        with _SDPAInterceptor(self._handle) as mode:
            out = self.model(*args, **kwargs)
        _check_count(mode.count, self.num_calls)
        return out

    def __getattr__(self, name):  # sample functions may read e.g. ``model.config``
        return getattr(self.model, name)


def _check_count(calls: int, sites: int):
    if calls != sites:
        raise RuntimeError(
            f"fidelity: the model made {calls} scaled_dot_product_attention call(s) in one call, but "
            f"explain() found {sites} site(s); sites are matched to calls by order, so the model must make "
            "the same calls as when it was explained (same inputs' shapes, no data-dependent branches)")


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------
def _fmt(x, spec):
    if x is None:
        return ""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


@dataclass
class FidelityResult:
    """What :func:`fidelity` measured. Printing gives two markdown tables.

    Attributes:
        rows: one dict per (tile, setting): ``tile``, ``setting`` (its label), ``sparsity``
            (TopK's, else None), ``kept`` (attention FLOPs kept, from the lists), ``recall`` (mean
            over all video query rows of all sparse sites), ``recall_min`` (of the worst site),
            ``recall_best_k`` (per query tile, as many tiles as it keeps but those with the most
            mass), ``site_rel_l2`` (mean over sites), ``rel_l2`` (model output), ``psnr`` and
            ``ssim`` (``{dense warm-up steps: value}``; empty without ``sample_fn``) and
            ``kept_sampling`` (``{warm-up: FLOPs kept over the whole sample}``, dense steps in full).
        site_rows: one dict per (tile, setting, site): ``tile``, ``setting``, ``sparsity``,
            ``module``, ``grid``, ``kept``, ``recall``, ``recall_best_k``, ``rel_l2``.
        sites: the :func:`sparse_inductor.explain` rows of the sparse sites that were measured.
        backend: ``"sparse_inductor"`` or ``"eager"``.
    """

    rows: list = field(default_factory=list)
    site_rows: list = field(default_factory=list)
    sites: list = field(default_factory=list)
    backend: str = "sparse_inductor"

    def row(self, setting, tile=(4, 4, 4)) -> dict:
        """The overall row of ``(tile, setting)``: a sparsity, or a setting's label."""
        for r in self.rows:
            if r["tile"] == tuple(tile) and (r["setting"] == setting or (
                    isinstance(setting, numbers.Real) and r["sparsity"] == setting and r["setting"] == str(setting))):
                return r
        raise KeyError(f"no row for setting {setting!r} and tile {tuple(tile)}")

    def table(self) -> str:
        """The overall rows as a markdown table."""
        warmups = sorted({w for r in self.rows for w in r["psnr"]})
        head = ["tile", "setting", "FLOPs kept", "recall (mean)", "recall (worst site)", "best-k recall",
                "site rel-L2 (mean)", "output rel-L2"] + [f"PSNR dB (dense first {w})" for w in warmups] + \
            [f"SSIM (dense first {w})" for w in warmups]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [str(r["tile"]), r["setting"], _fmt(r["kept"], ".3f"), _fmt(r["recall"], ".4f"),
                     _fmt(r["recall_min"], ".4f"), _fmt(r["recall_best_k"], ".4f"), _fmt(r["site_rel_l2"], ".3e"),
                     _fmt(r["rel_l2"], ".3e")]
            cells += [_fmt(r["psnr"].get(w), ".2f") for w in warmups]
            cells += [_fmt(r["ssim"].get(w), ".4f") for w in warmups]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def site_table(self) -> str:
        """The per-site rows as a markdown table."""
        lines = ["| tile | setting | site | grid | FLOPs kept | recall | best-k recall | rel-L2 |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.site_rows:
            lines.append(f"| {r['tile']} | {r['setting']} | {r['module']} | {r['grid']} | {r['kept']:.3f} | "
                         f"{r['recall']:.4f} | {r['recall_best_k']:.4f} | {r['rel_l2']:.3e} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready (tiles as lists, PSNR keys as strings, ``inf`` kept as a float)."""
        def clean(r):
            r = dict(r)
            r["tile"] = list(r["tile"])
            if "grid" in r:
                r["grid"] = list(r["grid"])
            for name in ("psnr", "ssim", "kept_sampling"):
                if name in r:
                    r[name] = {str(k): v for k, v in r[name].items()}
            return r

        return {"backend": self.backend, "rows": [clean(r) for r in self.rows],
                "site_rows": [clean(r) for r in self.site_rows],
                "sites": [{"module": s["module"], "grid": list(s["grid"]), "text_span": s["text_span"]}
                          for s in self.sites]}

    def __str__(self):
        return (f"fidelity ({self.backend}): {len(self.sites)} sparse attention site(s)\n\n{self.table()}\n\n"
                f"{self.site_table()}")

    __repr__ = __str__


# ---------------------------------------------------------------------------------------------
# fidelity()
# ---------------------------------------------------------------------------------------------
def _tensors(out) -> list[Tensor]:
    """The floating-point tensors of a model output (a tensor, tuple/list, dict, or an object
    with ``to_tuple()`` like diffusers' outputs), in a fixed order."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for key in out for t in _tensors(out[key])]
    if hasattr(out, "to_tuple"):
        return _tensors(out.to_tuple())
    return []


def _rel_l2(out, ref) -> float:
    got, want = _tensors(out), _tensors(ref)
    if not want or len(got) != len(want):
        raise ValueError("fidelity: the model output holds no floating-point tensor to compare")
    diff2 = sum(float(((a.to(torch.float64) - b.to(torch.float64)) ** 2).sum()) for a, b in zip(got, want))
    ref2 = sum(float((b.to(torch.float64) ** 2).sum()) for b in want)
    return math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2)


def _check_args(sparsities, settings, tiles, warmup_steps, backend, sample_fn, peak, min_tokens):
    if settings is None:
        if isinstance(sparsities, numbers.Real) or not len(sparsities):
            raise ValueError(f"sparsities must be a non-empty list of numbers in [0, 1), got {sparsities!r}")
        sparsities = [check_sparsity(s, "sparsities[]") for s in sparsities]
        settings = [(s, str(s), {"sparsity": s}) for s in sparsities]
    else:
        if isinstance(settings, dict) or not len(settings):
            raise ValueError("settings must be a non-empty list of dicts of sparsity() keywords (or (label, dict) "
                             f"pairs), e.g. [{{'policy': CumulativeMass(0.9)}}], got {settings!r}")
        checked = []
        for item in settings:
            label, setting = item if isinstance(item, tuple) else (None, item)
            if not isinstance(setting, dict):
                raise ValueError(f"settings[] must be dicts of sparsity() keywords, got {setting!r}")
            make_config(SparsityConfig(), **setting)  # validates the keywords and values
            label = label or _label(setting)
            checked.append((label, label, dict(setting)))
        if len({c[0] for c in checked}) != len(checked):
            raise ValueError("settings must have distinct labels")
        settings = checked
    if not tiles or (isinstance(tiles, tuple) and len(tiles) == 3 and all(isinstance(t, int) for t in tiles)):
        raise ValueError(f"tiles must be a non-empty list of tile shapes such as [(4, 4, 4)], got {tiles!r}")
    tiles = [check_grid_and_tile((1, 1, 1), t)[1] for t in tiles]
    if isinstance(warmup_steps, int) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0
                                                for w in warmup_steps) or not len(warmup_steps):
        raise ValueError(f"warmup_steps must be a non-empty list of ints >= 0 (dense denoising steps at the "
                         f"start of sampling), got {warmup_steps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if sample_fn is not None and not callable(sample_fn):
        raise ValueError("sample_fn must be None or a callable sample_fn(model, step_context) -> Tensor")
    if isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not peak > 0:
        raise ValueError(f"peak must be a positive number (the signal range of the samples), got {peak!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be a non-negative int, got {min_tokens!r}")
    return settings, tiles, list(warmup_steps)


def _label(setting: dict) -> str:
    """A short name of a setting: its policy (or sparsity), query_keep, plan, layers."""
    parts = []
    if "policy" in setting and setting["policy"] is not None:
        parts.append(setting["policy"].describe())
    elif "sparsity" in setting:
        parts.append(f"TopK({setting['sparsity']})")
    if setting.get("plan") is not None:
        parts.append(f"plan({len(setting['plan'].sites)} sites)")
    if setting.get("query_keep", 1.0) != 1.0:
        parts.append(f"query_keep={setting['query_keep']}")
    if setting.get("layers"):
        parts.append(f"layers={len(setting['layers'])}")
    return " ".join(parts) or "default"


def fidelity(model, *inputs, sparsities=(0.5, 0.75, 0.875, 0.9375), settings=None, tiles=((4, 4, 4),),
             warmup_steps=(0,), sample_fn=None, backend: str = "sparse_inductor", min_tokens: int = 0, grid=None,
             kwargs: dict | None = None, peak: float = 1.0, seed: int = 0) -> FidelityResult:
    """Measure what block-sparse attention costs on ``model(*inputs, **kwargs)``.

    Args:
        model: the model (an ``nn.Module`` or a compiled one; its eager original is used).
            Put it in eval mode first; it runs without gradients.
        *inputs: the model's positional inputs (e.g. noised latents and a timestep).
        sparsities: the sparsities to measure, each in ``[0, 1)`` (``TopK``).
        settings: instead of ``sparsities``, a list of dicts of :func:`sparse_inductor.sparsity`
            keywords (``policy``, ``query_keep``, ``plan``, ``layers``, ``sparsity``), or
            ``(label, dict)`` pairs, e.g. ``[{"policy": CumulativeMass(0.9)}, {"sparsity": 0.875,
            "query_keep": 0.5}]``; rows are labelled by ``setting``.
        tiles: tile shapes to measure, e.g. ``[(4, 4, 4), (1, 8, 8)]``.
        warmup_steps: for ``sample_fn``: numbers of leading denoising steps run dense.
        sample_fn: ``sample_fn(model, step_context) -> Tensor`` draws a sample with the model it
            is given, entering ``step_context(i)`` around denoising step ``i`` (that context
            makes the warm-up steps dense). It must draw its noise from a fixed seed, or from
            the global RNG, which is seeded with ``seed`` before each call. ``None``: no PSNR.
        backend: ``"sparse_inductor"`` measures the model compiled with the backend (one
            compiled variant per tile and sparsity); ``"eager"`` replaces the sparse sites'
            SDPA calls by the eager op (same semantics, no compilation: quick sweeps).
        min_tokens: sites with fewer video tokens stay dense (0: measure every eligible site).
        grid: ``(T, H, W)`` for sites whose grid the graph does not show (see ``sparsity()``).
        kwargs: keyword inputs of the model.
        peak: signal range of the samples for PSNR (1.0 for samples in ``[0, 1]``).
        seed: global RNG seed set before each ``sample_fn`` call.

    Returns:
        A :class:`FidelityResult`; ``print()`` it for the tables.

    Like :func:`sparse_inductor.explain`, this resets Dynamo's caches, so other compiled models
    recompile on their next call.
    """
    from .backend import sparse_inductor_backend
    from .explain import explain

    settings, tiles, warmups = _check_args(sparsities, settings, tiles, warmup_steps, backend, sample_fn, peak,
                                           min_tokens)
    kwargs = dict(kwargs or {})
    model = getattr(model, "_orig_mod", model)
    common = dict(min_tokens=min_tokens, grid=grid)

    # 1. Which SDPA calls are sparse sites, with their grids (decided at a non-zero sparsity).
    with torch.no_grad(), sparsity_context(0.5, tile=tiles[0], **common):
        explanation = explain(model, *inputs, **kwargs)
    site_rows = list(explanation.rows)
    sites = {i: row for i, row in enumerate(site_rows) if row["decision"] == "sparse"}
    if not sites:
        raise ValueError("fidelity: no attention site would be sparse; explain() says:\n" + str(explanation))
    refuse_masked_sites("fidelity", sites)

    def specs_for(site, tile):
        """``(key, policy, query_keep)`` of every setting at this site (its own policy under
        layers= or a plan)."""
        out = []
        for key, _, setting in settings:
            cfg = make_config(SparsityConfig(tile=tile), **setting)
            policy = cfg.policy_for("" if site["module"] == "<top>" else site["module"])
            out.append((key, policy, cfg.query_keep))
        return out

    # 2. One dense forward: measure every sparse site on the inputs it sees there.
    tallies: dict = {}

    def measure(index, call):
        site = sites.get(index)
        if site is not None:
            before, after = call_text_span(site["text_span"], site["grid"], call["query"].shape[2])
            tallies[index] = {}
            for tile in tiles:
                tallies[index].update(_measure_site(call["query"], call["key"], call["value"], call["attn_mask"],
                                                    call["scale"], site["grid"], before, after, [tile],
                                                    specs_for(site, tile)))
        return _plain_sdpa(call)

    with torch.no_grad(), _SDPAInterceptor(measure) as mode:
        model(*inputs, **kwargs)
    _check_count(mode.count, len(site_rows))

    # 3. The model's output and samples, sparse against dense.
    if backend == "sparse_inductor":
        runner = torch.compile(model, backend=sparse_inductor_backend)
    else:
        runner = _EagerSparseModel(model, sites, len(site_rows))
    steps = [0]  # denoising steps of sample_fn, counted on the dense draw

    def step_context_for(warmup):
        def step_context(i):
            steps[0] = max(steps[0], i + 1)
            return sparsity_context(0.0) if i < warmup else contextlib.nullcontext()
        return step_context

    def draw(warmup):
        torch.manual_seed(seed)
        return sample_fn(runner, step_context_for(warmup))

    with torch.no_grad():
        with sparsity_context(0.0, tile=tiles[0], **common):
            dense_out = runner(*inputs, **kwargs)
            dense_sample = draw(0) if sample_fn is not None else None
        result = FidelityResult(sites=list(sites.values()), backend=backend)
        for tile in tiles:
            for key, label, setting in settings:
                with sparsity_context(tile=tile, **common), sparsity_context(**setting):
                    rel = _rel_l2(runner(*inputs, **kwargs), dense_out)
                    samples = {w: draw(w) for w in warmups} if sample_fn is not None else {}
                per_site = [tallies[i][(tile, key)] for i in sites]
                for i, tally in zip(sites, per_site):
                    result.site_rows.append(dict(tile=tile, sparsity=setting.get("sparsity"), setting=label,
                                                 module=sites[i]["module"], grid=tuple(sites[i]["grid"]),
                                                 kept=tally.kept, recall=tally.recall,
                                                 recall_best_k=tally.oracle, rel_l2=tally.rel_l2))
                kept = sum(t.kept_pairs for t in per_site) / sum(t.pairs for t in per_site)
                S = max(steps[0], 1)
                result.rows.append(dict(
                    tile=tile, sparsity=setting.get("sparsity") if "policy" not in setting else None, setting=label,
                    kept=kept,
                    recall=sum(t.recall_sum for t in per_site) / sum(t.rows for t in per_site),
                    recall_min=min(t.recall for t in per_site),
                    recall_best_k=sum(t.oracle_sum for t in per_site) / sum(t.rows for t in per_site),
                    site_rel_l2=sum(t.rel_l2 for t in per_site) / len(per_site),
                    rel_l2=rel, psnr={w: psnr(x, dense_sample, peak) for w, x in samples.items()},
                    ssim={w: ssim(x, dense_sample, peak) for w, x in samples.items()},
                    # Attention FLOPs kept over a whole sample: dense warm-up steps count in full.
                    kept_sampling={w: (min(w, S) + max(S - w, 0) * kept) / S for w in samples}))
    return result
