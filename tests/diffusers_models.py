"""Tiny diffusers video transformers (random weights, CPU) and their inputs (DESIGN.md §8)."""
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


MODELS.update(wan_vace=wan_vace, wan_animate=wan_animate, skyreels_v2=skyreels_v2, consisid=consisid,
              easyanimate=easyanimate, motif_video=motif_video, kandinsky5=kandinsky5,
              ltx_video_condition=ltx_video_condition, ltx2=ltx2, anyflow=anyflow, chronoedit=chronoedit,
              helios=helios)


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


DENSE_MODELS = dict(sana_video=sana_video, latte=latte, kandinsky6_sr=kandinsky6_sr)


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
