"""``sparse_inductor.calibrate``: find a per-head pattern plan offline (Sparse-vDiT, arXiv
2506.03065).

1. **Measure.** The model runs dense on the calibration inputs (and, given a sampler, at every
   denoising step of a sample); every SDPA call of a site ``explain()`` marks sparse is
   intercepted and, per head, its exact tile-level mass map is accumulated: ``mass[i, j]`` = the
   softmax mass that the rows of query tile ``i`` put on the keys of KV tile ``j``, formed from
   the dense softmax a chunk of query rows at a time (so 32K tokens fit in memory). Each head's
   output energy is recorded too.
2. **Score.** Every candidate pattern of every head is scored by the mass it keeps (the mean
   over video query rows of the kept share of their softmax mass; text keys are always kept and
   count as kept) and by its attention FLOPs (computed query-key pairs of the video tokens over
   dense pairs). Candidates: ``Full``; windows ``Window(rt, rh, rw)``; ``Temporal(rh, rw)``;
   ``Stripe`` of the head's own most-attended KV tiles (1, 2, 4, 8 of them) and of the first
   frame; unions window | stripe and window | temporal; and, when ``dynamic=True``, ``TopK`` at
   keep 1/16 .. 1/2 (measured on the calibration inputs' own selections).
3. **Allocate.** Heads whose output energy is below ``skip_threshold`` times the mean head's
   are ``Skip()``. The others get the candidate that minimises ``Σ_h w_h (1 − mass_h)²`` over
   all heads of all sites (``w_h`` the head's output energy relative to its site's mean head;
   see :func:`_value`) subject to a *mean FLOP budget* (``budget``, the mean over heads of the
   FLOPs kept). This is a multiple-choice knapsack; it is solved by Lagrangian relaxation: for a
   price ``λ`` every head picks ``argmax value − λ·flops``, and ``λ`` is bisected until the mean
   FLOPs meet the budget (the smallest λ that meets it is kept; λ is at least ``MIN_PRICE``, so a
   loose budget is not spent on negligible gains); what the relaxation leaves of the budget is
   then spent greedily, the best mass gained per FLOP first. Every head counts equally.
   With ``allocation="per_head"`` every head instead gets the budget itself and takes its best
   candidate within it: the FLOPs are spread evenly, as TopK spreads them. (On the testbed,
   spending more of the budget on some layers than others cost more than it bought:
   ``benchmarks/selection_probe.py``, benchmarks/NOTES.md.)

The result is a :class:`~sparse_inductor.plan.Plan`, applied with ``sparsity(plan=plan)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import build_layout, check_grid_and_tile
from .plan import Plan, mode_of
from .policies import Full, PerHead, Skip, Stripe, Temporal, TopK, Window
from .policies.base import SelectionContext

#: Score elements per chunk of query rows (256 MiB of fp32 scores).
CHUNK_ELEMENTS = 1 << 26

WINDOWS = ((0, 0, 0), (0, 1, 1), (1, 1, 1), (0, 2, 2), (1, 2, 2), (2, 2, 2), (1, 3, 3), (2, 4, 4))
TEMPORALS = ((0, 0), (1, 1))
STRIPE_TILES = (1, 2, 4, 8)
TOPK_KEEP = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
#: The lowest price of FLOPs in mass: under a loose budget a head still does not spend FLOPs for
#: mass gains below 1e-3 per unit of FLOPs kept (e.g. 0.1 more FLOPs for 1e-4 more mass).
MIN_PRICE = 1e-3


def tile_mass(q: Tensor, k: Tensor, layout, scale: float, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(mass [B, H, Mv, Mv], text [B, H, Mv])`` in float64: per query tile, the softmax mass
    its valid rows put on each video KV tile (summed over its rows) and on the text keys.

    Keys are put in tile-major order first, so the reduction over a KV tile is a reshape and a
    sum, not a gather; rows are processed a chunk of whole query tiles at a time.
    """
    B, H, L, D = q.shape
    S, Mv = layout.block_size, layout.num_video_tiles
    video_slots = layout.slots[: Mv * S].long()
    valid = video_slots >= 0
    text_pos = layout.slots[Mv * S:]
    text_pos = text_pos[text_pos >= 0].long()
    idx = video_slots.clamp(min=0)
    kt = torch.cat([k.index_select(2, idx), k.index_select(2, text_pos)], dim=2)  # [B, H, Mv*S + Lt, D]
    col_ok = torch.cat([valid, torch.ones(text_pos.numel(), dtype=torch.bool, device=q.device)])
    col_ok = col_ok.view(1, 1, 1, -1)
    if attn_mask is not None:  # a key-padding mask [B, 1, 1, L] over the sequence
        keep = attn_mask.reshape(attn_mask.shape[0], -1).bool()
        keep = torch.cat([keep.index_select(1, idx), keep.index_select(1, text_pos)], dim=1)
        col_ok = col_ok & keep.view(keep.shape[0], 1, 1, -1)
    mass = torch.zeros(B, H, Mv, Mv, dtype=torch.float64, device=q.device)
    text = torch.zeros(B, H, Mv, dtype=torch.float64, device=q.device)
    tiles_per_chunk = max(1, CHUNK_ELEMENTS // max(1, B * H * S * kt.shape[2]))
    for t0 in range(0, Mv, tiles_per_chunk):
        t1 = min(Mv, t0 + tiles_per_chunk)
        rows = idx[t0 * S: t1 * S]
        qc = q.index_select(2, rows)
        s = (qc @ kt.transpose(-1, -2)).float() * scale
        s = s.masked_fill(~col_ok, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(valid[t0 * S: t1 * S].view(1, 1, -1, 1), p, 0)  # padding query rows
        video = p[..., : Mv * S].view(B, H, t1 - t0, S, Mv, S).sum((3, 5))
        mass[:, :, t0:t1] += video.double()
        text[:, :, t0:t1] += p[..., Mv * S:].reshape(B, H, t1 - t0, S, -1).sum((3, 4)).double()
    return mass, text


@dataclass
class _SiteMeasure:
    """Sums over the calibration calls of one site."""

    module: str
    grid: tuple
    heads: int
    text: tuple = (0, 0)  # explain()'s text_span (a data-dependent length is its symbol)
    layout_key: tuple | None = None  # of the layout its calls used (their video tiles are the same)
    mass: Tensor | None = None  # [H, Mv, Mv] summed over calls and batch
    text_mass: Tensor | None = None  # [H, Mv]
    rows: Tensor | None = None  # [Mv] valid rows per query tile x (calls * batch)
    energy: Tensor | None = None  # [H] output energy summed
    dynamic: dict = field(default_factory=dict)  # policy -> ([H] mass kept sum, [H] flops sum, count)


def _candidates(layout, mass_h: Tensor) -> list:
    """Static candidate policies of one head (``mass_h`` [Mv, Mv] picks its stripe tiles)."""
    Mv = layout.num_video_tiles
    nt, nh, nw = (-(-g // t) for g, t in zip(layout.grid, layout.tile))
    out = [Full()]
    out += [Window(*r) for r in WINDOWS if all(2 * x + 1 < n or x == 0 for x, n in zip(r, (nt, nh, nw)))]
    out += [Temporal(*r) for r in TEMPORALS]
    column = mass_h.sum(0)  # mass each KV tile receives
    coords = torch.stack([torch.arange(Mv) // (nh * nw), (torch.arange(Mv) // nw) % nh, torch.arange(Mv) % nw], -1)
    stripes = [Stripe(first_frames=1)] if nt > 1 else []
    for n in STRIPE_TILES:
        if n < Mv:
            top = torch.topk(column, n).indices.cpu()
            stripes.append(Stripe.at([tuple(coords[j].tolist()) for j in top], (nt, nh, nw)))
    out += stripes
    for w in (Window(0, 1, 1), Window(1, 1, 1)):
        out += [w | st for st in stripes[:3]] + [w | Temporal(0, 0)]
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def _pattern_mask(policy, layout, device, cache: dict) -> Tensor:
    """float64 ``[Mv, Mv]``: which tiles a static policy keeps on this layout (cached)."""
    from .selection import mask_from_lists

    key = (policy, layout.grid, layout.tile)
    if key not in cache:
        Mv = layout.num_video_tiles
        ctx = SelectionContext(grid=layout.grid, tile=layout.tile, counts=layout.counts[:Mv], scale=1.0, batch=1,
                               heads=1, device=device)
        num, idx = policy.video_lists(ctx)
        cache[key] = mask_from_lists(num.view(1, 1, Mv), idx.view(1, 1, Mv, -1), Mv)[0, 0].to(torch.float64)
    return cache[key]


def _score(keep, mass_h, text_h, rows, counts) -> tuple[float, float]:
    """``(mass kept, FLOPs kept)`` of a tile mask ``keep`` on one head's accumulated map."""
    kept_mass = float((mass_h * keep).sum() + text_h.sum()) / float(rows.sum())
    n = counts.to(torch.float64)
    flops = float((keep * n[:, None] * n[None, :]).sum()) / float(n.sum()) ** 2
    return kept_mass, flops


def _value(mass: float, weight: float) -> float:
    """The objective's term of a head keeping ``mass``: ``-weight · (1 − mass)²``.

    A row that keeps a share ``m`` of its softmax mass has an output error about proportional
    to ``1 − m`` (the kept part is renormalised), and sample quality follows the squared error;
    so the squared miss, weighted by the head's output energy (relative to its site's mean
    head), is summed. Unlike the total mass kept, it does not trade a few ruined heads for many
    perfect ones (measured on the testbed: a mass-only allocation kept more mass at budget 1/2
    but drew worse samples than at 1/8, benchmarks/RESULTS.md)."""
    return -weight * (1.0 - mass) ** 2


def _allocate(options: list[list[tuple]], budget: float) -> list[int]:
    """Per head the index of its chosen option ``(value, flops, ...)``: the largest total value
    with mean flops <= ``budget`` (Lagrangian relaxation with bisection on the price)."""
    def pick(lam):
        return [max(range(len(opts)), key=lambda i: (opts[i][0] - lam * opts[i][1], -opts[i][1]))
                for opts in options]

    def mean_flops(choice):
        return sum(opts[i][1] for opts, i in zip(options, choice)) / max(1, len(options))

    lo, hi = MIN_PRICE, 1.0
    while mean_flops(pick(hi)) > budget and hi < 1e9:
        hi *= 2
    if mean_flops(pick(MIN_PRICE)) <= budget:
        return pick(MIN_PRICE)
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_flops(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    # The relaxation only reaches the convex hull: spend what is left greedily, best mass gained
    # per FLOP first (an upgrade must still fit the budget).
    left = budget * len(options) - sum(opts[i][1] for opts, i in zip(options, choice))
    while True:
        best = None
        for h, (opts, i) in enumerate(zip(options, choice)):
            for j, option in enumerate(opts):
                dm, df = option[0] - opts[i][0], option[1] - opts[i][1]
                if dm > 0 and df <= left + 1e-12 and dm >= MIN_PRICE * df:
                    ratio = dm / df if df > 0 else float("inf")
                    if best is None or ratio > best[0]:
                        best = (ratio, h, j, df)
        if best is None:
            return choice
        _, h, j, df = best
        choice[h] = j
        left -= df


def _allocate_per_head(options: list[list[tuple]], budget: float) -> list[int]:
    """Per head the index of its best option ``(value, flops, ...)`` with flops <= ``budget``
    (ties to the cheaper), or its cheapest option when none fits."""
    choice = []
    for opts in options:
        fits = [i for i, o in enumerate(opts) if o[1] <= budget + 1e-12]
        if fits:
            choice.append(max(fits, key=lambda i: (opts[i][0], -opts[i][1])))
        else:
            choice.append(min(range(len(opts)), key=lambda i: opts[i][1]))
    return choice


ALLOCATIONS = ("global", "per_head")


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found: the plan and, per site and head, the chosen pattern with its
    mass kept and FLOPs (``heads``: list of dicts). ``print()`` gives a summary table."""

    plan: Plan
    heads: list
    budget: float

    def table(self) -> str:
        lines = ["| site | heads | modes | FLOPs kept (mean) | mass kept (mean) | mass kept (min head) |",
                 "|---|---|---|---|---|---|"]
        by_site: dict = {}
        for h in self.heads:
            by_site.setdefault(h["site"], []).append(h)
        for site, heads in by_site.items():
            modes: dict = {}
            for h in heads:
                modes[h["mode"]] = modes.get(h["mode"], 0) + 1
            census = ", ".join(f"{n} {m}" for m, n in sorted(modes.items(), key=lambda x: -x[1]))
            lines.append(f"| {site} | {len(heads)} | {census} | {sum(h['flops'] for h in heads) / len(heads):.3f} | "
                         f"{sum(h['mass'] for h in heads) / len(heads):.3f} | {min(h['mass'] for h in heads):.3f} |")
        n = len(self.heads)
        lines.append(f"| all | {n} | {self.census_text()} | {sum(h['flops'] for h in self.heads) / n:.3f} "
                     f"(budget {self.budget}) | {sum(h['mass'] for h in self.heads) / n:.3f} | "
                     f"{min(h['mass'] for h in self.heads):.3f} |")
        return "\n".join(lines)

    def census(self) -> dict:
        """``{mode: heads}`` over the whole model."""
        out: dict = {}
        for h in self.heads:
            out[h["mode"]] = out.get(h["mode"], 0) + 1
        return out

    def census_text(self) -> str:
        return ", ".join(f"{n} {m}" for m, n in sorted(self.census().items(), key=lambda x: -x[1]))

    def __str__(self):
        return f"calibration ({len(self.plan.sites)} sites, {len(self.heads)} heads)\n\n{self.table()}"

    __repr__ = __str__


def _check(budget, skip_threshold, tile, min_tokens):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget <= 1:
        raise ValueError(f"budget must be the mean share of attention FLOPs to keep, in (0, 1], got {budget!r}")
    if isinstance(skip_threshold, bool) or not isinstance(skip_threshold, numbers.Real) or skip_threshold < 0:
        raise ValueError(f"skip_threshold must be a number >= 0 (a head's output energy relative to the mean "
                         f"head's, below which it is skipped; 0 never skips), got {skip_threshold!r}")
    check_grid_and_tile((1, 1, 1), tile)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be a non-negative int, got {min_tokens!r}")


def calibrate(model, *inputs, budget: float = 0.125, kwargs: dict | None = None, sample_fn=None,
              skip_threshold: float = 0.02, dynamic: bool = False, tile=(4, 4, 4), min_tokens: int = 0,
              grid=None, progress: bool = True, allocation: str = "global") -> CalibrationResult:
    """Find per-head attention patterns that keep the most softmax mass within a FLOP budget.

    Args:
        model: the model (an ``nn.Module`` or a compiled one; its eager original runs, dense).
        *inputs: its positional inputs for one calibration forward (e.g. noised latents, a
            timestep); use several batch entries or a sampler for more coverage.
        budget: the mean over heads of the attention FLOPs kept (e.g. 0.125 = 1/8).
        kwargs: the model's keyword inputs.
        sample_fn: optionally ``sample_fn(model, step_context)`` (as for
            :func:`sparse_inductor.fidelity`): the whole dense sample is measured too, every
            denoising step of it.
        skip_threshold: heads whose output energy is below this share of the mean head's are
            skipped (output 0); 0 never skips.
        dynamic: also offer ``TopK`` per head (scored on the calibration inputs' selections).
        tile, min_tokens, grid: as in :func:`sparse_inductor.sparsity`.
        progress: a tqdm progress bar over the measured attention calls.
        allocation: ``"global"`` (the budget is the mean over all heads: heads that gain more
            mass per FLOP take more) or ``"per_head"`` (every head keeps at most the budget).

    Returns:
        A :class:`CalibrationResult`; ``.plan`` is the :class:`~sparse_inductor.plan.Plan`
        (``.plan.save(path)``), ``print()`` shows the per-site summary.
    """
    from .config import sparsity as sparsity_context
    from .explain import explain
    from .fidelity import _check_count, _SDPAInterceptor, call_text_span, key_padding, refuse_masked_sites

    _check(budget, skip_threshold, tile, min_tokens)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    tile = tuple(tile)
    kwargs = dict(kwargs or {})
    model = getattr(model, "_orig_mod", model)
    with torch.no_grad(), sparsity_context(0.5, tile=tile, min_tokens=min_tokens, grid=grid):
        explanation = explain(model, *inputs, **kwargs)
    site_rows = list(explanation.rows)
    sites = {i: r for i, r in enumerate(site_rows) if r["decision"] == "sparse"}
    if not sites:
        raise ValueError("calibrate: no attention site would be sparse; explain() says:\n" + str(explanation))
    refuse_masked_sites("calibrate", sites)
    measures = {i: _SiteMeasure("" if r["module"] == "<top>" else r["module"], tuple(r["grid"]), r["q"][1],
                                tuple(r["text_span"] or (0, 0))) for i, r in sites.items()}
    layouts: dict = {}
    bar = _progress(progress)

    def handle(index, call):
        out = F.scaled_dot_product_attention(**call)
        site = measures.get(index % len(site_rows))
        if site is None:
            return out
        q, k = call["query"], call["key"]
        text = call_text_span(site.text, site.grid, q.shape[2])
        key = site.layout_key = (site.grid, text, q.device)
        if key not in layouts:
            layouts[key] = build_layout(site.grid, tile, text[0], text[1], q.device)
        layout = layouts[key]
        scale = call["scale"] if call["scale"] is not None else q.shape[-1] ** -0.5
        mass, text = tile_mass(q, k, layout, scale, key_padding(call["attn_mask"])[0])
        Mv = layout.num_video_tiles
        rows = layout.counts[:Mv].to(torch.float64) * q.shape[0]
        energy = out.float().pow(2).sum((0, 2, 3)).double()
        site.mass = mass.sum(0) if site.mass is None else site.mass + mass.sum(0)
        site.text_mass = text.sum(0) if site.text_mass is None else site.text_mass + text.sum(0)
        site.rows = rows if site.rows is None else site.rows + rows
        site.energy = energy if site.energy is None else site.energy + energy
        if dynamic:
            _score_dynamic(site, q, k, layout, scale, mass, text)
        bar.update(1)
        return out

    with torch.no_grad(), _SDPAInterceptor(lambda i, call: handle(i, call)) as mode:
        model(*inputs, **kwargs)
        if sample_fn is not None:
            sample_fn(model, lambda i: sparsity_context(0.0))
    bar.close()
    if sample_fn is None:
        _check_count(mode.count, len(site_rows))

    # Score and allocate.
    options, owners = [], []
    skipped = []
    masks: dict = {}
    for i, site in measures.items():
        layout = layouts[site.layout_key]
        Mv = layout.num_video_tiles
        counts = layout.counts[:Mv]
        energy = site.energy / site.energy.mean().clamp_min(1e-30)
        for h in range(site.heads):
            if float(energy[h]) < skip_threshold:
                skipped.append((i, h))
                continue
            opts = []
            weight = float(energy[h])
            for policy in _candidates(layout, site.mass[h].cpu()):
                keep = _pattern_mask(policy, layout, site.mass.device, masks)
                m, f = _score(keep, site.mass[h], site.text_mass[h], site.rows, counts)
                opts.append((_value(m, weight), f, policy, m))
            for policy, (m_sum, f_sum, n) in site.dynamic.items():
                m = float(m_sum[h]) / n
                opts.append((_value(m, weight), float(f_sum[h]) / n, policy, m))
            options.append(opts)
            owners.append((i, h))
    # Skipped heads cost no FLOPs: the others may spend their share.
    n_heads = len(options) + len(skipped)
    if allocation == "per_head":
        choice = _allocate_per_head(options, budget)
    else:
        choice = _allocate(options, budget * n_heads / max(1, len(options))) if options else []
    per_site = {i: [None] * m.heads for i, m in measures.items()}
    heads = []
    for (i, h), opts, c in zip(owners, options, choice):
        _, f, policy, m = opts[c]
        per_site[i][h] = policy
        heads.append(dict(site=measures[i].module, head=h, mode=mode_of(policy), policy=policy.describe(), mass=m,
                          flops=f))
    for i, h in skipped:
        per_site[i][h] = Skip()
        heads.append(dict(site=measures[i].module, head=h, mode="skip", policy="Skip()", mass=0.0, flops=0.0))
    order = {m.module: n for n, m in enumerate(measures.values())}
    heads.sort(key=lambda r: (order[r["site"]], r["head"]))
    grids = {m.grid for m in measures.values()}
    plan = Plan(sites=tuple((measures[i].module, PerHead(tuple(ps))) for i, ps in per_site.items()),
                grid=next(iter(grids)) if len(grids) == 1 else None, tile=tile,
                info=(("budget", budget), ("allocation", allocation),
                      ("objective", "min sum_h w_h (1 - mass_h)^2 s.t. " + (
                          "FLOPs_h <= budget for every head" if allocation == "per_head" else "mean FLOPs <= budget")),
                      ("skip_threshold", skip_threshold),
                      ("mean_flops", sum(h["flops"] for h in heads) / len(heads)),
                      ("mean_mass", sum(h["mass"] for h in heads) / len(heads))))
    return CalibrationResult(plan=plan, heads=heads, budget=budget)


def _score_dynamic(site, q, k, layout, scale, mass, text):
    """Mass kept and FLOPs of TopK at a few budgets on this call's own selection, per head."""
    from .selection import mask_from_lists, select_tiles

    Mv = layout.num_video_tiles
    counts = layout.counts[:Mv].to(torch.float64)
    rows = counts.sum() * q.shape[0]
    for keep in TOPK_KEEP:
        policy = TopK(1 - keep)
        num, idx = select_tiles(q, k, layout, policy, scale)
        kept = mask_from_lists(num[:, :, :Mv], idx[:, :, :Mv], layout.num_tiles)[..., :Mv].to(torch.float64)
        m = ((mass * kept).sum((0, 2, 3)) + text.sum((0, 2))) / rows
        f = (kept * counts[:, None] * counts[None, :]).sum((0, 2, 3)) / (counts.sum() ** 2 * q.shape[0])
        m_sum, f_sum, n = site.dynamic.get(policy, (0.0, 0.0, 0))
        site.dynamic[policy] = (m_sum + m, f_sum + f, n + 1)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with diffusers / the test extra
        return _NoBar()
    return tqdm(desc="calibrate: attention calls measured", unit="call")


