"""sparse_inductor.nn: VideoSparseAttention (fine + gate ⊙ coarse) and coarse_attention against a
float64 composition of the reference semantics (sparse_inductor/reference.py)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import REL_TOL, assert_close_rel, grids, sparsities, tiles
import sparse_inductor as si
from sparse_inductor.nn import VideoSparseAttention, coarse_attention
from sparse_inductor.reference import reference_video_sparse_attention, tile_ids

# float64 on CPU: the op, the pooling and the reference all compute in float64, so the only
# differences are summation order (~1e-15); 1e-10 leaves room and still catches any wrong term.
F64_TOL = 1e-10


def reference_coarse(q, k, v, grid, tile):
    """Tile means through a one-hot matrix built from raster coordinates (not the layout code),
    softmax over tiles, each token gets its tile's row."""
    ids = tile_ids(grid, tile)
    one_hot = F.one_hot(ids, int(ids.max()) + 1).to(torch.float64)  # [N, M]
    size = one_hot.sum(0)[:, None]

    def pool(x):
        return torch.einsum("bhnd,nm->bhmd", x.to(torch.float64), one_hot) / size

    scores = pool(q) @ pool(k).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, -1) @ pool(v))[:, :, ids]


def rope_like(x):
    """A fixed position-dependent rotation of channel pairs, ``[B, N, heads, D]``."""
    N, D = x.shape[1], x.shape[-1]
    angle = torch.arange(N, dtype=x.dtype).view(N, 1) * torch.linspace(0.1, 1.0, D // 2, dtype=x.dtype)
    cos, sin = angle.cos().view(1, N, 1, -1), angle.sin().view(1, N, 1, -1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


def reference_module(module, x, grid, rotary=None):
    """The module's forward written out in float64 from its parameters and the oracle."""
    p = {name: t.detach().double().requires_grad_() for name, t in module.named_parameters()}
    B, N, C = x.shape
    heads, D = module.num_heads, module.head_dim
    x = x.double()

    def linear(name, inp):
        return inp @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    q, k, v = (linear(n, x).view(B, N, heads, D) for n in ("to_q", "to_k", "to_v"))
    if module.norm_q is not None:
        def rms(t, w):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        q, k = rms(q, p["norm_q.weight"]), rms(k, p["norm_k.weight"])
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = reference_video_sparse_attention(q, k, v, grid, module.sparsity, module.tile)
    out = out.transpose(1, 2).reshape(B, N, C)
    if module.to_gate is not None:
        coarse = reference_coarse(q, k, v, grid, module.tile).transpose(1, 2).reshape(B, N, C)
        out = out + linear("to_gate", x) * coarse
    return linear("to_out", out), p


@given(grid=grids(200), tile=tiles, sparsity=sparsities, B=st.integers(1, 2), heads=st.integers(1, 3),
       D=st.sampled_from([8, 16]), qk_norm=st.booleans(), use_rotary=st.booleans(), seed=st.integers(0, 2**16))
def test_module_equals_float64_reference_composition_with_gradients(grid, tile, sparsity, B, heads, D, qk_norm,
                                                                    use_rotary, seed):
    torch.manual_seed(seed)
    module = VideoSparseAttention(heads * D, heads, sparsity=sparsity, tile=tile, qk_norm=qk_norm).double()
    torch.nn.init.normal_(module.to_gate.weight, std=0.3)  # a trained, non-zero gate
    torch.nn.init.normal_(module.to_gate.bias, std=0.3)
    if qk_norm:
        torch.nn.init.normal_(module.norm_q.weight, 1.0, 0.2)
        torch.nn.init.normal_(module.norm_k.weight, 1.0, 0.2)
    x = torch.randn(B, math.prod(grid), heads * D, dtype=torch.float64, requires_grad=True)
    rotary = rope_like if use_rotary else None
    out = module(x, grid, rotary)
    ref, ref_params = reference_module(module, x, grid, rotary)
    assert_close_rel(out, ref, F64_TOL, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for name, param in module.named_parameters():
        assert_close_rel(param.grad, ref_params[name].grad, F64_TOL, f"grad of {name}")


@given(grid=grids(300), tile=tiles, dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_coarse_attention_matches_reference_with_gradients(grid, tile, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, math.prod(grid), 16, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    out = coarse_attention(q, k, v, grid, tile=tile)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_coarse(q64, k64, v64, grid, tile)
    # fp32: pooling and softmax in fp32 over at most 300 tokens.
    tol = F64_TOL if dtype == torch.float64 else REL_TOL[torch.float32]["out"]
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rel(out, ref, tol, "coarse output")
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close_rel(a, b, 10 * tol, f"d{name}")


@given(grid=grids(300), tile=tiles, sparsity=sparsities, seed=st.integers(0, 2**16))
def test_zero_gate_is_exactly_fine_only(grid, tile, sparsity, seed):
    """At initialisation the gate is 0: the gated layer equals video_sparse_attention + out
    projection bit for bit (DESIGN.md §3.4)."""
    torch.manual_seed(seed)
    gated = VideoSparseAttention(32, 2, sparsity=sparsity, tile=tile)
    assert not gated.to_gate.weight.any() and not gated.to_gate.bias.any()
    x = torch.randn(2, math.prod(grid), 32)
    B, N, _ = x.shape
    q, k, v = (getattr(gated, n)(x).view(B, N, 2, 16).transpose(1, 2) for n in ("to_q", "to_k", "to_v"))
    fine = si.video_sparse_attention(q, k, v, grid, sparsity=sparsity, tile=tile) if sparsity > 0 else \
        F.scaled_dot_product_attention(q, k, v)
    want = gated.to_out(fine.transpose(1, 2).reshape(B, N, 32))
    assert torch.equal(gated(x, grid), want)


def test_sparsity_zero_is_dense_sdpa_plus_gated_coarse():
    torch.manual_seed(0)
    grid = (3, 5, 6)
    module = VideoSparseAttention(64, 2, sparsity=0.0, tile=(2, 4, 4)).double()
    torch.nn.init.normal_(module.to_gate.weight, std=0.5)
    x = torch.randn(2, math.prod(grid), 64, dtype=torch.float64)
    B, N, C = x.shape
    q, k, v = (getattr(module, n)(x).view(B, N, 2, 32).transpose(1, 2) for n in ("to_q", "to_k", "to_v"))
    dense = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    coarse = reference_coarse(q, k, v, grid, (2, 4, 4)).transpose(1, 2).reshape(B, N, C)
    want = module.to_out(dense + module.to_gate(x) * coarse)
    assert_close_rel(module(x, grid), want, F64_TOL, "sparsity 0")


def test_gate_receives_gradient_at_init_and_learns():
    """The zero gate must not be a dead end: d loss / d gate = coarse ⊙ upstream ≠ 0."""
    torch.manual_seed(1)
    module = VideoSparseAttention(32, 2, sparsity=0.5)
    x = torch.randn(2, 4 * 4 * 8, 32)
    module(x, (4, 4, 8)).square().mean().backward()
    assert module.to_gate.weight.grad.abs().sum() > 0 and module.to_gate.bias.grad.abs().sum() > 0
    before = module.to_gate.weight.detach().clone()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert not torch.equal(module.to_gate.weight, before)


def test_ungated_module_has_no_gate_parameters():
    module = VideoSparseAttention(32, 2, gated=False)
    assert module.to_gate is None and not any("gate" in n for n, _ in module.named_parameters())


class _Net(torch.nn.Module):
    """Conv3d patchify -> VideoSparseAttention: the grid is visible to the backend's pass."""

    def __init__(self, sparsity):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.attn = VideoSparseAttention(32, 2, sparsity=sparsity, gated=False)

    def forward(self, x):
        T, H, W = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
        return self.attn(self.embed(x).flatten(2).transpose(1, 2), (T, H, W))


def test_sparsity_zero_layer_is_an_sdpa_site_the_backend_can_make_sparse():
    x = torch.randn(1, 3, 5, 12, 16)
    with si.sparsity(0.5, min_tokens=0):
        rows = si.explain(_Net(0.0), x).rows
        assert [(r["module"], r["grid"], r["decision"]) for r in rows] == [("attn", (5, 6, 8), "sparse")]
        # With its own sparsity the layer calls the sparse op: no SDPA left for the pass.
        assert len(si.explain(_Net(0.5), x)) == 0


def test_compiled_with_inductor_matches_eager_with_gradients():
    torch.manual_seed(2)
    module = VideoSparseAttention(32, 2, sparsity=0.5, tile=(2, 2, 4))
    torch.nn.init.normal_(module.to_gate.weight, std=0.3)
    x = torch.randn(2, 4 * 6 * 8, 32)
    grid = (4, 6, 8)
    eager_out = module(x, grid)
    eager_out.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_out = torch.compile(module, backend="inductor")(x, grid)
    # The layout is built in the graph when traced, not read through the lru_cache (which Dynamo
    # warns about and skips).
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    compiled_out.square().sum().backward()
    tol = REL_TOL[torch.float32]
    assert_close_rel(compiled_out, eager_out, tol["out"], "compiled output")
    for n, p in module.named_parameters():
        assert_close_rel(p.grad, eager_grads[n], tol["grad"], f"compiled grad of {n}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=30, num_heads=4), "dim .30. must be divisible by num_heads .4."),
    (dict(dim=0, num_heads=1), "dim must be a positive int"),
    (dict(dim=32, num_heads=2.0), "num_heads must be a positive int"),
    (dict(dim=600, num_heads=2), "head dim .* at most 256"),
    (dict(dim=32, num_heads=2, sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
    (dict(dim=32, num_heads=2, sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
    (dict(dim=32, num_heads=2, tile=(4, 4)), "tile must be a tuple of three positive ints"),
    (dict(dim=32, num_heads=2, tile=(8, 8, 8)), "at most 256 tokens per tile"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoSparseAttention(**kwargs)


def test_bad_forward_arguments_name_the_argument():
    module = VideoSparseAttention(32, 2)
    with pytest.raises(ValueError, match=r"x must be a \[B, N, dim=32\] tensor, got \(2, 64, 16\)"):
        module(torch.randn(2, 64, 16), (4, 4, 4))
    with pytest.raises(ValueError, match=r"x has N=64 tokens but grid \(4, 4, 5\) holds T\*H\*W=80"):
        module(torch.randn(2, 64, 32), (4, 4, 5))
    with pytest.raises(ValueError, match="grid must be a tuple of three positive ints"):
        module(torch.randn(2, 64, 32), (8, 8))
    with pytest.raises(ValueError, match=r"q has N=64 tokens but grid \(4, 4, 5\)"):
        coarse_attention(*(torch.randn(1, 1, 64, 8) for _ in range(3)), (4, 4, 5))
