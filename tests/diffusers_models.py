"""Tiny diffusers video transformers (random weights, CPU) and their inputs (DESIGN.md §8)."""
import math

import torch

GRID = (5, 8, 8)
TEXT = 7


def wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, qk_norm="rms_norm_across_heads").eval()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 16, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  return_dict=False)
    # (self-attention sites, text before, text after)
    return model, args, kwargs, dict(sites=2, text=(0, 0))


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, patch_size=2,
        text_embed_dim=32, time_embed_dim=32, sample_height=16, sample_width=16, sample_frames=17,
        max_text_seq_length=TEXT, use_rotary_positional_embeddings=True).eval()
    g = torch.Generator().manual_seed(1)
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), 5)
    args = (torch.randn(2, 5, 4, 16, 16, generator=g),)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  image_rotary_emb=rope, return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(TEXT, 0))


def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, rope_axes_dim=(4, 6, 6),
        text_embed_dim=32, pooled_projection_dim=8).eval()
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, TEXT, dtype=torch.bool)
    mask[1, 4:] = False  # a padded prompt
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  encoder_attention_mask=mask, pooled_projections=torch.randn(2, 8, generator=g),
                  guidance=torch.tensor([3.0, 4.0]), return_dict=False)
    return model, args, kwargs, dict(sites=4, text=(0, TEXT))


MODELS = {"wan": wan, "cogvideox": cogvideox, "hunyuan": hunyuan}

# Wan-family tiny settings shared by its variants (VACE, Animate, SkyReels-V2).
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32,
                ffn_dim=64, num_layers=2, qk_norm="rms_norm_across_heads")


def wan_vace():
    from diffusers import WanVACETransformer3DModel

    # The control branch (one VACE block) attends over the control video's tokens plus the
    # latents' (added after its input projection); its hint joins the main stream after block 0.
    model = WanVACETransformer3DModel(in_channels=16, out_channels=16, vace_layers=[0], vace_in_channels=8,
                                      **WAN_TINY).eval()
    g = torch.Generator().manual_seed(20)
    args = (torch.randn(2, 16, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  control_hidden_states=torch.randn(2, 8, 5, 16, 16, generator=g), return_dict=False)
    return model, args, kwargs, dict(sites=3, text=(0, 0))


def wan_animate():
    from diffusers import WanAnimateTransformer3DModel

    # Pose latents added to frames 1.. in place; a face adapter after block 0 attends per frame
    # (queries [B*T, H*W]) to the motion tokens and adds its output to the video tokens. The
    # image-conditioned cross-attention takes all but the last 512 context tokens as the image's.
    model = WanAnimateTransformer3DModel(
        latent_channels=4, in_channels=12, out_channels=4, image_dim=24, added_kv_proj_dim=32,
        motion_encoder_channel_sizes={"8": 8, "4": 8}, motion_encoder_size=8, motion_style_dim=16, motion_dim=4,
        motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=2,
        **WAN_TINY).eval()
    g = torch.Generator().manual_seed(21)
    args = (torch.randn(2, 12, 5, 16, 16, generator=g),)
    # 13 face frames -> 5 motion frames (two stride-2 causal convs, one padding frame), one per latent frame.
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, 512, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(2, 3, 24, generator=g),
                  pose_hidden_states=torch.randn(2, 4, 4, 16, 16, generator=g),
                  face_pixel_values=torch.randn(2, 3, 13, 8, 8, generator=g), return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(0, 0))


def skyreels_v2():
    # Plain (no diffusion forcing): Wan's architecture with its own module code.
    return _wan_like("SkyReelsV2Transformer3DModel", 22)


def consisid():
    from diffusers import ConsisIDTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    # CogVideoX's joint attention (text first) plus the identity branch: a perceiver over the face
    # embeddings whose cross-attention output (matmul + softmax, no SDPA) is added to the video tokens.
    # The perceiver's key width is 2/3 of the model width: 3 heads of 16 -> 32 = LFE_output_dim.
    model = ConsisIDTransformer3DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, patch_size=2,
        text_embed_dim=32, time_embed_dim=32, sample_height=16, sample_width=16, sample_frames=17,
        max_text_seq_length=TEXT, use_rotary_positional_embeddings=True, is_train_face=True, is_kps=False,
        cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=16, LFE_vit_dim=16,
        LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32,
        LFE_ff_mult=1, LFE_num_scale=2).eval()
    g = torch.Generator().manual_seed(23)
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), 5)
    args = (torch.randn(2, 5, 4, 16, 16, generator=g),)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  image_rotary_emb=rope, id_cond=torch.randn(2, 16, generator=g),
                  id_vit_hidden=[torch.randn(2, 3, 16, generator=g) for _ in range(2)], return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(TEXT, 0))


def easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    # Per-frame Conv2d patch embedding ([B*F, C, H, W], merged back by unflatten(0, (B, -1))) and
    # MMDiT joint attention with the text first.
    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=16,
        sample_height=16, num_layers=1, mmdit_layers=1, time_embed_dim=32, text_embed_dim=32).eval()
    g = torch.Generator().manual_seed(24)
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  return_dict=False)
    return model, args, kwargs, dict(sites=1, text=(TEXT, 0))


def motif_video():
    from diffusers import MotifVideoTransformer3DModel

    # HunyuanVideo-like: joint attention with the text after the video and a bool key-padding mask.
    model = MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, rope_axes_dim=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(25)
    mask = torch.ones(2, TEXT, dtype=torch.bool)
    mask[1, 4:] = False  # a padded prompt
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  encoder_attention_mask=mask, return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(0, TEXT))


def kandinsky5():
    from diffusers import Kandinsky5Transformer3DModel

    # Channels-last latents [B, T, H, W, C], RoPE as (rope * x).sum(-1); a text-only encoder
    # self-attention (left dense) and separate cross-attention.
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=8, time_dim=32, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=False).eval()
    g = torch.Generator().manual_seed(26)
    # Its modulations start at zero (every gate 0: attention would not reach the output): random instead.
    for module in model.modules():
        if type(module).__name__ == "Kandinsky5Modulation":
            for p in module.out_layer.parameters():
                p.data = 0.1 * torch.randn(p.shape, generator=g)
    args = (torch.randn(2, 5, 16, 16, 4, generator=g),)
    # return_dict=True: with False the model returns the bare tensor, and [0] would be sample 0.
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3.0, 5.0]),
                  pooled_projections=torch.randn(2, 8, generator=g),
                  visual_rope_pos=[torch.arange(5), torch.arange(8), torch.arange(8)], text_rope_pos=torch.arange(TEXT),
                  return_dict=True)
    return model, args, kwargs, dict(sites=1, text=(0, 0))


def ltx_coordinates(batch, grid, frame_rate=25.0):
    """``[B, 3, N]`` frame / row / column coordinates of packed tokens in raster order over ``grid``,
    as LTX-Video's condition pipeline precomputes them: latent indices times the VAE strides (8
    frames, 32 pixels), the first frame shifted and clamped to 0, frames divided by the frame rate."""
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    coords = torch.stack([(t * 8 + 1 - 8).clamp(min=0) / frame_rate, h * 32, w * 32]).flatten(1)
    return coords.unsqueeze(0).repeat(batch, 1, 1)


def ltx_video_condition():
    """LTX-Video as its condition pipeline calls it: tokens packed, positions passed as
    ``video_coords`` (a graph input); the grid is read from the coordinates' values at each call."""
    model, args, kwargs, expect = ltx_video()
    for name in ("num_frames", "height", "width"):
        del kwargs[name]
    kwargs["video_coords"] = ltx_coordinates(2, GRID)
    return model, args, kwargs, dict(expect, grid_source="coordinates")


def ltx2():
    from diffusers import LTX2VideoTransformer3DModel

    # Audio and video streams; the pipeline passes the video's patch bounds [B, 3, N, 2] from the
    # model's own rope.prepare_video_coords (a graph input). Video self-attention is sparse with the
    # grid of those values; audio self-attention (1-d) and the cross-modal attentions stay dense.
    model = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=16, audio_cross_attention_dim=32, num_layers=1, caption_channels=32).eval()
    g = torch.Generator().manual_seed(27)
    audio_frames = 6
    kwargs = dict(hidden_states=torch.randn(2, 5 * 8 * 8, 8, generator=g),
                  audio_hidden_states=torch.randn(2, audio_frames, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  audio_encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  encoder_attention_mask=torch.ones(2, TEXT), audio_encoder_attention_mask=torch.ones(2, TEXT),
                  video_coords=model.rope.prepare_video_coords(2, *GRID, device="cpu", fps=24.0),
                  audio_coords=model.audio_rope.prepare_audio_coords(2, audio_frames, device="cpu"),
                  return_dict=False)
    return model, (), kwargs, dict(sites=1, text=(0, 0), grid_source="coordinates")


def _wan_like(cls_name, seed, frames_first=False, no_qk_norm=False, **timesteps):
    """A Wan 2.1-backbone video DiT (one layer) with latents ``[B, C, F, H, W]`` (``frames_first``:
    ``[B, F, C, H, W]``)."""
    import diffusers

    config = dict(WAN_TINY, num_layers=1)
    if no_qk_norm:
        del config["qk_norm"]
    model = getattr(diffusers, cls_name)(in_channels=16, out_channels=16, **config).eval()
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 5, 16, 16, 16, generator=g) if frames_first else torch.randn(2, 16, 5, 16, 16, generator=g)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), return_dict=False,
                  **(timesteps or dict(timestep=torch.tensor([3, 5]))))
    return model, (latents,), kwargs, dict(sites=1, text=(0, 0))


def anyflow():
    # Wan 2.1 with per-frame flow-map timesteps (t, r); latents frames-first.
    return _wan_like("AnyFlowTransformer3DModel", 28, frames_first=True, no_qk_norm=True,
                     timestep=torch.tensor([[3] * 5, [5] * 5]), r_timestep=torch.tensor([[1] * 5, [2] * 5]))


def chronoedit():
    return _wan_like("ChronoEditTransformer3DModel", 29)


def helios():
    # Without history latents (with them, coarser history grids precede the window, as in Framepack).
    import diffusers

    model = diffusers.HeliosTransformer3DModel(in_channels=16, out_channels=16, rope_dim=(4, 6, 6),
                                               **dict(WAN_TINY, num_layers=1)).eval()
    g = torch.Generator().manual_seed(30)
    args = (torch.randn(2, 16, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  return_dict=False)
    return model, args, kwargs, dict(sites=1, text=(0, 0))


def sana_wm_cameras(batch, frames):
    """SANA-WM's raw ``(B, F, 20)`` camera conditions: a flattened camera-to-world matrix (a camera
    moving forward) and pinhole intrinsics ``fx, fy, cx, cy`` for a 16 x 16 image."""
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[:, :, 2, 3] = torch.linspace(0, 1, frames)
    return torch.cat([c2w.flatten(2), torch.tensor([16.0, 16.0, 8.0, 8.0]).expand(batch, frames, 4)], -1)


def sana_wm():
    from diffusers import SanaWMTransformer3DModel

    # Every softmax_every_n-th block is softmax attention (SDPA), the others gated-delta-net linear
    # attention (no SDPA). The softmax block has two self-attentions over the video: the main branch
    # (q/k/v cast to bfloat16) and the camera branch (UCPE ray transforms, head dim padded to 128).
    # Its feed-forward convolves per frame ([B*T, C, H, W]) and merges back by view(B, T, C, H*W).
    model = SanaWMTransformer3DModel(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 2, 2), softmax_every_n=2,
        linear_head_dim=16, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2, caption_channels=32,
        mlp_ratio=2.0).eval()
    g = torch.Generator().manual_seed(31)
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([[[3] * 5], [[5] * 5]]),  # (B, 1, T): per frame
                  encoder_hidden_states=torch.randn(2, 1, TEXT, 32, generator=g),
                  encoder_attention_mask=torch.ones(2, TEXT), camera_conditions=sana_wm_cameras(2, 5),
                  chunk_plucker=torch.randn(2, 8, 5, 16, 16, generator=g), return_dict=False)
    return model, args, kwargs, dict(
        sites=2, text=(0, 0), note="the other blocks' self-attention is gated-delta-net linear attention (no SDPA)")


def minimax_h3_layout(text, grid, audio_rows, keyframes=0):
    """MiniMax-H3's packed ``[text | keyframes | audio | video]`` sequence (its t2va layout; fl2va with
    ``keyframes``): ``position_ids`` ``(L, 3)`` (text at ``(i, 0, 0)``, a keyframe condition one frame of
    the video's ``(h, w)`` at the first or the last frame's time, audio rows on the time axis at the width
    grid's two ends, video rows ``(t, h, w)`` with its uneven frame spacing ``5/3 * (1, 4, 4, ...)``), token
    tags (0 video, 1 text, 2 audio) and the rows of each modality (video: keyframes first, as the pipeline
    orders them)."""
    T, H, W = grid
    n_key = keyframes * H * W
    start = text + n_key + audio_rows  # of the target video
    n = start + T * H * W
    pos = torch.zeros(n, 3)
    pos[:text, 0] = torch.arange(text)
    times = text + torch.tensor([0.0] + [1.0] + [4.0] * max(T - 2, 0))[:T].cumsum(0) * 5 / 3
    hw = torch.stack(torch.meshgrid(torch.arange(H) * 4.0, torch.arange(W) * 4.0, indexing="ij"), -1).reshape(-1, 2)
    for i in range(keyframes):  # anchored at the first frame, then (a second one) at the last
        rows = slice(text + i * H * W, text + (i + 1) * H * W)
        pos[rows, 0], pos[rows, 1:] = times[-1 if i else 0], hw
    audio = slice(text + n_key, start)
    pos[audio, 0] = text + torch.arange(audio_rows // 2).repeat(2).float()
    pos[audio, 2] = torch.tensor([0.0, 4.0 * (W - 1)]).repeat_interleave(audio_rows // 2)
    pos[start:] = torch.cat([times.repeat_interleave(H * W)[:, None], hw.repeat(T, 1)], 1)
    tags = torch.cat([torch.ones(text), torch.zeros(n_key), torch.full((audio_rows,), 2), torch.zeros(T * H * W)])
    video = torch.cat([torch.arange(text, text + n_key), torch.arange(start, n)])
    return pos, tags.long(), video, torch.arange(text + n_key, start), torch.arange(text)


def minimax_h3():
    from diffusers import MiniMaxH3Transformer3DModel

    # One packed sequence [text | audio | video] (t2va), the rows scattered into it by index_copy; the
    # video is the raster-ordered tail of position_ids, whose values give the grid and the 13 rows before it.
    model = MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=1, num_refiner_layers=1, ffn_dim=64,
        in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=32, freq_dim=32, time_embed_hidden_dim=32,
        time_embed_dim=16, rope_freq_dim=2).eval()
    g = torch.Generator().manual_seed(45)
    pos, tags, video, audio, text = minimax_h3_layout(TEXT, GRID, 6)
    kwargs = dict(hidden_states=torch.randn(2, len(video), 16, generator=g), audio_hidden_states=torch.randn(
        2, len(audio), 8, generator=g), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
        timestep=torch.tensor([0.5]), timestep_indices=torch.zeros(len(tags), dtype=torch.long), token_tags=tags,
        position_ids=pos, video_indices=video, audio_indices=audio, text_indices=text, return_dict=False)
    return model, (), kwargs, dict(
        sites=1, text=(TEXT + 6, 0), grid_source="coordinates",
        note="the 13 rows before the video are its 7 text and 6 audio rows (kept whole, as text)")


MODELS.update(wan_vace=wan_vace, wan_animate=wan_animate, skyreels_v2=skyreels_v2, consisid=consisid,
              easyanimate=easyanimate, motif_video=motif_video, kandinsky5=kandinsky5,
              ltx_video_condition=ltx_video_condition, ltx2=ltx2, anyflow=anyflow, chronoedit=chronoedit,
              helios=helios, sana_wm=sana_wm, minimax_h3=minimax_h3)


# Video transformers with no attention the pass may rewrite: every SDPA site stays dense, for the
# reason in ``dense`` (a substring of explain()'s reason, per site in graph order); ``note`` says why
# that is right.
def sana_video():
    from diffusers import SanaVideoTransformer3DModel

    model = SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=16, patch_size=(1, 2, 2)).eval()
    g = torch.Generator().manual_seed(40)
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  return_dict=False)
    return model, args, kwargs, dict(sites=0, text=(0, 0), dense=["cross-attention"],
                                     note="its self-attention is linear attention (no SDPA)")


def latte():
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=32, sample_size=16, patch_size=2, norm_type="ada_norm_single", caption_channels=32,
        video_length=5, num_embeds_ada_norm=1000).eval()
    g = torch.Generator().manual_seed(41)
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  return_dict=False)
    return model, args, kwargs, dict(sites=0, text=(0, 0), dense=["grid not found", "cross-attention", "grid not found"],
                                     note="factorised attention: spatial per frame, temporal per pixel (no 3D attention)")


def kandinsky6_sr():
    from diffusers import Kandinsky6SRTransformer3DModel

    model = Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=32, patch_size=(1, 2, 2), model_dim=32, ff_dim=64,
        num_visual_blocks=1, axes_dims=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(42)
    args = (torch.randn(2, 5, 16, 16, 9, generator=g),)  # latents, low-resolution condition and its mask, per pixel
    kwargs = dict(timestep=torch.tensor([3.0, 5.0]), return_dict=False)
    return model, args, kwargs, dict(sites=0, text=(0, 0), dense=[],
                                     note="already sparse: its own NABLA block-sparse flex_attention (no SDPA)")


def anyflow_far():
    from diffusers import AnyFlowFARTransformer3DModel

    # The training / cache-prefill path (kv_cache=None) with the block mask built outside the
    # compiled region, as the class recommends for torch.compile; one compressed context chunk.
    config = dict(WAN_TINY, num_layers=1)
    del config["qk_norm"]  # (not an option of AnyFlow's)
    model = AnyFlowFARTransformer3DModel(
        compressed_patch_size=(1, 4, 4), full_chunk_limit=2, in_channels=16, out_channels=16, rope_max_seq_len=64,
        chunk_partition=(1, 2, 2), **config).eval()
    g = torch.Generator().manual_seed(43)
    args = (torch.randn(2, 5, 16, 16, 16, generator=g),)  # frames first
    kwargs = dict(timestep=torch.tensor([[3] * 5, [5] * 5]), r_timestep=torch.tensor([[1] * 5, [2] * 5]),
                  encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), chunk_partition=[1, 2, 2],
                  attention_mask=model.build_attention_mask(chunk_partition=[1, 2, 2], height=16, width=16),
                  return_dict=False)
    return model, args, kwargs, dict(sites=0, text=(0, 0), dense=["cross-attention"],
                                     note="its self-attention is flex_attention with the FAR chunk-causal BlockMask "
                                          "(no SDPA)")


def wan_animate2():
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    # The reference pass (kv_cache_mode="extract", batch of one as the pipeline runs it): SDPA over the
    # driving video's tokens. rope_apply loops over the samples with grid_sizes.tolist(), so Dynamo
    # runs it eagerly between graphs and q and k reach the attention as two unrelated graph inputs.
    # The generation pass ("cached") attends through flex_attention with a BlockMask (no SDPA).
    model = WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=TEXT, in_dim=12, dim=32, ffn_dim=64, freq_dim=32, text_dim=32, out_dim=4,
        num_heads=2, num_layers=1).eval()
    g = torch.Generator().manual_seed(44)
    args = ([torch.randn(4, 5, 16, 16, generator=g)],)
    kwargs = dict(timestep=torch.tensor([3.0]), encoder_hidden_states=[torch.randn(5, 32, generator=g)],
                  condition_latents=[torch.randn(8, 5, 16, 16, generator=g)], kv_cache=WanAnimate2KVCache(1),
                  kv_cache_mode="extract", seq_len=5 * 8 * 8, offset_grid_sizes=torch.tensor([[5, 8, 8]]),
                  encoder_hidden_states_image=torch.randn(1, 3, 1280, generator=g), return_dict=False)
    return model, args, kwargs, dict(
        sites=0, text=(0, 0), dense=["keys do not come from the query's tokens", "cross-attention", "cross-attention"],
        note="reference pass: q and k come from a per-sample RoPE loop that runs eagerly between graphs "
             "(self-attention cannot be shown); generation pass: flex_attention with a BlockMask (no SDPA)")


def sana_wm_refiner():
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    # A denoising step of the chunk-causal refiner (kv_cache_mode="inject"): the active block's 5
    # frames attend to [sink frame + block] keys from the KV cache; the RoPE is passed precomputed.
    model = SanaWMLTX2RefinerTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=16, audio_cross_attention_dim=32, num_layers=1, caption_channels=32).eval()
    g = torch.Generator().manual_seed(46)

    def rope(frames):
        return model.build_rotary_emb_for_absolute_positions(2, list(frames), 8, 8, device="cpu", fps=24.0)

    cache = SanaWMRefinerKVCache(1)
    common = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  encoder_attention_mask=torch.ones(2, TEXT), kv_cache=cache, return_dict=False)
    with torch.no_grad():  # the attention sink: frame 0's pre-RoPE K/V, as the pipeline seeds it
        model(torch.randn(2, 64, 8, generator=g), timestep=torch.zeros(2, 64), video_rotary_emb=rope([0]),
              kv_cache_mode="capture_pre_rope", **common)
    cache.get(0).store_sink(*cache.get(0).get_captured_pre_rope())
    cache.sink_pe = rope([0])
    kwargs = dict(hidden_states=torch.randn(2, 5 * 8 * 8, 8, generator=g), timestep=torch.full((2, 5 * 8 * 8), 500.0),
                  video_rotary_emb=rope(range(1, 6)), kv_cache_mode="inject", **common)
    return model, (), kwargs, dict(
        sites=0, text=(0, 0), dense=["cross-attention", "cross-attention"],
        note="its self-attention's keys are the KV cache's [sink + history + active block] window, its queries the "
             "active block only (not square self-attention)")


def cosmos3_omni():
    from diffusers import Cosmos3OmniTransformer

    # One packed sequence, no batch axis: a text prefix (causal "understanding" pathway) and the video
    # (generation pathway), whose queries attend to [text + video] keys with grouped-query heads.
    model = Cosmos3OmniTransformer(
        head_dim=16, hidden_size=32, intermediate_size=64, latent_channel=4, latent_patch_size=2, num_attention_heads=2,
        num_hidden_layers=1, num_key_value_heads=1, patch_latent_dim=16, vocab_size=64, rope_axes_dim=(4, 2, 2),
        dtype="float32").eval()
    g = torch.Generator().manual_seed(47)
    (T, H, W), n = GRID, math.prod(GRID)
    t, h, w = torch.meshgrid(*(torch.arange(s) for s in GRID), indexing="ij")
    positions = torch.cat([torch.arange(TEXT).expand(3, -1), torch.stack([t, h, w]).flatten(1) + TEXT], 1)
    kwargs = dict(input_ids=torch.randint(0, 64, (TEXT,), generator=g), text_indexes=torch.arange(TEXT),
                  position_ids=positions, und_len=TEXT, sequence_length=TEXT + n,
                  vision_tokens=[torch.randn(1, 4, T, 2 * H, 2 * W, generator=g)], vision_token_shapes=[GRID],
                  vision_sequence_indexes=torch.arange(TEXT, TEXT + n),
                  vision_mse_loss_indexes=torch.arange(TEXT, TEXT + n),
                  vision_timesteps=torch.full((n,), 500.0), vision_noisy_frame_indexes=[torch.arange(T)],
                  return_dict=False)
    return model, (), kwargs, dict(
        sites=0, text=(0, 0), dense=["causal", "grouped-query"],
        note="its video queries attend to [text + video] keys (a text prefix in the keys only) with grouped-query "
             "heads")


DENSE_MODELS = dict(sana_video=sana_video, latte=latte, kandinsky6_sr=kandinsky6_sr, anyflow_far=anyflow_far,
                    wan_animate2=wan_animate2, sana_wm_refiner=sana_wm_refiner,
                    cosmos3_omni=cosmos3_omni)


def cosmos():
    from diffusers import CosmosTransformer3DModel

    # concat_padding_mask=False: the padding-mask path needs torchvision.
    model = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=8, max_size=(8, 32, 32), patch_size=(1, 2, 2), concat_padding_mask=False,
        extra_pos_embed_type="learnable", crossattn_proj_in_channels=32, encoder_hidden_states_channels=32).eval()
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3.0, 5.0]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(0, 0))


def kandinsky6():
    from diffusers import Kandinsky6Transformer3DModel

    model = Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=8, time_dim=32, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
        in_audio_dim=4, out_audio_dim=4).eval()
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(2, 5, 16, 16, 4, generator=g),)  # (B, T, H, W, C) latents
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), pooled_projections=torch.randn(
        2, 8, generator=g), timestep=torch.tensor([3.0, 5.0]), return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(0, 0))


def allegro():
    from diffusers import AllegroTransformer3DModel

    # A per-frame patch embedding merged back by unflatten(0, (B, -1)).flatten(1, 2): batch 2 tells the
    # frames from the batch (at batch 1 a wrong walk would still find the right grid).
    model = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=32, sample_height=16, sample_width=16, sample_frames=5,
        caption_channels=32).eval()
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(0, 0))


def ltx_video():
    from diffusers import LTXVideoTransformer3DModel

    # Tokens arrive packed ([B, F*H*W, C]); the grid is only in the RoPE built from the frame,
    # height and width arguments.
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=32).eval()
    g = torch.Generator().manual_seed(6)
    args = (torch.randn(2, 5 * 8 * 8, 8, generator=g),)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  encoder_attention_mask=torch.ones(2, TEXT), num_frames=5, height=8, width=8, return_dict=False)
    return model, args, kwargs, dict(sites=2, text=(0, 0))


MODELS.update(cosmos=cosmos, kandinsky6=kandinsky6, allegro=allegro, ltx_video=ltx_video)


def mochi():
    from diffusers import MochiTransformer3DModel

    # Each sample's attention keeps only its valid prompt tokens (torch.nonzero of the mask): the
    # text length is data-dependent. Dynamo traces the attention only with
    # capture_dynamic_output_shape_ops (without it the frame is skipped: nothing is rewritten).
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=32, time_embed_dim=32, max_sequence_length=TEXT).eval()
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(2, TEXT, dtype=torch.bool)
    mask[1, 4:] = False  # a padded prompt: sample 1 attends over 4 text tokens, sample 0 over 7
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g), timestep=torch.tensor([3, 5]),
                  encoder_attention_mask=mask, return_dict=False)
    # One attention per sample and layer; text after the video, of a length known only at run time.
    return model, args, kwargs, dict(sites=4, text=(0, None), dynamo=dict(capture_dynamic_output_shape_ops=True))


MODELS.update(mochi=mochi)


def hunyuan_video15():
    from diffusers import HunyuanVideo15Transformer3DModel

    # Graph breaks before the blocks (`if is_t2v:`, a per-sample text reorder): each block is its own
    # graph (one, shared by both blocks) whose video tokens are an input behind a cat with the text;
    # its grid is the patch embedding's, remembered from the first graph. The self-attention mask is
    # m_i & m_j of the padding mask m ([B, 1, L, L]): a key-padding mask, and padded queries get 0.
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=24,
        image_embed_dim=16, rope_axes_dim=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(8)
    mask, mask_2 = torch.ones(2, TEXT, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    mask[1, 4:] = False  # padded prompts
    mask_2[0, 2:] = False
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3.0, 5.0]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  encoder_attention_mask=mask, encoder_hidden_states_2=torch.randn(2, 3, 24, generator=g),
                  encoder_attention_mask_2=mask_2, image_embeds=torch.randn(2, 2, 16, generator=g), return_dict=False)
    # Text after the video: 2 image + 3 ByT5 + 7 prompt tokens.
    return model, args, kwargs, dict(sites=1, text=(0, TEXT + 5), grid_source="earlier graph")


def hunyuan_framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    # The current window (5, 8, 8) comes after history latents embedded at three grids: clean (2, 8, 8),
    # 2x (1, 4, 4), 4x (4, 2, 2): 160 history tokens kept dense like text (the largest grid is the
    # window). A graph break (a slice bounded by a tensor's value) makes the blocks separate graphs
    # whose tokens are an input: the layout of the first graph's output is remembered.
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=16,
        has_clean_x_embedder=True).eval()
    g = torch.Generator().manual_seed(9)
    mask = torch.ones(2, TEXT, dtype=torch.bool)
    mask[1, 4:] = False
    args = (torch.randn(2, 4, 5, 16, 16, generator=g),)
    kwargs = dict(timestep=torch.tensor([3, 5]), encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
                  encoder_attention_mask=mask, pooled_projections=torch.randn(2, 8, generator=g),
                  image_embeds=torch.randn(2, 2, 16, generator=g), indices_latents=torch.arange(3, 8),
                  guidance=torch.tensor([3.0, 4.0]), latents_clean=torch.randn(2, 4, 2, 16, 16, generator=g),
                  indices_latents_clean=torch.tensor([0, 1]),
                  latents_history_2x=torch.randn(2, 4, 2, 16, 16, generator=g),
                  indices_latents_history_2x=torch.tensor([8, 9]),
                  latents_history_4x=torch.randn(2, 4, 16, 16, 16, generator=g),
                  indices_latents_history_4x=torch.arange(10, 26), return_dict=False)
    # A dual-stream and a single-stream block; 2 image + 7 prompt tokens after the video.
    return model, args, kwargs, dict(sites=2, text=(160, TEXT + 2), grid_source="earlier graph")


MODELS.update(hunyuan_video15=hunyuan_video15, hunyuan_framepack=hunyuan_framepack)
