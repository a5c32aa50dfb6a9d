"""``sparse_inductor.stats()``: what the selection actually did, per attention site and call.

Adaptive policies keep a different number of tiles per query tile, head and input, so a
nominal sparsity says little. Inside ``with sparse_inductor.stats() as rec:`` every sparse
attention call (compiled with the backend, or the eager op) records, per call:

- ``tiles_mean`` / ``tiles_min`` / ``tiles_max``: video KV tiles kept per video query tile;
- ``query_keep``: the share of video query rows computed;
- ``kept``: the query-key pairs computed over the dense pairs (attention FLOPs kept, from the
  lists), text rows and keys included.

Recording synchronises with the device once per call (the numbers are read back), so it is off
the hot path: outside the context nothing is recorded and nothing waits. A compiled model
compiles one more variant (with the recording op) the first time it is called inside it.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
from torch import Tensor

_recorder: contextvars.ContextVar = contextvars.ContextVar("sparse_inductor_stats", default=None)


class Stats:
    """The calls recorded inside one :func:`stats` context (``rows``: one dict per call)."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        row["call"] = sum(1 for r in self.rows if r["site"] == row["site"])
        self.rows.append(row)

    def sites(self) -> dict:
        """``{(site, policy): {"calls", "tiles_mean", "tiles_min", "tiles_max", "query_keep",
        "kept"}}``: means over the calls (min / max over them for the tile counts)."""
        out: dict = {}
        for r in self.rows:
            out.setdefault((r["site"], r["policy"]), []).append(r)
        summary = {}
        for key, rows in out.items():
            pairs = sum(r["pairs"] for r in rows)
            summary[key] = dict(
                calls=len(rows), policy=key[1],
                tiles_mean=sum(r["tiles_mean"] for r in rows) / len(rows),
                tiles_min=min(r["tiles_min"] for r in rows), tiles_max=max(r["tiles_max"] for r in rows),
                num_tiles=rows[-1]["num_tiles"],
                query_keep=sum(r["query_keep"] for r in rows) / len(rows),
                kept=sum(r["kept_pairs"] for r in rows) / pairs if pairs else math.nan)
        return summary

    def kept(self) -> float:
        """Attention FLOPs kept over all recorded calls (computed pairs / dense pairs)."""
        pairs = sum(r["pairs"] for r in self.rows)
        return sum(r["kept_pairs"] for r in self.rows) / pairs if pairs else math.nan

    def __str__(self):
        lines = ["| site | policy | calls | tiles kept mean (min-max) of M | query keep | FLOPs kept |",
                 "|---|---|---|---|---|---|"]
        for (site, _), s in self.sites().items():
            lines.append(f"| {site} | {s['policy']} | {s['calls']} | {s['tiles_mean']:.1f} ({s['tiles_min']}-"
                         f"{s['tiles_max']}) of {s['num_tiles']} | {s['query_keep']:.3f} | {s['kept']:.3f} |")
        lines.append(f"overall FLOPs kept: {self.kept():.4f} over {len(self.rows)} call(s)")
        return "\n".join(lines)

    __repr__ = __str__


@contextlib.contextmanager
def stats():
    """Record what every sparse attention call keeps (see the module docstring)::

        with sparse_inductor.sparsity(policy=sparse_inductor.CumulativeMass(0.9)), sparse_inductor.stats() as rec:
            model(x)
        print(rec)          # a markdown table per site
        rec.rows            # one dict per call
    """
    rec = Stats()
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)


def recording() -> bool:
    return _recorder.get() is not None


@torch.library.custom_op("sparse_inductor::record_selection", mutates_args=())
def record_selection(kv_num_blocks: Tensor, kv_indices: Tensor, q_rows: Tensor, counts: Tensor,
                     num_video_tiles: int, label: str) -> Tensor:
    """Record one call's selection in the active :func:`stats` context; returns
    ``kv_num_blocks`` (a copy: the op stays in the graph because its output is used).

    ``kv_num_blocks``/``kv_indices``: the per-tile lists (``[B, H, M]`` / ``[B, H, M, K]``),
    ``q_rows``: query rows computed per tile (``[B, H, M]``), ``counts``: valid tokens per block
    (``[M]``), ``label``: ``"site|policy"``."""
    rec = _recorder.get()
    if rec is not None:
        rec.add(_summarise(kv_num_blocks, kv_indices, q_rows, counts, num_video_tiles, label))
    return kv_num_blocks.clone()


@record_selection.register_fake
def _(kv_num_blocks, kv_indices, q_rows, counts, num_video_tiles, label):
    return torch.empty_like(kv_num_blocks)


def _summarise(num, idx, q_rows, counts, Mv, label) -> dict:
    from .selection import explicit_lists

    M = counts.shape[0]
    B, H = num.shape[:2]
    site, _, policy = label.partition("|")
    if num.numel() == 0:  # an empty batch (or no heads): nothing computed
        return dict(site=site, policy=policy, tiles_mean=0.0, tiles_min=0, tiles_max=0, num_tiles=Mv,
                    query_keep=1.0, kept_pairs=0.0, pairs=0.0)
    idx = explicit_lists(num, idx, M).long()
    listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    keys = torch.where(listed, counts.long()[idx.clamp(max=M - 1)], 0).sum(-1).double()  # [B, H, M]
    video_tiles = (listed & (idx < Mv)).sum(-1)[:, :, :Mv]  # [B, H, Mv]
    n = counts.double()
    kept_pairs = float((keys * q_rows.double()).sum())
    return dict(site=site, policy=policy, tiles_mean=float(video_tiles.double().mean()),
                tiles_min=int(video_tiles.min()), tiles_max=int(video_tiles.max()), num_tiles=Mv,
                query_keep=float(q_rows[:, :, :Mv].double().sum() / (n[:Mv].sum() * B * H)),
                kept_pairs=kept_pairs, pairs=float(n.sum()) ** 2 * B * H)
