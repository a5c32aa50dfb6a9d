"""Real diffusers video DiTs from tiny configs (random weights, CPU): the backend finds every
video self-attention, and only those, with the right grid and text span; the compiled model
equals the model run with the eager sparse op in place of exactly those attentions."""
import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import sparse_inductor as si  # noqa: E402
from sparse_inductor import _compat  # noqa: E402
from diffusers_models import DENSE_MODELS, GRID, MODELS  # noqa: E402
from helpers import slow_on_cpu, unbacked_text_params  # noqa: E402
from sparse_inductor.attention import sparse_attention  # noqa: E402

N_VIDEO = math.prod(GRID)


def dynamo_config(expect):
    """The Dynamo settings a model needs to be traced at all (Mochi: capture_dynamic_output_shape_ops)."""
    return torch._dynamo.config.patch(**expect.get("dynamo", {}))


def key_padding(attn_mask, L):
    """A model's bool mask as the op takes it: the key-padding mask ``[B, 1, 1, L]``, and the query
    rows to zero (SDPA's rows without keys) for a mask that is the outer product ``m_i & m_j`` of
    one (HunyuanVideo 1.5), else ``None``."""
    B = attn_mask.shape[0]
    if attn_mask.shape[-2] == 1:
        return attn_mask.reshape(B, 1, 1, L), None
    m = attn_mask.reshape(B, L, L).diagonal(dim1=1, dim2=2)  # m_j & m_j = m_j
    assert torch.equal(attn_mask.reshape(B, L, L), m[:, :, None] & m[:, None, :]), "not an outer product"
    return m.view(B, 1, 1, L), ~m.view(B, 1, L, 1)


def is_video_self_attention(q_len, k_len, before, after):
    """From the config: the video self-attentions have ``before + N + after`` query and key tokens
    (``after=None``: a data-dependent text length after the video)."""
    if after is None:
        return q_len == k_len and q_len >= before + N_VIDEO
    return q_len == k_len == before + N_VIDEO + after


# Models checked through the backend with Inductor's compile replaced by running the rewritten FX
# graph as it is: what differs between models is the pass (sites, grids, the rewrite), and a CPU
# Inductor compile costs 30-70 s of CI per model (the op's lowering is tested by test_lowering and
# test_backend, end to end by the models above with Inductor).
GRAPH_ONLY = {"wan_vace", "wan_animate", "skyreels_v2", "consisid", "easyanimate", "motif_video", "kandinsky5",
              "ltx_video_condition", "ltx2", "anyflow", "chronoedit", "helios", "sana_wm", "minimax_h3"}


def backend_compiles(name):
    """How the backend compiles ``name``'s graphs: with Inductor, or (``GRAPH_ONLY``) by running them."""
    if name not in GRAPH_ONLY:
        return contextlib.nullcontext()
    return mock.patch.object(_compat, "compile_fx", lambda gm, example_inputs, config_patches=None: gm.forward)


@pytest.mark.parametrize("name", unbacked_text_params(list(MODELS)))
def test_detects_video_self_attention(name):
    model, args, kwargs, expect = MODELS[name]()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0), dynamo_config(expect):
        explanation = si.explain(model, *args, **kwargs)
    sparse = explanation.sparse_rows
    assert len(sparse) == expect["sites"], str(explanation)
    before, after = expect["text"]
    for row in sparse:
        assert row["grid"] == GRID and row["grid_source"] == expect.get("grid_source", "graph"), row
        got_before, got_after = row["text_span"] or (0, 0)
        assert got_before == before
        # A data-dependent text length is shown as its symbol (e.g. "u0").
        assert got_after == after if after is not None else isinstance(got_after, str), row
    for row in explanation:
        if row["decision"] == "dense":  # cross-attention / text-only attention
            assert not is_video_self_attention(row["q"][2], row["k"][2], before, after), row


POLICY_CASES = {"topk": dict(sparsity=0.5),
                # BSA's setting on a joint-text model with a key-padding mask (HunyuanVideo).
                "mass+query_keep": dict(policy=si.CumulativeMass(0.6, min_tiles=1, max_fraction=0.5), query_keep=0.5)}


# On CPU (the suite's time budget) HunyuanVideo runs BSA's case only and FramePack, HunyuanVideo's
# architecture again, runs where CUDA is (37-44 s each on CPU, ninth session).
_SLOW_ON_CPU_MODELS = ("hunyuan", "hunyuan_framepack")


@pytest.mark.parametrize("name,case", unbacked_text_params(
    [slow_on_cpu(n, "topk") if n in _SLOW_ON_CPU_MODELS else (n, "topk") for n in MODELS]
    + [("hunyuan", "mass+query_keep"), ("wan", "mass+query_keep")]))
def test_compiled_equals_eager_sparse_op(name, case):
    settings = POLICY_CASES[case]
    model, args, kwargs, expect = MODELS[name]()
    before, after = expect["text"]
    sdpa = F.scaled_dot_product_attention

    def oracle_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        q, k, v = query, key, value
        L = q.shape[2]
        if is_video_self_attention(L, k.shape[2], before, after):  # known from the config
            mask, padded_rows = (None, None) if attn_mask is None else key_padding(attn_mask, L)
            out = sparse_attention(q, k, v, GRID, tile=(4, 4, 4), scale=scale, text_before=before,
                                   text_after=L - before - N_VIDEO, key_padding_mask=mask, **settings)
            return out if padded_rows is None else out.masked_fill(padded_rows, 0)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    with torch.no_grad():
        with mock.patch.object(F, "scaled_dot_product_attention", oracle_sdpa):
            want = model(*args, **kwargs)[0]
        dense = model(*args, **kwargs)[0]
        torch._dynamo.reset()
        with si.sparsity(min_tokens=0, **settings), dynamo_config(expect), backend_compiles(name):
            got = torch.compile(model, backend="sparse_inductor")(*args, **kwargs)[0]
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, err
    assert ((got - dense).norm() / dense.norm()).item() > 10 * err  # the sparse path was taken


@pytest.mark.parametrize("name", sorted(GRAPH_ONLY))
def test_sparsity_zero_leaves_the_graph_as_traced(name):
    """At sparsity 0 the backend hands on the graph Dynamo traced, untouched: run as it is, it gives
    bitwise the output of that graph under ``backend="eager"`` (what Inductor then compiles is what
    plain Inductor compiles)."""
    model, args, kwargs, expect = MODELS[name]()
    with torch.no_grad(), dynamo_config(expect):
        torch._dynamo.reset()
        want = torch.compile(model, backend="eager")(*args, **kwargs)[0]
        torch._dynamo.reset()
        with si.sparsity(0.0, min_tokens=0), backend_compiles(name):
            got = torch.compile(model, backend="sparse_inductor")(*args, **kwargs)[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(DENSE_MODELS))
def test_models_without_rewritable_attention_stay_dense(name):
    """Video transformers whose attention is not full 3D self-attention over SDPA: every site dense,
    each for the reason expected."""
    model, args, kwargs, expect = DENSE_MODELS[name]()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        rows = si.explain(model, *args, **kwargs).rows
    assert len(rows) == len(expect["dense"]), rows
    for row, why in zip(rows, expect["dense"]):
        assert row["decision"] == "dense" and why in row["reason"], row


@pytest.mark.parametrize("name", ["cosmos", "ltx_video", *(slow_on_cpu(n) for n in (
    "kandinsky6", "allegro", "mochi", "hunyuan_video15", "hunyuan_framepack"))])
def test_sparsity_zero_is_dense(name):
    """At sparsity 0 the backend compiles the model as plain Inductor does. Two models on CPU (each
    case compiles its model twice with Inductor, ~27 s on CI's cores); the rest where CUDA is."""
    model, args, kwargs, expect = MODELS[name]()
    with torch.no_grad(), dynamo_config(expect):
        torch._dynamo.reset()
        want = torch.compile(model, backend="inductor")(*args, **kwargs)[0]
        torch._dynamo.reset()
        with si.sparsity(0.0, min_tokens=0):
            got = torch.compile(model, backend="sparse_inductor")(*args, **kwargs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_coverage_script_rows_and_classes():
    """examples/model_coverage.py (the README's coverage table): a row is explain() on a zoo config,
    and every class of the zoo is among the video classes it enumerates from diffusers."""
    import model_coverage

    row = model_coverage.coverage_row("ltx2")
    assert (row["sparse"], row["total"], row["source"], row["grids"]) == (1, 6, "coordinates", [GRID]), row
    assert "separate cross-attention" in row["text"] and "audio_attn1" in model_coverage._dense_summary(row["dense"])
    classes = set(model_coverage.video_classes())
    for configs in (MODELS, DENSE_MODELS):
        for name, make in configs.items():
            assert type(make()[0]).__name__ in classes, name


def test_mochi_is_traced_only_with_captured_output_shapes():
    """Without ``capture_dynamic_output_shape_ops`` Dynamo skips the frame of Mochi's attention
    (``torch.nonzero`` of each sample's prompt mask): no self-attention reaches the backend, so the
    README tells Mochi users to set it. If a torch release traces it by default, update the README."""
    model, args, kwargs, _ = MODELS["mochi"]()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0), \
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        rows = si.explain(model, *args, **kwargs).rows
    assert not any(r["q"][2] == r["k"][2] for r in rows), rows  # only the pooler's cross-attention
