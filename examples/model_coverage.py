"""Which diffusers video transformers the backend makes sparse, as a Markdown table.

One row per video transformer class that ``diffusers.models.transformers`` exports (and per
calling style where the zoo has several), from ``sparse_inductor.explain()`` on the tiny
configs of ``tests/diffusers_models.py`` (random weights, CPU, ``sparsity(0.5, min_tokens=0)``):
rewritten sites out of all SDPA sites Dynamo traced, where the grid was found, how text joins
the attention, and every site that stays dense with its reason. Classes without a tiny config
are listed as such. The README's coverage table is this script's output:

    python examples/model_coverage.py                 # every class
    python examples/model_coverage.py wan ltx2        # only these zoo configs
"""
from __future__ import annotations

import argparse
import collections
import inspect
import math
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import sparse_inductor as si  # noqa: E402
from diffusers_models import DENSE_MODELS, GRID, MODELS  # noqa: E402

# Video transformers whose names say neither "Transformer3D" nor "Video".
EXTRA_VIDEO_CLASSES = ("Cosmos3OmniTransformer",)
# Classes with "3D" in the name that are not video generators.
NOT_VIDEO = {"JoyImageEditTransformer3DModel": "image editing (images as one-frame 3D latents)",
             "JoyImageEditPlusTransformer3DModel": "multi-image editing (images as one-frame 3D latents)"}


def skyreels_v2_diffusion_forcing():
    """SkyReels-V2 as its diffusion-forcing pipeline runs it: causal blocks of 3 frames
    (``_set_ar_attention``), per-frame timesteps; the block-causal mask is composed with the
    selection (tests/test_block_causal.py holds it to the masked reference)."""
    from diffusers import SkyReelsV2Transformer3DModel

    from diffusers_models import WAN_TINY

    model = SkyReelsV2Transformer3DModel(in_channels=16, out_channels=16, **WAN_TINY).eval()
    model._set_ar_attention(3)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 6, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([[7, 7, 7, 3, 3, 3]]), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                  enable_diffusion_forcing=True, return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(0, 0))


# Configs tested elsewhere (another grid than the zoo's), listed in the table too.
EXTRA_CONFIGS = {"skyreels_v2_df": skyreels_v2_diffusion_forcing}


def video_classes() -> list[str]:
    """The video transformer classes ``diffusers.models.transformers`` exports."""
    import diffusers.models.transformers as transformers
    from diffusers import ModelMixin

    names = [n for n, obj in vars(transformers).items()
             if inspect.isclass(obj) and issubclass(obj, ModelMixin)
             and (re.search(r"Transformer3D|Video", n) or n in EXTRA_VIDEO_CLASSES)]
    return sorted(names, key=str.lower)


def _masked_sites(model, args, kwargs, expect) -> list[bool]:
    """Per SDPA site in graph order (as explain() lists them): whether it has an ``attn_mask``."""
    from passes.sites import is_sdpa, sdpa_arguments

    masked = []

    def record(gm, example_inputs):
        masked.extend(sdpa_arguments(n)["attn_mask"] is not None for n in gm.graph.nodes if is_sdpa(n))
        return gm.forward

    torch.compiler.reset()
    with torch._dynamo.config.patch(**expect.get("dynamo", {})):
        torch.compile(model, backend=record)(*args, **kwargs)
    torch.compiler.reset()
    return masked


def _dense_kind(row, n_video) -> tuple[str, str]:
    """``(why, where)`` a site stays dense: a short reason and its module path (layers as ``N``)."""
    module = re.sub(r"\.\d+(?=\.|$)", ".N", row["module"])
    if row["reason"].startswith("cross-attention"):
        return "cross-attention", module
    if row["q"][2] < n_video:
        return "not over the video tokens", f"{module}: {row['q'][2]} tokens"
    reason = re.sub(r"\b(l_|hidden_states_|getitem_)\w*", "…", row["reason"])
    return (reason if len(reason) <= 160 else reason[:158].rsplit(" ", 1)[0] + " …"), module


def _dense_summary(dense: collections.Counter) -> str:
    """``why (where ×n, ...)`` per reason."""
    by_reason: dict = {}
    for (why, where), n in dense.items():
        by_reason.setdefault(why, []).append(f"`{where}`" + (f" ×{n}" if n > 1 else ""))
    return "; ".join(f"{why} ({', '.join(places)})" for why, places in by_reason.items())


def coverage_row(name) -> dict:
    """The table's cells for one zoo config (``MODELS``, ``DENSE_MODELS`` or ``EXTRA_CONFIGS``)."""
    model, args, kwargs, expect = (MODELS.get(name) or DENSE_MODELS.get(name) or EXTRA_CONFIGS[name])()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0), torch._dynamo.config.patch(**expect.get("dynamo", {})):
        rows = si.explain(model, *args, **kwargs).rows
        masked = _masked_sites(model, args, kwargs, expect)
    sparse = [r for r, m in zip(rows, masked) if r["decision"] == "sparse"]
    text = set()
    for r, m in zip(rows, masked):
        if r["decision"] != "sparse":
            continue
        before, after = r["text_span"] or (0, 0)
        if before:
            text.add(f"joint, {before} tokens before the video")
        if after:
            text.add(f"joint, {after} tokens after the video" if not isinstance(after, str) else
                     "joint, tokens after the video (length known at run time)")
        if m and r["text_span"]:
            text.add("key-padding mask")
        if r.get("mask"):
            text.add(r["mask"] + " mask")
    n_video = math.prod(GRID)
    dense = collections.Counter(_dense_kind(r, n_video) for r in rows if r["decision"] != "sparse")
    if any(r["reason"].startswith("cross-attention") and r["q"][2] > 1 for r in rows):  # (not a pooler's query)
        text.add("separate cross-attention")
    sources = sorted({r["grid_source"] for r in sparse})
    return dict(cls=type(model).__name__, config=name, sparse=len(sparse), total=len(rows),
                grids=sorted({r["grid"] for r in sparse}), source=", ".join(sources),
                text="; ".join(sorted(text)) or ("video only" if sparse else "—"), dense=dense,
                note=expect.get("note", ""))


def markdown(rows, missing) -> str:
    lines = ["| class (zoo config) | rewritten / SDPA sites | grid (found in) | text | stays dense (why) |",
             "|---|---|---|---|---|"]
    for r in rows:
        dense = "; ".join(part for part in (_dense_summary(r["dense"]), r["note"]) if part) or "—"
        grid = ", ".join(str(g) for g in r["grids"]) + (f" ({r['source']})" if r["source"] else "") or "—"
        lines.append(f"| `{r['cls']}` ({r['config']}) | {r['sparse']} / {r['total']} | {grid} | {r['text']} | "
                     f"{dense} |")
    for cls, why in missing:
        lines.append(f"| `{cls}` | — | — | — | {why} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="zoo configs to run (default: all)")
    every = list(MODELS) + list(DENSE_MODELS) + list(EXTRA_CONFIGS)
    names = parser.parse_args(argv).configs or every
    rows = []
    for name in names:
        rows.append(coverage_row(name))
        print(f"{name}: {rows[-1]['sparse']} / {rows[-1]['total']}", file=sys.stderr)
    rows.sort(key=lambda r: (r["cls"].lower(), r["config"]))
    missing = []
    if names == every:
        covered = {r["cls"] for r in rows}
        missing = [(c, NOT_VIDEO.get(c, "no tiny config in the zoo yet")) for c in video_classes() if c not in covered]
    print(markdown(rows, missing))


if __name__ == "__main__":
    main()
