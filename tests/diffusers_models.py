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
