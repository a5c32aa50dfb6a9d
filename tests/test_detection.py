"""Hypothesis over model variants: every video self-attention is found with the right grid and
text span; cross-attention, causal, dropout, masked and short SDPAs stay exactly as written."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from joint_models import JointTokens, ValidPromptTokens, eager_sparse_prompt_attention, joint_inputs
import sparse_inductor as si
from helpers import needs_unbacked_text
from sparse_inductor.attention import sparse_attention
from video_dit import TinyVideoDiT


@given(
    # Real videos have more than a handful of tokens; a 1-token "video" is shape-ambiguous.
    grid=st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 9)).filter(lambda g: g[0] * g[1] * g[2] >= 4),
    patch=st.sampled_from([(1, 2, 2), (2, 2, 2), (1, 1, 1), (1, 2, 1)]),
    heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16]),
    channels_last=st.booleans(), qkv_layout=st.sampled_from(["bnhd", "bhnd"]),
    joint=st.sampled_from([None, "before", "after"]), text_len=st.integers(1, 9),
)
def test_video_self_attention_found_with_grid_and_span(grid, patch, heads, head_dim, channels_last, qkv_layout,
                                                       joint, text_len):
    model = TinyVideoDiT(dim=heads * head_dim, heads=heads, layers=2, patch=patch,
                         channels_last=channels_last, qkv_layout=qkv_layout, joint=joint).eval()
    latents = torch.randn(2, 4, *(g * p for g, p in zip(grid, patch)))
    text = torch.randn(2, text_len, 16)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        explanation = si.explain(model, latents, text)
    rows = list(explanation)
    assert len(rows) == 4  # per block: self-attention, cross-attention
    span = {None: None, "before": (text_len, 0), "after": (0, text_len)}[joint]
    for self_row, cross_row in zip(rows[::2], rows[1::2]):
        assert self_row["decision"] == "sparse", str(explanation)
        assert self_row["grid"] == grid and self_row["text_span"] == span
        # With as many text as video tokens the shapes match; the keys' origin still tells.
        assert cross_row["decision"] == "dense" and ("cross-attention" in cross_row["reason"]
                                                     or "keys do not come" in cross_row["reason"])


class OtherAttentions(nn.Module):
    """Video tokens from a Conv3d patchify, then SDPAs the backend must leave alone."""

    def __init__(self, dropout_p=0.1):
        super().__init__()
        self.dropout_p = dropout_p
        self.patch = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [B, N, 32]
        B, N, _ = tokens.shape
        q = k = v = tokens.view(B, N, 2, 16).transpose(1, 2)
        float_mask = torch.linspace(0, 1, N, device=x.device).expand(N, N)  # an additive bias
        bool_mask = torch.ones(B, 1, 1, N, dtype=torch.bool, device=x.device)
        outs = [
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p),
            F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask),
            F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
            F.scaled_dot_product_attention(q, k, v, scale=0.3),  # eligible: decided by min_tokens
            torch._C._nn.scaled_dot_product_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50]),
        ]
        return sum(o.sum() for o in outs)


def test_other_attentions_stay_dense_with_reasons():
    x = torch.randn(3, 4, 5, 12, 20)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=301):
        rows = list(si.explain(OtherAttentions().train(), x))
    reasons = [r["reason"] for r in rows]
    assert [r["decision"] for r in rows] == ["dense"] * 6, reasons
    assert reasons[0] == "causal attention"
    assert reasons[1].startswith("dropout_p=0.1")
    assert "additive bias" in reasons[2]  # (an all-zero float mask is exactly no mask: below)
    assert "without text tokens" in reasons[3]
    assert reasons[4] == "300 video tokens < min_tokens=301"
    assert "grid not found" in reasons[5] and "slice" in reasons[5]
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        rows = list(si.explain(OtherAttentions().eval(), x))
    assert rows[4]["decision"] == "sparse" and rows[4]["grid"] == (5, 6, 10)


class ZeroFloatMask(nn.Module):
    """One video self-attention with an all-zero additive mask (exactly no mask), or none."""

    def __init__(self, with_mask):
        super().__init__()
        self.with_mask = with_mask
        self.patch = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        B, N, _ = tokens.shape
        q = k = v = tokens.view(B, N, 2, 16).transpose(1, 2)
        mask = torch.zeros(N, N, device=x.device) if self.with_mask else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_all_zero_float_mask_is_no_mask():
    x = torch.randn(3, 4, 5, 12, 20)
    models = []
    for with_mask in (True, False):
        torch.manual_seed(0)
        models.append(ZeroFloatMask(with_mask).eval())
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        assert [r["decision"] for r in si.explain(models[0], x)] == ["sparse"]
        outs = []
        for model in models:
            torch._dynamo.reset()
            outs.append(torch.compile(model, backend="sparse_inductor")(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert ((outs[0] - models[1](x)).norm() / outs[1].norm()).item() > 1e-2  # sparse, not dense


def test_compiled_model_with_untouched_attentions_equals_inductor():
    torch.manual_seed(0)
    model = OtherAttentions(dropout_p=0.0).eval()  # dropout is random: keep outputs comparable
    x = torch.randn(3, 4, 5, 12, 20)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=301):  # every site dense
        got = torch.compile(model, backend="sparse_inductor")(x)
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-3)


class BrokenPatchify(nn.Module):
    """A graph break between the patch embedding and the attention."""

    def __init__(self):
        super().__init__()
        self.inner = TinyVideoDiT()

    def forward(self, latents, text):
        tokens = self.inner.patch_embed(latents).flatten(2).transpose(1, 2)
        torch._dynamo.graph_break()
        B, N, C = tokens.shape
        q = k = v = tokens.view(B, N, 2, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)


class PrePacked(nn.Module):
    """Tokens arrive already flattened: no graph can prove the grid."""

    def forward(self, tokens):
        B, N, C = tokens.shape
        q = k = v = tokens.view(B, N, 2, C // 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)


def test_grid_from_earlier_graph_and_from_config():
    latents, text = torch.randn(3, 4, 5, 12, 20), torch.randn(3, 7, 16)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        rows = list(si.explain(BrokenPatchify(), latents, text))
        assert rows[0]["decision"] == "sparse"
        assert rows[0]["grid"] == (5, 6, 10) and rows[0]["grid_source"] == "earlier graph"
        packed = torch.randn(3, 300, 32)
        row = list(si.explain(PrePacked(), packed))[0]
        assert row["decision"] == "dense" and "grid=(T, H, W)" in row["reason"]
        with si.sparsity(grid=(5, 6, 10)):
            explanation = si.explain(PrePacked(), packed)
            row = list(explanation)[0]
            assert row["decision"] == "sparse" and row["grid_source"] == "config"
            assert "(5, 6, 10) (config)" in str(explanation)
            torch._dynamo.reset()
            got = torch.compile(PrePacked(), backend="sparse_inductor")(packed)
        q = packed.view(3, 300, 2, 16).transpose(1, 2)
        torch.testing.assert_close(got, si.video_sparse_attention(q, q, q, (5, 6, 10), sparsity=0.5))
        with si.sparsity(grid=(5, 6, 11)):
            row = list(si.explain(PrePacked(), packed))[0]
            assert row["decision"] == "dense" and "does not match" in row["reason"]


class RepeatedKeyHeads(nn.Module):
    """Grouped-query attention written as a head repeat (Cosmos: ``key.repeat_interleave(n, dim)``
    over the head axis), and RoPE written as ``(rope * x).sum(-1)`` (Kandinsky): neither mixes
    tokens, so the site is sparse with the patch embedding's grid. ``reduce_tokens`` instead
    averages the queries over the token axis: token-mixing (dense)."""

    def __init__(self, tokens, heads=4, kv_heads=2, head_dim=8, reduce_tokens=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.reduce_tokens = heads, kv_heads, head_dim, reduce_tokens
        self.embed = nn.Conv3d(4, 32, (1, 2, 2), (1, 2, 2))
        self.q = nn.Linear(32, heads * head_dim)
        self.kv = nn.Linear(32, 2 * kv_heads * head_dim)
        angles = torch.randn(tokens, 1, head_dim // 2, 1)
        rot = torch.cat([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], -1).view(tokens, 1, head_dim // 2, 2, 2)
        self.register_buffer("rope", rot)

    def rotate(self, x):  # [B, N, H, D] -> the same, rotated pairwise
        B, N, H, D = x.shape
        pairs = x.view(B, N, H, D // 2, 1, 2)
        return (self.rope * pairs).sum(-1).flatten(-2)

    def forward(self, latents):
        tokens = self.embed(latents).flatten(2).transpose(1, 2)
        B, N, _ = tokens.shape
        q = self.rotate(self.q(tokens).view(B, N, self.heads, self.head_dim))
        if self.reduce_tokens:  # every query the mean over the tokens: not a token-ordered query
            q = q.mean(dim=1, keepdim=True).expand(B, N, self.heads, self.head_dim).contiguous()
        k, v = self.kv(tokens).view(B, N, 2, self.kv_heads, self.head_dim).unbind(2)
        k = self.rotate(k)
        k, v = (x.repeat_interleave(self.heads // self.kv_heads, dim=2) for x in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(B, N, -1)


@given(grid=st.sampled_from([(3, 4, 5), (2, 6, 3), (5, 2, 7)]), kv_heads=st.sampled_from([1, 2, 4]))
def test_head_repeats_and_feature_sums_keep_the_grid(grid, kv_heads):
    latents = torch.randn(2, 4, grid[0], 2 * grid[1], 2 * grid[2])
    model = RepeatedKeyHeads(grid[0] * grid[1] * grid[2], kv_heads=kv_heads).eval()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        (row,) = si.explain(model, latents).rows
    assert row["decision"] == "sparse" and row["grid"] == grid, row
    # A reduction over the token axis on the query's path mixes tokens: dense, with the reason.
    mixing = RepeatedKeyHeads(grid[0] * grid[1] * grid[2], kv_heads=kv_heads, reduce_tokens=True).eval()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        (row,) = si.explain(mixing, latents).rows
    assert row["decision"] == "dense" and "token axis" in row["reason"], row


class PerFrameAdapter(nn.Module):
    """A per-frame cross-attention adapter whose output joins the video tokens (Wan Animate's face
    adapter): its queries are one frame's tokens, ``x.unflatten(1, (T, -1)).flatten(0, 1)``, and its
    output goes back by ``unflatten(0, (B, T)).flatten(1, 2)``. The self-attention after it is over
    the patch embedding's tokens, through the adapter too. ``residual=False``: only the adapter's
    output feeds the self-attention. ``flip_frames``: the adapter reverses each frame's tokens (the
    self-attention's queries are then not in raster order)."""

    def __init__(self, frames, residual=True, flip_frames=False):
        super().__init__()
        self.residual, self.flip_frames = residual, flip_frames
        self.embed = nn.Conv3d(4, 16, (1, 2, 2), (1, 2, 2))
        self.to_q, self.to_kv, self.to_qkv = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(16, 48)
        self.motion = nn.Parameter(torch.randn(1, frames, 3, 16))  # 3 context tokens per frame

    def forward(self, latents):
        tokens = self.embed(latents).flatten(2).transpose(1, 2)  # [B, N, C]
        B, N, C = tokens.shape
        T = latents.shape[2]
        q = self.to_q(tokens).unflatten(1, (T, -1)).flatten(0, 1)  # [B*T, H*W, C]
        k, v = self.to_kv(self.motion.expand(B, -1, -1, -1)).flatten(0, 1).chunk(2, dim=-1)  # [B*T, 3, C]
        q, k, v = (x.unflatten(-1, (2, 8)).transpose(1, 2) for x in (q, k, v))
        per_frame = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B*T, H*W, C]
        if self.flip_frames:
            per_frame = per_frame.flip(1)
        adapted = per_frame.unflatten(0, (B, T)).flatten(1, 2)  # [B, N, C]
        x = tokens + adapted if self.residual else adapted
        q, k, v = self.to_qkv(x).view(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)


@given(grid=st.sampled_from([(3, 4, 5), (2, 6, 3), (5, 2, 7), (4, 3, 3)]), batch=st.sampled_from([1, 2, 3]),
       residual=st.booleans())
def test_per_frame_adapter_keeps_the_grid(grid, batch, residual):
    """Walking back through the adapter, ``flatten(0, 1)`` of ``[B, T, H*W, C]`` makes the batch a
    leading axis of the token state: it is the adapter's per-frame split, not a grid axis."""
    latents = torch.randn(batch, 4, grid[0], 2 * grid[1], 2 * grid[2])
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        adapter, self_attention = si.explain(PerFrameAdapter(grid[0], residual).eval(), latents).rows
    assert adapter["decision"] == "dense" and "cross-attention" in adapter["reason"], adapter
    assert self_attention["decision"] == "sparse" and self_attention["grid"] == grid, self_attention
    # Reversed tokens within each frame: the queries are not in raster order, the site stays dense.
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        _, flipped = si.explain(PerFrameAdapter(grid[0], residual=False, flip_frames=True).eval(), latents).rows
    assert flipped["decision"] == "dense" and "flip" in flipped["reason"], flipped


class PerFrameConvFeedForward(nn.Module):
    """A feed-forward that convolves each frame (SANA-WM's GLUMBConvTemp): the tokens go to
    ``[B*T, C, H, W]`` by ``reshape(B*T, H, W, C).permute``, and come back by ``view(B, T, C, H*W)``
    (batch and frames split apart again), a temporal conv over ``[B, C, T, H*W]``, and
    ``permute(0, 2, 3, 1).reshape(B, N, C)``. A self-attention follows; ``residual=False``: its
    tokens come through the feed-forward only."""

    def __init__(self, grid, residual=True):
        super().__init__()
        self.grid, self.residual = grid, residual
        self.embed = nn.Conv3d(4, 16, (1, 2, 2), (1, 2, 2))
        self.spatial = nn.Conv2d(16, 16, 3, padding=1)
        self.temporal = nn.Conv2d(16, 16, (3, 1), padding=(1, 0))
        self.to_qkv = nn.Linear(16, 48)

    def forward(self, latents):
        tokens = self.embed(latents).flatten(2).transpose(1, 2)  # [B, N, C]
        B, N, C = tokens.shape
        T, H, W = self.grid
        x = self.spatial(tokens.reshape(B * T, H, W, C).permute(0, 3, 1, 2))  # [B*T, C, H, W]
        x = x.view(B, T, C, H * W).permute(0, 2, 1, 3)  # [B, C, T, H*W]
        x = (x + self.temporal(x)).permute(0, 2, 3, 1).reshape(B, N, C)
        x = tokens + x if self.residual else x
        q, k, v = self.to_qkv(x).view(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)


@given(grid=st.sampled_from([(3, 4, 5), (2, 6, 3), (5, 2, 7), (4, 3, 3)]), batch=st.sampled_from([2, 3]),
       residual=st.booleans())
def test_per_frame_feed_forward_keeps_the_grid(grid, batch, residual):
    """Walking back through ``view(B, T, C, H*W)`` of ``[B*T, C, H, W]``, only the frames of the split
    axis are tokens: the merged ``B*T`` axis is the grid's first axis divided by the batch (it was
    taken for the grid's first axis whole, ``(B*T, H, W)``, and the residual's grid disagreed)."""
    latents = torch.randn(batch, 4, grid[0], 2 * grid[1], 2 * grid[2])
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        (row,) = si.explain(PerFrameConvFeedForward(grid, residual).eval(), latents).rows
    assert row["decision"] == "sparse" and row["grid"] == grid, row


@needs_unbacked_text
@pytest.mark.parametrize("text", ["after", "before"])
def test_data_dependent_text_length(text):
    """The text span's length is a symbol; the compiled site computes it from the sequence length
    at run time: every sample's output equals the eager sparse op with that sample's text length,
    also on a second call with other lengths (without recompiling)."""
    grid, g = (3, 4, 5), torch.Generator().manual_seed(0)
    latents, prompt = torch.randn(2, 4, 3, 8, 10, generator=g), torch.randn(2, 9, 8, generator=g)
    masks = (torch.tensor([[1] * 9, [1] * 5 + [0] * 4], dtype=torch.bool),
             torch.tensor([[1, 0] * 4 + [1], [0] * 8 + [1]], dtype=torch.bool))
    model = ValidPromptTokens(text).eval()
    captured = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0), captured:
        rows = si.explain(model, latents, prompt, masks[0]).rows
        assert [r["decision"] for r in rows] == ["sparse", "sparse"], rows
        symbolic = 0 if text == "before" else 1
        for row in rows:
            assert row["grid"] == grid and isinstance(row["text_span"][symbolic], str), row
            assert row["text_span"][1 - symbolic] == 0, row
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse_inductor")
        for n, mask in enumerate(masks):
            with torch._dynamo.config.patch(error_on_recompile=n > 0):
                got = compiled(latents, prompt, mask)
            for out, want in zip(got, eager_sparse_prompt_attention(model, latents, prompt, mask, grid)):
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        both = ValidPromptTokens("both").eval()
        rows = si.explain(both, latents, prompt, masks[0]).rows
    assert all(r["decision"] == "dense" and "symbolic text spans before and after" in r["reason"] for r in rows), rows


@given(grid=st.sampled_from([(4, 4, 6), (2, 6, 4), (4, 2, 8)]), text_len=st.integers(2, 9), history=st.booleans(),
       graph_break=st.booleans(), mask=st.sampled_from([None, "key", "outer", "outer-broadcast"]))
def test_joint_tokens_behind_cats_and_graph_breaks(grid, text_len, history, graph_break, mask):
    """The video span is found behind a ``cat`` with history and text tokens, also when a graph
    break makes the tokens a graph input (the layout of the earlier graph's output is remembered);
    a padding mask, or the outer product of one, is a key-padding mask."""
    inputs = joint_inputs(grid, text_len)
    model = JointTokens(history=history, graph_break=graph_break, mask=mask).eval()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        (row,) = si.explain(model, *inputs).rows
    n_history = grid[0] // 2 * (grid[1] // 2) * (grid[2] // 2) if history else 0
    assert row["decision"] == "sparse", row
    assert row["grid"] == grid and row["text_span"] == (n_history, text_len), row
    assert row["grid_source"] == ("earlier graph" if graph_break else "graph"), row


@pytest.mark.parametrize("history,graph_break,mask", [(False, True, "outer"), (True, True, "key"),
                                                      (True, False, "outer-broadcast")])
def test_joint_tokens_compiled_equal_eager_sparse_op(history, graph_break, mask):
    """The rewritten site equals the eager op over the video span (history and text dense, padded
    keys hidden, a padded query's row 0); at sparsity 0 the compiled model equals SDPA."""
    grid = (4, 4, 6)
    inputs = joint_inputs(grid, 5)
    model = JointTokens(history=history, graph_break=graph_break, mask=mask).eval()
    with torch.no_grad():
        want = model.eager_sparse(*inputs, grid, sparsity=0.5)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse_inductor")
        with si.sparsity(0.5, min_tokens=0):
            got = compiled(*inputs)
        with si.sparsity(0.0):
            dense = compiled(*inputs)
        sdpa = model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - sdpa).abs().max() > 1e-3  # the sparse path was taken
    torch.testing.assert_close(dense, sdpa, rtol=1e-5, atol=1e-5)


def test_joint_tokens_that_stay_dense():
    """Not an outer product of one padding mask; two video grids of one size in a sequence: dense,
    with the reason."""
    grid = (4, 4, 6)
    inputs = joint_inputs(grid, 5)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        (mixed,) = si.explain(JointTokens(mask="mixed").eval(), *inputs).rows
        (permuted,) = si.explain(JointTokens(mask="permuted").eval(), *inputs).rows
        (equal,) = si.explain(JointTokens(history=True, equal_history=True).eval(), *inputs).rows
        (equal_break,) = si.explain(JointTokens(history=True, equal_history=True, graph_break=True).eval(),
                                    *inputs).rows
    for row in (mixed, permuted):
        assert row["decision"] == "dense" and "attn_mask" in row["reason"], row
    assert equal["decision"] == "dense" and "grids of the same size" in equal["reason"], equal
    # Behind a graph break the earlier graph remembers no layout for the two grids' tokens.
    assert equal_break["decision"] == "dense" and "grid not found" in equal_break["reason"], equal_break


def raster_coordinates(batch, grid, bounds=False):
    """``[B, 3, N]`` frame / row / column coordinates of a raster over ``grid`` as a pipeline
    precomputes them (LTX: frames scaled by the VAE stride with the first frame clamped, then by
    1/fps; rows and columns by the spatial stride); ``bounds``: LTX-2's ``[B, 3, N, 2]``
    ``[start, end)`` pairs."""
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    t = (t * 8 + 1 - 8).clamp(min=0) / 25.0
    coords = torch.stack([t, h * 32, w * 32]).flatten(1).unsqueeze(0).repeat(batch, 1, 1)
    if bounds:
        coords = torch.stack([coords, coords + torch.tensor([8 / 25.0, 32, 32])[None, :, None]], dim=-1)
    return coords


class CoordinateRoPE(nn.Module):
    """Packed tokens ``[B, N, C]`` whose positions arrive as a coordinates input (LTX-Video's
    condition pipeline, LTX-2): the RoPE built from them is the only place the grid shows, and
    only in their values. ``bounds``: coordinates are ``[start, end)`` pairs, midpoints used."""

    def __init__(self, heads=2, head_dim=12, bounds=False):
        super().__init__()
        self.heads, self.head_dim, self.bounds = heads, head_dim, bounds
        self.to_qkv = nn.Linear(8, 3 * heads * head_dim)
        self.register_buffer("freqs", torch.linspace(1.0, 4.0, head_dim // 6))

    def forward(self, tokens, coords):
        B, N, _ = tokens.shape
        if self.bounds:
            start, end = coords.chunk(2, dim=-1)
            coords = ((start + end) / 2).squeeze(-1)
        pos = torch.stack([coords[:, i] / 100.0 for i in range(3)], dim=-1)  # [B, N, 3]
        angles = (pos.unsqueeze(-1) * self.freqs).flatten(2)  # [B, N, 3 * (head_dim // 6)]
        cos, sin = (f(angles).repeat_interleave(2, dim=-1)[:, :, None] for f in (torch.cos, torch.sin))
        pad = self.head_dim - cos.shape[-1]  # leading features not rotated (LTX pads the same way)
        cos, sin = F.pad(cos, (pad, 0), value=1.0), F.pad(sin, (pad, 0), value=0.0)
        q, k, v = self.to_qkv(tokens).view(B, N, 3, self.heads, self.head_dim).unbind(2)

        def rope(x):  # [B, N, H, D], pairs rotated
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            return x * cos + torch.stack([-x2, x1], dim=-1).flatten(-2) * sin

        out = F.scaled_dot_product_attention(rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    def eager_sparse(self, tokens, coords, grid, sparsity):
        """The model with the eager sparse op on ``grid`` in place of its attention."""
        from unittest import mock

        from sparse_inductor.attention import sparse_attention

        def sparse_sdpa(q, k, v, **kw):
            return sparse_attention(q, k, v, grid, tile=(4, 4, 4), sparsity=sparsity)
        with mock.patch.object(F, "scaled_dot_product_attention", sparse_sdpa):
            return self(tokens, coords)


@given(grid=st.sampled_from([(3, 4, 5), (2, 6, 3), (5, 2, 7), (1, 4, 4)]), batch=st.sampled_from([1, 2, 3]),
       bounds=st.booleans(), layout=st.sampled_from(["raster", "shuffled", "two grids", "repeated"]))
def test_grid_read_from_coordinates_values(grid, batch, bounds, layout):
    """The query's RoPE comes from a coordinates input: the grid is read from its values, exact
    raster order over the distinct coordinate values; anything else stays dense with the reason."""
    n = torch.Size(grid).numel()
    coords = raster_coordinates(batch, grid, bounds)
    if layout == "shuffled":  # two tokens' positions swapped
        coords = coords.clone()
        coords[:, :, [0, n - 1]] = coords[:, :, [n - 1, 0]]
    elif layout == "two grids":  # a conditioning clip's tokens before the video's (LTX conditions)
        coords = torch.cat([raster_coordinates(batch, (1, grid[1], grid[2]), bounds), coords], dim=2)
    elif layout == "repeated":  # every token of the first frame again (a repeated position)
        coords = torch.cat([coords[:, :, : grid[1] * grid[2]], coords], dim=2)
    tokens = torch.randn(batch, coords.shape[2], 8)
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        (row,) = si.explain(CoordinateRoPE(bounds=bounds).eval(), tokens, coords).rows
    if layout == "raster" or (layout != "shuffled" and grid[0] > 1):
        # Conditioning frames before the video (or its first frame repeated) are kept whole, like text.
        span = None if layout == "raster" else (grid[1] * grid[2], 0)
        assert row["decision"] == "sparse" and row["grid"] == grid and row["grid_source"] == "coordinates", row
        assert row["text_span"] == span, row
    else:
        assert row["decision"] == "dense" and "coordinates" in row["reason"], row
        assert ("raster order" if layout == "shuffled" else "not one grid") in row["reason"], row
        if layout != "shuffled":  # a one-frame clip before a one-frame video: two runs of one size
            assert "ambiguous" in row["reason"], row


def test_grid_from_coordinates_read_at_each_call():
    """Compiled once: each call reads the grid of the coordinates it gets (a new grid of the same
    token count runs that grid's variant; coordinates that are no grid run dense SDPA)."""
    torch.manual_seed(0)
    model = CoordinateRoPE().eval()
    tokens = torch.randn(2, 60, 8)
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        torch._dynamo.reset()
        for grid in ((3, 4, 5), (5, 4, 3), (3, 4, 5)):
            coords = raster_coordinates(2, grid)
            got = compiled(tokens, coords)
            torch.testing.assert_close(got, model.eager_sparse(tokens, coords, grid, 0.5), rtol=1e-5, atol=1e-5)
            assert (got - model(tokens, coords)).abs().max() > 1e-3  # sparse, not dense
        shuffled = raster_coordinates(2, (3, 4, 5))[:, :, torch.randperm(60)]
        torch.testing.assert_close(compiled(tokens, shuffled), model(tokens, shuffled), rtol=1e-5, atol=1e-5)


def packed_video_last(text, audio, grid, keyframes, order):
    """``[L, 3]`` positions of a packed sequence (MiniMax-H3's, :func:`minimax_h3_layout`) and the
    ``(grid, before, after)`` expected of it: ``order`` "last" as the model packs it, ``[text |
    keyframes | audio | video]``; "first": the other way round, ``[video | audio | keyframes |
    text]`` (the audio and keyframe rows reversed); "middle": text rows on both sides (no run at
    either end is the video: dense)."""
    from diffusers_models import minimax_h3_layout

    pos, _, _, _, _ = minimax_h3_layout(text, grid, 2 * audio, keyframes)
    n = torch.Size(grid).numel()
    video, rest = pos[len(pos) - n:], pos[: len(pos) - n]
    if order == "first":
        return torch.cat([video, rest[text:].flip(0), rest[:text]]), (grid, 0, len(rest))
    if order == "middle":
        return torch.cat([rest, video, rest[:text]]), None
    return pos, (grid, len(rest), 0)


video_grids = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 7)).filter(
    lambda g: sum(s > 1 for s in g) >= 2)  # a video, not a line of positions (text, audio)


@given(text=st.integers(1, 12), audio=st.integers(0, 5), keyframes=st.integers(0, 2), grid=video_grids,
       order=st.sampled_from(["last", "first", "middle"]), batched=st.booleans())
def test_video_span_read_from_packed_coordinates(text, audio, keyframes, grid, order, batched):
    """The rows of a packed sequence's coordinates (text, audio, keyframe conditions and the video)
    are not one grid: the video is the longest run of rows at the start or the end of the sequence
    in raster order over a grid of two or more axes; the rows around it are kept whole, like text."""
    from passes.coordinates import video_span_from_coordinates

    pos, want = packed_video_last(text, audio, grid, keyframes, order)
    coords, axes = (pos.T.unsqueeze(0).repeat(2, 1, 1), (2, 1)) if batched else (pos, (0, 1))
    got = video_span_from_coordinates(coords, *axes)
    if want is None:
        assert isinstance(got, str) and "no run of rows at its start or end" in got, got
    else:
        assert got == want


def test_video_span_from_coordinates_edge_cases():
    """Lines of positions are never a video span; two end runs of one size are ambiguous; the
    batch must agree; frames must be whole and in time order."""
    from passes.coordinates import video_span_from_coordinates

    def span(rows):
        return video_span_from_coordinates(torch.tensor(rows, dtype=torch.float64), 0, 1)

    frame = lambda t: [[t, h, w] for h in (0, 1) for w in (0, 1, 2)]  # noqa: E731
    text = [[i, 0, 0] for i in range(3)]
    assert span(text + frame(3) + frame(4)) == ((2, 2, 3), 3, 0)
    assert span(frame(3) + frame(4) + text) == ((2, 2, 3), 0, 3)
    assert span(text + frame(3) + frame(3)) == ((1, 2, 3), 9, 0)  # a repeated frame: the last one is the video
    assert span(frame(3) + frame(4) + frame(9) + frame(1) + frame(2)) == ((3, 2, 3), 0, 12)  # the longer end run
    assert "ambiguous" in span(frame(3) + frame(4) + text + frame(1) + frame(2))
    assert "no run of rows" in span(text + frame(3) + frame(4)[:-1])  # a partial last frame
    assert "no run of rows" in span([[0, 0, i] for i in range(5)] + [[0, 1, 0]])  # lines only
    batch = torch.stack([torch.tensor(text + frame(3) + frame(4)), torch.tensor(frame(3) + frame(4) + text)])
    assert "different" in video_span_from_coordinates(batch.transpose(1, 2), 2, 1)


class PackedTokens(nn.Module):
    """MiniMax-H3's packing: text, audio and video rows, projected apart, are scattered into one
    sequence at run-time indices (``index_copy``); a RoPE over ``position_ids [L, 3]`` is the only
    place where the video's rows and grid show, in its values."""

    def __init__(self, heads=2, head_dim=12):
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.video_in, self.audio_in, self.text_in = nn.Linear(8, dim), nn.Linear(5, dim), nn.Linear(6, dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("freqs", torch.linspace(0.1, 1.0, head_dim // 6))

    def forward(self, video, audio, text, position_ids, video_indices, audio_indices, text_indices):
        B, L = video.shape[0], position_ids.shape[0]
        x = video.new_zeros(B, L, self.heads * self.head_dim)
        x = x.index_copy(1, text_indices, self.text_in(text)).index_copy(1, video_indices, self.video_in(video))
        x = x.index_copy(1, audio_indices, self.audio_in(audio))
        angles = (position_ids.unsqueeze(-1) * self.freqs).flatten(1)  # [L, 3 * (head_dim // 6)]
        cos, sin = (f(angles).repeat_interleave(2, dim=-1)[None, :, None] for f in (torch.cos, torch.sin))
        q, k, v = self.to_qkv(x).view(B, L, 3, self.heads, self.head_dim).unbind(2)

        def rope(x):  # [B, L, H, D], pairs rotated
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            return x * cos + torch.stack([-x2, x1], dim=-1).flatten(-2) * sin

        out = F.scaled_dot_product_attention(rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2).index_select(1, video_indices)

    @staticmethod
    def inputs(text, audio, grid, keyframes=0, seed=0):
        from diffusers_models import minimax_h3_layout

        g = torch.Generator().manual_seed(seed)
        pos, _, video, audio_rows, text_rows = minimax_h3_layout(text, grid, 2 * audio, keyframes)
        return (torch.randn(2, len(video), 8, generator=g), torch.randn(2, len(audio_rows), 5, generator=g),
                torch.randn(2, text, 6, generator=g), pos, video, audio_rows, text_rows)

    def eager_sparse(self, inputs, grid, sparsity):
        """The model with the eager sparse op in place of its attention: every row before the video kept."""
        from unittest import mock

        before = len(inputs[3]) - torch.Size(grid).numel()

        def sparse_sdpa(q, k, v, **kw):
            return sparse_attention(q, k, v, grid, tile=(4, 4, 4), sparsity=sparsity, text_before=before)
        with mock.patch.object(F, "scaled_dot_product_attention", sparse_sdpa):
            return self(*inputs)


def graph_only():
    """The backend with Inductor's compile replaced by running the rewritten graph (what is under test
    is the pass)."""
    from unittest import mock

    from sparse_inductor import _compat

    return mock.patch.object(_compat, "compile_fx", lambda gm, example_inputs, config_patches=None: gm.forward)


@given(text=st.integers(1, 9), audio=st.integers(0, 4), keyframes=st.integers(0, 1),
       grid=st.sampled_from([(3, 4, 5), (2, 6, 3), (5, 2, 7), (1, 8, 8), (4, 3, 9)]))  # (2 or more tiles)
def test_packed_sequence_sparse_over_its_video_rows(text, audio, keyframes, grid):
    """A MiniMax-H3-style packed sequence: sparse over the video's rows with the grid of their
    coordinates, every row before them (text, keyframes, audio) kept whole; compiled equals the eager
    op with that text span, and at sparsity 0 the graph runs as traced."""
    torch.manual_seed(0)
    model = PackedTokens().eval()
    inputs = PackedTokens.inputs(text, audio, grid, keyframes)
    before = len(inputs[3]) - torch.Size(grid).numel()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        (row,) = si.explain(model, *inputs).rows
    assert row["decision"] == "sparse" and row["grid"] == grid and row["grid_source"] == "coordinates", row
    assert row["text_span"] == (before, 0), row
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad(), graph_only():
        with si.sparsity(0.5, min_tokens=0):
            got = compiled(*inputs)
        torch.testing.assert_close(got, model.eager_sparse(inputs, grid, 0.5), rtol=1e-5, atol=1e-5)
        assert (got - model(*inputs)).abs().max() > 1e-3  # sparse, not dense
        with si.sparsity(0.0, min_tokens=0):
            assert torch.equal(compiled(*inputs), model(*inputs))


def test_packed_sequence_span_read_at_each_call():
    """Compiled once: sequences of one length packed differently (more text, less audio; another
    grid) each run sparse over their own video rows; a layout with no video run runs dense SDPA."""
    torch.manual_seed(0)
    model = PackedTokens().eval()
    compiled = torch.compile(model, backend="sparse_inductor")
    torch._dynamo.reset()
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0), graph_only():
        for text, audio, grid in ((7, 3, (3, 4, 5)), (9, 2, (3, 4, 5)), (7, 3, (5, 4, 3))):
            inputs = PackedTokens.inputs(text, audio, grid)
            got = compiled(*inputs)
            torch.testing.assert_close(got, model.eager_sparse(inputs, grid, 0.5), rtol=1e-5, atol=1e-5)
            assert (got - model(*inputs)).abs().max() > 1e-3
        inputs = list(inputs)
        inputs[3] = inputs[3][torch.randperm(len(inputs[3]), generator=torch.Generator().manual_seed(1))]
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grid_from_coordinates_on_gpu():
    """On CUDA (coordinates read from device memory; Inductor's templates): two grids of one token
    count, each equal to the eager op on its grid; coordinates that are no grid run dense SDPA."""
    torch.manual_seed(0)
    model = CoordinateRoPE(head_dim=64).cuda().eval()
    tokens = torch.randn(2, 256, 8, device="cuda")
    compiled = torch.compile(model, backend="sparse_inductor")
    with torch.no_grad(), si.sparsity(0.5, min_tokens=0):
        torch._dynamo.reset()
        for grid in ((4, 8, 8), (8, 4, 8)):
            coords = raster_coordinates(2, grid).cuda()
            got = compiled(tokens, coords)
            torch.testing.assert_close(got, model.eager_sparse(tokens, coords, grid, 0.5), rtol=2e-3, atol=2e-3)
            assert (got - model(tokens, coords)).abs().max() > 1e-3  # sparse, not dense
        shuffled = raster_coordinates(2, (4, 8, 8))[:, :, torch.randperm(256)].cuda()
        torch.testing.assert_close(compiled(tokens, shuffled), model(tokens, shuffled), rtol=2e-3, atol=2e-3)


class _ScaleRows(torch.autograd.Function):
    """A user's autograd.Function on the token path (a fused RoPE or an all-to-all is written the
    same way): ``x * w`` with a hand-written backward. Dynamo traces it as the
    ``autograd_function_apply`` higher-order op, whose forward is a subgraph."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * w, None


class FunctionOnTokens(nn.Module):
    def __init__(self, mix_tokens=False):
        super().__init__()
        self.mix_tokens = mix_tokens
        self.patch = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [B, N, 32]
        if self.mix_tokens:  # the Function's input has its tokens reversed: not the grid's order
            tokens = tokens.flip(1)
        B, N, _ = tokens.shape
        q, k, v = self.qkv(tokens).view(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        w = torch.linspace(0.5, 1.5, 16, device=x.device)
        q, k = _ScaleRows.apply(q, w), _ScaleRows.apply(k, w)
        return F.scaled_dot_product_attention(q, k, v)


def test_walk_follows_an_autograd_function_into_its_forward():
    x = torch.randn(2, 4, 5, 12, 20)
    model = FunctionOnTokens()
    with torch.enable_grad(), si.sparsity(0.5, min_tokens=0):  # (under no_grad Dynamo may inline it)
        rows = list(si.explain(model, x))
        assert [(r["decision"], r["grid"]) for r in rows] == [("sparse", (5, 6, 10))], rows
        torch._dynamo.reset()
        got = torch.compile(model, backend="sparse_inductor")(x)
        got.sum().backward()
    q, k, v = model.qkv(model.patch(x).flatten(2).transpose(1, 2)).view(2, -1, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    w = torch.linspace(0.5, 1.5, 16)
    want = sparse_attention(q * w, k * w, v, (5, 6, 10), tile=(4, 4, 4), sparsity=0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.enable_grad(), si.sparsity(0.5, min_tokens=0):
        (row,) = si.explain(FunctionOnTokens(mix_tokens=True), x)
    assert row["decision"] == "dense" and "flip" in row["reason"], row
