"""Small models of the joint-attention layouts of real video DiTs, shared by the detection and
fidelity tests: Mochi's data-dependent prompt length, HunyuanVideo 1.5's and Framepack's joint
sequences (history and text around the video, graph breaks, padding masks)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_inductor.attention import sparse_attention


class ValidPromptTokens(nn.Module):
    """Mochi's joint attention: per sample, only the valid prompt tokens (``nonzero`` of its mask)
    join the video tokens, so the text length is data-dependent (an unbacked size under
    ``capture_dynamic_output_shape_ops``). ``text`` says where they go: ``"after"`` or
    ``"before"`` the video (one symbolic span: sparse), or ``"both"`` (the video's offset and the
    text after it are both unknown: dense)."""

    def __init__(self, text="after"):
        super().__init__()
        self.text = text
        self.embed = nn.Conv3d(4, 32, (1, 2, 2), (1, 2, 2))
        self.to_text = nn.Linear(8, 32)

    def forward(self, latents, prompt, mask):
        video, prompt = self.embed(latents).flatten(2).transpose(1, 2), self.to_text(prompt)  # [B, N, 32], [B, P, 32]
        outs = []
        for i in range(video.shape[0]):
            valid = prompt[i:i + 1, torch.nonzero(mask[i]).flatten()]
            parts = {"after": [video[i:i + 1], valid], "before": [valid, video[i:i + 1]],
                     "both": [valid, video[i:i + 1], valid]}[self.text]
            q = k = v = torch.cat(parts, dim=1).unflatten(2, (2, -1)).transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(q, k, v))
        return outs


def eager_sparse_prompt_attention(model, latents, prompt, mask, grid):
    """What ``model`` computes with the eager sparse op, each sample with its own text length."""
    outs = []
    for i in range(latents.shape[0]):
        video = model.embed(latents[i:i + 1]).flatten(2).transpose(1, 2)
        valid = model.to_text(prompt[i:i + 1, mask[i]])
        x = torch.cat([video, valid] if model.text == "after" else [valid, video], 1).unflatten(2, (2, -1))
        x = x.transpose(1, 2)
        n_text = int(mask[i].sum())
        before, after = (0, n_text) if model.text == "after" else (n_text, 0)
        outs.append(sparse_attention(x, x, x, grid, tile=(4, 4, 4), sparsity=0.5, text_before=before,
                                     text_after=after))
    return outs


class JointTokens(nn.Module):
    """Joint attention over ``[history | video | text]`` (HunyuanVideo 1.5, Framepack):

    - ``history``: tokens of the latents embedded again at a coarser grid (a Conv3d of stride
      (2, 4, 4): half the video's grid on each axis) concatenated before the video: several grids
      in one sequence; the larger (the video) is the site's grid, the history is kept dense like
      text. ``equal_history``: at the video's own grid instead (two grids of one size: ambiguous).
    - ``graph_break``: a graph break after the patch embeddings, so that the attention's graph
      gets the video tokens as an input behind the ``cat`` with the text.
    - ``mask``: ``"key"`` a key-padding mask ``[B, 1, 1, L]``; ``"outer"`` HunyuanVideo 1.5's
      ``m_i & m_j`` of the padding mask ``m`` (``repeat`` and ``transpose``); ``"outer-broadcast"``
      the same written with broadcasting; ``"mixed"`` keys padded by ``m`` and queries by another
      mask, ``"permuted"`` queries padded by ``m`` with its tokens reordered (neither is an outer
      product of one padding mask: dense).
    """

    def __init__(self, history=False, graph_break=False, mask=None, equal_history=False):
        super().__init__()
        self.history, self.graph_break, self.mask = history, graph_break, mask
        self.embed = nn.Conv3d(4, 32, (1, 2, 2), (1, 2, 2))
        self.embed_history = nn.Conv3d(4, 32, (1, 2, 2) if equal_history else (2, 4, 4),
                                       (1, 2, 2) if equal_history else (2, 4, 4))
        self.to_text = nn.Linear(8, 32)
        self.to_qkv = nn.Linear(32, 96)

    def forward(self, latents, text, text_mask):
        tokens = self.embed(latents).flatten(2).transpose(1, 2)
        if self.history:
            tokens = torch.cat([self.embed_history(latents).flatten(2).transpose(1, 2), tokens], dim=1)
        if self.graph_break:
            torch._dynamo.graph_break()
        x = torch.cat([tokens, self.to_text(text)], dim=1)
        B, L, _ = x.shape
        m = F.pad(text_mask, (L - text_mask.shape[1], 0), value=True)
        if self.mask == "key":
            mask = m.view(B, 1, 1, L)
        elif self.mask == "outer":
            keys = m.view(B, 1, 1, L).repeat(1, 1, L, 1)
            mask = (keys & keys.transpose(2, 3)).bool()
        elif self.mask == "outer-broadcast":
            mask = m[:, None, None, :] & m[:, None, :, None]
        elif self.mask == "mixed":
            mask = m[:, None, None, :] & m.flip(1)[:, None, :, None]
        elif self.mask == "permuted":  # the same m, its tokens reordered for the queries
            order = list(range(1, L)) + [0]
            mask = m[:, None, None, :] & m[:, order][:, None, :, None]
        else:
            mask = None
        q, k, v = self.to_qkv(x).view(B, L, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def eager_sparse(self, latents, text, text_mask, grid, **settings):
        """The same with the eager sparse op over the video span (history and text kept dense), a
        padded query's row 0 as in SDPA."""
        tokens = self.embed(latents).flatten(2).transpose(1, 2)
        before = 0
        if self.history:
            history = self.embed_history(latents).flatten(2).transpose(1, 2)
            before = history.shape[1]
            tokens = torch.cat([history, tokens], dim=1)
        x = torch.cat([tokens, self.to_text(text)], dim=1)
        B, L, _ = x.shape
        m = F.pad(text_mask, (L - text_mask.shape[1], 0), value=True)
        q, k, v = self.to_qkv(x).view(B, L, 3, 2, 16).permute(2, 0, 3, 1, 4)
        out = sparse_attention(q, k, v, grid, tile=(4, 4, 4), text_before=before, text_after=text.shape[1],
                               key_padding_mask=None if self.mask is None else m.view(B, 1, 1, L), **settings)
        return torch.where(m.view(B, 1, L, 1), out, 0) if self.mask in ("outer", "outer-broadcast") else out


def joint_inputs(grid, text_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, grid[0], 2 * grid[1], 2 * grid[2], generator=g)
    text_mask = torch.ones(2, text_len, dtype=torch.bool)
    text_mask[1, text_len // 2:] = False  # a padded prompt
    return latents, torch.randn(2, text_len, 8, generator=g), text_mask
