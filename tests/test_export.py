"""``sparse_inductor.export``: torch.export of a model with its sparse sites (issue 19, serving).

The exported program must hold our ops at exactly the sites the backend rewrites, run (on CPU
through the ops' torch path) to the compiled model's output, stay plain SDPA at sparsity 0, and
refuse, with a clear error, a model whose attention calls it cannot match to sites. Tolerance:
fp32 on CPU, the same ops on both sides, so rel-L2 < 1e-5.
"""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import sparse_inductor as si

from video_dit import TinyVideoDiT

SPARSE_OPS = ("sparse_inductor.block_sparse_attn_fwd",)


def tiny_dit():
    torch.manual_seed(0)
    model = TinyVideoDiT(layers=1).eval()
    return model, (torch.randn(1, 4, 8, 16, 16), torch.randn(1, 3, 16))  # grid 8x8x8: 8 tiles


def attention_targets(program):
    return [str(n.target) for n in program.graph.nodes
            if n.op == "call_function" and ("attention" in str(n.target) or "sparse_inductor" in str(n.target))]


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def compiled_output(model, args, kwargs, settings):
    torch._dynamo.reset()
    with torch.no_grad(), si.sparsity(**settings):
        return torch.compile(model, backend="sparse_inductor")(*args, **kwargs)


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


SETTINGS = {
    "topk": dict(sparsity=0.5, min_tokens=0),
    "mass+query_keep": dict(policy=si.CumulativeMass(0.6, min_tiles=1, max_fraction=0.5), query_keep=0.5, min_tokens=0),
    "window (static lists)": dict(policy=si.Window(0, 0, 0), min_tokens=0),
}


def eager_sparse_output(model, args, kwargs, expect, settings):
    """The model with the eager sparse op in place of exactly its video self-attentions (known
    from the config), as tests/test_diffusers.py's oracle of the compiled model."""
    from diffusers_models import GRID

    from sparse_inductor.attention import sparse_attention

    before, after = expect["text"]
    L = math.prod(GRID) + before + after
    sdpa = F.scaled_dot_product_attention
    keywords = {k: v for k, v in settings.items() if k != "min_tokens"}

    def oracle_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.shape[2] == key.shape[2] == L:
            mask = None if attn_mask is None else attn_mask.reshape(query.shape[0], 1, 1, L)
            return sparse_attention(query, key, value, GRID, tile=(4, 4, 4), scale=scale, text_before=before,
                                    text_after=after, key_padding_mask=mask, **keywords)
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", oracle_sdpa):
        return first(model(*args, **kwargs))


@pytest.mark.parametrize("case", list(SETTINGS))
def test_exported_program_equals_eager_sparse_model(case):
    diffusers_models = pytest.importorskip("diffusers_models")
    model, args, kwargs, expect = diffusers_models.MODELS["hunyuan"]()  # joint text + key-padding mask
    settings = SETTINGS[case]
    program = si.export(model, args, kwargs, **settings)
    targets = attention_targets(program)
    assert sum(t.startswith(SPARSE_OPS) for t in targets) == expect["sites"], targets
    with torch.no_grad():
        got = first(program.module()(*args, **kwargs))
        dense = first(model(*args, **kwargs))
    want = eager_sparse_output(model, args, kwargs, expect, settings)
    assert rel_l2(got, want) < 1e-5
    assert rel_l2(got, dense) > 1e-3  # sparse, not dense


def test_dense_sites_stay_sdpa_and_cross_attention_untouched():
    diffusers_models = pytest.importorskip("diffusers_models")
    model, args, kwargs, expect = diffusers_models.MODELS["wan"]()  # self- and cross-attention per block
    program = si.export(model, args, kwargs, sparsity=0.5, min_tokens=0)
    targets = attention_targets(program)
    sdpa = [t for t in targets if "scaled_dot_product_attention" in t]
    assert sum(t.startswith(SPARSE_OPS) for t in targets) == expect["sites"]
    assert len(sdpa) == expect["sites"]  # Wan: one cross-attention per block, left as SDPA


def test_sparsity_zero_exports_plain_sdpa():
    diffusers_models = pytest.importorskip("diffusers_models")
    model, args, kwargs, _ = diffusers_models.MODELS["wan"]()
    program = si.export(model, args, kwargs, sparsity=0.0, min_tokens=0)
    assert not any("sparse_inductor" in t for t in attention_targets(program))
    with torch.no_grad():
        got = first(program.module()(*args, **kwargs))
        want = first(torch.export.export(model, args, kwargs, strict=False).module()(*args, **kwargs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_context_settings_apply_and_program_equals_compiled_model():
    model, inputs = tiny_dit()
    with si.sparsity(0.5, min_tokens=0):
        program = si.export(model, inputs)
    assert any(t.startswith(SPARSE_OPS) for t in attention_targets(program))
    with torch.no_grad():
        got = program.module()(*inputs)
    want = compiled_output(model, inputs, {}, dict(sparsity=0.5, min_tokens=0))
    assert rel_l2(got, want) < 1e-5


class EagerAttention(torch.nn.Module):
    """A video self-attention whose SDPA runs in a frame Dynamo does not trace."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):  # x: [B, C, T, H, W]
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return _eager_sdpa(q, k, v) + F.scaled_dot_product_attention(q, k, v)


@torch._dynamo.disable
def _eager_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def test_attention_outside_dynamo_graphs_is_an_error():
    model = EagerAttention()
    x = torch.randn(1, 32, 4, 8, 8)
    with pytest.raises(RuntimeError, match="cannot be matched|differ between"):
        si.export(model, (x,), sparsity=0.5, min_tokens=0)


@pytest.mark.parametrize("bad,match", [(dict(args=[1]), "args must be a tuple"), (dict(kwargs=[1]), "kwargs must be a dict"),
                                       (dict(model=lambda x: x), "model must be a torch.nn.Module")])
def test_bad_arguments(bad, match):
    model, inputs = tiny_dit()
    call = dict(model=model, args=inputs, kwargs=None)
    call.update(bad)
    with pytest.raises(TypeError, match=match):
        si.export(call["model"], call["args"], call["kwargs"])


def test_aoti_package_runs_sparse_on_cpu(tmp_path):
    """The AOTInductor package of the exported program, loaded back, equals the program (CPU:
    the package calls our ops' CPU path)."""
    model, inputs = tiny_dit()
    program = si.export(model, inputs, sparsity=0.5, min_tokens=0)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "tiny.pt2"))
    package = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        got, want, dense = package(*inputs), program.module()(*inputs), model(*inputs)
    assert rel_l2(got, want) < 1e-5
    assert rel_l2(got, dense) > 1e-3
    assert math.isfinite(got.abs().sum().item())



@pytest.mark.parametrize("mask", ["outer", "outer-broadcast", "key"])
def test_exported_padding_masks_equal_the_eager_op(mask):
    """HunyuanVideo 1.5's m_i & m_j (its padded query rows 0, as in SDPA) and a plain key-padding
    mask are converted as the backend's rewrite converts them. (HunyuanVideo 1.5 and Framepack
    themselves do not export: torch.export stops at their data-dependent text reordering.)"""
    from joint_models import JointTokens, joint_inputs

    torch.manual_seed(0)
    model = JointTokens(mask=mask).eval()
    grid = (4, 8, 8)
    inputs = joint_inputs(grid, text_len=6)
    program = si.export(model, inputs, sparsity=0.5, min_tokens=0)
    assert sum(t.startswith(SPARSE_OPS) for t in attention_targets(program)) == 1
    with torch.no_grad():
        got = program.module()(*inputs)
        want = model.eager_sparse(*inputs, grid, sparsity=0.5)
        dense = model(*inputs)
    assert rel_l2(got, want) < 1e-5
    assert rel_l2(got, dense) > 1e-3


def test_coordinate_grid_sites_export_dense_with_the_reason(caplog):
    """A grid read from a coordinates input at each call cannot be fixed in a program: those sites
    export as SDPA, and the log says why."""
    diffusers_models = pytest.importorskip("diffusers_models")
    model, args, kwargs, _ = diffusers_models.MODELS["ltx_video_condition"]()
    with caplog.at_level("INFO", logger="sparse_inductor"):
        program = si.export(model, args, kwargs, sparsity=0.5, min_tokens=0)
    assert not any(t.startswith(SPARSE_OPS) for t in attention_targets(program))
    assert "cannot read the grid from the coordinates" in caplog.text
