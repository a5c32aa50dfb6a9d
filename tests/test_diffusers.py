"""Real diffusers video DiTs from tiny configs (random weights, CPU): the backend finds every
video self-attention, and only those, with the right grid and text span; the compiled model
equals the model run with the eager sparse op in place of exactly those attentions."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import sparse_inductor as si  # noqa: E402
from diffusers_models import GRID, MODELS  # noqa: E402
from sparse_inductor.attention import sparse_attention  # noqa: E402


@pytest.mark.parametrize("name", list(MODELS))
def test_detects_video_self_attention(name):
    model, args, kwargs, expect = MODELS[name]()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        explanation = si.explain(model, *args, **kwargs)
    sparse = explanation.sparse_rows
    assert len(sparse) == expect["sites"], str(explanation)
    for row in sparse:
        assert row["grid"] == GRID and row["grid_source"] == "graph"
        assert (row["text_span"] or (0, 0)) == expect["text"]
    L = math.prod(GRID) + sum(expect["text"])
    for row in explanation:
        if row["decision"] == "dense":  # cross-attention / text-only attention
            assert row["q"][2] != L or row["k"][2] != L, row


POLICY_CASES = {"topk": dict(sparsity=0.5),
                # BSA's setting on a joint-text model with a key-padding mask (HunyuanVideo).
                "mass+query_keep": dict(policy=si.CumulativeMass(0.6, min_tiles=1, max_fraction=0.5), query_keep=0.5)}


@pytest.mark.parametrize("name,case", [(n, "topk") for n in MODELS] + [("hunyuan", "mass+query_keep"),
                                                                      ("wan", "mass+query_keep")])
def test_compiled_equals_eager_sparse_op(name, case):
    settings = POLICY_CASES[case]
    model, args, kwargs, expect = MODELS[name]()
    before, after = expect["text"]
    L = math.prod(GRID) + before + after
    sdpa = F.scaled_dot_product_attention

    def oracle_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        q, k, v = query, key, value
        if q.shape[2] == k.shape[2] == L:  # the video self-attentions, known from the config
            mask = None if attn_mask is None else attn_mask.reshape(q.shape[0], 1, 1, L)
            return sparse_attention(q, k, v, GRID, tile=(4, 4, 4), scale=scale, text_before=before,
                                    text_after=after, key_padding_mask=mask, **settings)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    with torch.no_grad():
        with mock.patch.object(F, "scaled_dot_product_attention", oracle_sdpa):
            want = model(*args, **kwargs)[0]
        dense = model(*args, **kwargs)[0]
        torch._dynamo.reset()
        with si.sparsity(min_tokens=0, **settings):
            got = torch.compile(model, backend="sparse_inductor")(*args, **kwargs)[0]
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, err
    assert ((got - dense).norm() / dense.norm()).item() > 10 * err  # the sparse path was taken


@pytest.mark.parametrize("name", ["cosmos", "kandinsky6", "allegro", "ltx_video"])
def test_sparsity_zero_is_dense(name):
    """At sparsity 0 the backend compiles the model as plain Inductor does."""
    model, args, kwargs, _ = MODELS[name]()
    with torch.no_grad():
        torch._dynamo.reset()
        want = torch.compile(model, backend="inductor")(*args, **kwargs)[0]
        torch._dynamo.reset()
        with si.sparsity(0.0, min_tokens=0):
            got = torch.compile(model, backend="sparse_inductor")(*args, **kwargs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
