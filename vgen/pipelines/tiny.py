"""Tiny random-weight diffusers video pipelines, built fully offline.

Every component (tokenizers included) is created from an in-code config, so nothing is
downloaded. The pipelines are meant for fast CPU tests and demos: they produce noise,
but they exercise the same code paths as the real checkpoints, including
``save_pretrained`` / ``DiffusionPipeline.from_pretrained`` round trips.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MotifVideoPipeline,
    MotifVideoTransformer3DModel,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    T5Config,
    T5EncoderModel,
    T5Gemma2Encoder,
    T5Gemma2EncoderConfig,
    T5Gemma2TextConfig,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = [
    "TINY_FACTS",
    "TINY_FAMILIES",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
    "tiny_call_kwargs",
]

TINY_FAMILIES: tuple[str, ...] = ("wan", "hunyuan", "cogvideox", "ltx", "motif", "skyreels")

# Verified by hooking every attention module of the tiny transformers during a real
# generation with `tiny_call_kwargs`: the listed modules receive all video tokens as
# queries; "text_position" says where the text tokens sit in that joint sequence
# (found by perturbing only the text inputs and seeing which query rows change).
TINY_FACTS: dict[str, dict] = {
    "wan": {
        "transformer_class": "WanTransformer3DModel",
        "self_attention_modules": ("blocks.0.attn1", "blocks.1.attn1"),
        "text_position": "none",
        "video_token_grid": (3, 2, 2),
    },
    "hunyuan": {
        "transformer_class": "HunyuanVideoTransformer3DModel",
        "self_attention_modules": ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"),
        "text_position": "after",
        "video_token_grid": (3, 2, 2),
    },
    "cogvideox": {
        "transformer_class": "CogVideoXTransformer3DModel",
        "self_attention_modules": ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"),
        "text_position": "before",
        "video_token_grid": (3, 2, 2),
    },
    "ltx": {
        "transformer_class": "LTXVideoTransformer3DModel",
        "self_attention_modules": ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"),
        "text_position": "none",
        "video_token_grid": (2, 2, 2),
    },
    "motif": {
        "transformer_class": "MotifVideoTransformer3DModel",
        "self_attention_modules": ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"),
        "text_position": "after",
        "video_token_grid": (3, 2, 2),
    },
    "skyreels": {
        "transformer_class": "SkyReelsV2Transformer3DModel",
        "self_attention_modules": ("blocks.0.attn1", "blocks.1.attn1"),
        "text_position": "none",
        "video_token_grid": (3, 2, 2),
    },
}

_SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")
_PAD_ID, _EOS_ID, _BOS_ID = 0, 1, 2
_WORDS = tuple(
    """
    a an the and or of in on at to into onto from with by over under above below behind near across through around
    is are was be it its this that then while as very slowly quickly smoothly one two three small large big tiny
    video scene frame image background foreground camera light dark bright white black gray simple flat high low
    quality bad blurry static describe object objects shape shapes color
    circle circles square squares triangle triangles rectangle star ball box dot line disk cube sphere
    red blue green yellow orange purple pink cyan magenta brown
    moves move moving slides bounces rotates spins grows shrinks falls rises jumps fades appears disappears stays
    still left right up down top bottom center middle toward away clockwise counterclockwise
    . , : ! ? -
    """.split()
)
_VOCAB_SIZE = len(_SPECIAL_TOKENS) + len(_WORDS)

# Where special tokens go, as in the real tokenizers: T5 appends EOS, Llama and Gemma
# prepend BOS, CLIP does both.
_SPECIAL_TEMPLATES = {
    "eos": ("$A </s>", "$A $B </s>"),
    "bos": ("<s> $A", "<s> $A $B"),
    "bos_eos": ("<s> $A </s>", "<s> $A $B </s>"),
}

_HEADS = 2
_HEAD_DIM = 16
_INNER_DIM = _HEADS * _HEAD_DIM
_TEXT_DIM = 32
_MAX_SEQUENCE_LENGTH = 16
_NUM_FRAMES = 9
_SIZE = 32
_HUNYUAN_TEMPLATE_PREFIX = "describe the video : "


def _tokenizer(style: str, model_max_length: int) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + _WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    single, pair = _SPECIAL_TEMPLATES[style]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("<s>", _BOS_ID), ("</s>", _EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def _t5_config(config_class: type[T5Config] | type[UMT5Config]) -> T5Config | UMT5Config:
    return config_class(
        vocab_size=_VOCAB_SIZE,
        d_model=_TEXT_DIM,
        d_kv=_HEAD_DIM,
        d_ff=64,
        num_layers=1,
        num_heads=_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=_PAD_ID,
        eos_token_id=_EOS_ID,
        decoder_start_token_id=_PAD_ID,
    )


# SkyReels-V2 shares Wan's transformer architecture and constructor arguments.
_WAN_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": _HEADS,
    "attention_head_dim": _HEAD_DIM,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": _TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}


def _wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _build_wan(seed: int) -> WanPipeline:
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**_WAN_TRANSFORMER_CONFIG)
    torch.manual_seed(seed)
    vae = _wan_vae()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(_t5_config(UMT5Config))
    return WanPipeline(
        tokenizer=_tokenizer("eos", 128),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _build_skyreels(seed: int) -> SkyReelsV2DiffusionForcingPipeline:
    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(**_WAN_TRANSFORMER_CONFIG)
    torch.manual_seed(seed)
    vae = _wan_vae()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(_t5_config(UMT5Config))
    return SkyReelsV2DiffusionForcingPipeline(
        tokenizer=_tokenizer("eos", 128),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
    )


def _build_hunyuan(seed: int) -> HunyuanVideoPipeline:
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=_TEXT_DIM,
        pooled_projection_dim=_TEXT_DIM,
        rope_axes_dim=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    torch.manual_seed(seed)
    # The pipeline reads hidden_states[-3], so the Llama encoder needs at least 2 layers.
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=_HEADS,
            num_key_value_heads=_HEADS,
            max_position_embeddings=256,
            pad_token_id=_PAD_ID,
            bos_token_id=_BOS_ID,
            eos_token_id=_EOS_ID,
        )
    )
    torch.manual_seed(seed)
    # CLIP prompts are always padded to 77 tokens by the pipeline.
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=_HEADS,
            max_position_embeddings=77,
            projection_dim=_TEXT_DIM,
            pad_token_id=_PAD_ID,
            bos_token_id=_BOS_ID,
            eos_token_id=_EOS_ID,
        )
    )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=_tokenizer("bos", 256),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_tokenizer("bos_eos", 77),
    )


def _build_cogvideox(seed: int) -> CogVideoXPipeline:
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=_TEXT_DIM,
        num_layers=2,
        sample_width=_SIZE // 8,
        sample_height=_SIZE // 8,
        sample_frames=_NUM_FRAMES,
        patch_size=2,
        temporal_compression_ratio=4,
        # The joint positional embedding assumes exactly this many text tokens.
        max_text_seq_length=_MAX_SEQUENCE_LENGTH,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(_t5_config(T5Config))
    return CogVideoXPipeline(
        tokenizer=_tokenizer("eos", 128),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False
        ),
    )


def _build_ltx(seed: int) -> LTXPipeline:
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        cross_attention_dim=_INNER_DIM,
        num_layers=2,
        caption_channels=_TEXT_DIM,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        patch_size=2,
        patch_size_t=1,
    )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(_t5_config(T5Config))
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer("eos", 128),
        transformer=transformer,
    )


def _build_motif(seed: int) -> MotifVideoPipeline:
    torch.manual_seed(seed)
    transformer = MotifVideoTransformer3DModel(
        in_channels=16 * 2 + 1,  # noisy latents, conditioning latents, conditioning mask
        out_channels=16,
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=_TEXT_DIM,
        rope_axes_dim=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = _wan_vae()
    torch.manual_seed(seed)
    text_config = T5Gemma2TextConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=_HEADS,
        num_key_value_heads=_HEADS,
        head_dim=_HEAD_DIM,
        max_position_embeddings=128,
        pad_token_id=_PAD_ID,
        eos_token_id=_EOS_ID,
        bos_token_id=_BOS_ID,
    )
    # T5Gemma2's MLP reads `dropout_rate`, which the text config does not define.
    text_config.dropout_rate = 0.0
    # The encoder always owns a SigLIP tower; shrink it (it is unused for text prompts).
    vision_config = SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    text_encoder = T5Gemma2Encoder(
        T5Gemma2EncoderConfig(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)
    )
    return MotifVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer("bos", 128),
        transformer=transformer,
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "wan": _build_wan,
    "hunyuan": _build_hunyuan,
    "cogvideox": _build_cogvideox,
    "ltx": _build_ltx,
    "motif": _build_motif,
    "skyreels": _build_skyreels,
}


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny pipeline family {family!r}; expected one of {', '.join(TINY_FAMILIES)}.")


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of the given family, without any download.

    The weights depend only on ``seed``: the global torch RNG is seeded before each
    component is constructed, and its previous state is restored afterwards.

    Args:
        family: One of :data:`TINY_FAMILIES`.
        seed: Seed for the random weights.

    Returns:
        The pipeline, in float32 on CPU.

    Raises:
        ValueError: If ``family`` is unknown.
    """
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        return _BUILDERS[family](seed)


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and save it (as safetensors) to ``path``.

    The folder reloads offline with ``DiffusionPipeline.from_pretrained(path)``.

    Args:
        family: One of :data:`TINY_FAMILIES`.
        path: Target directory; created if missing.
        seed: Seed for the random weights.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ValueError: If ``family`` is unknown.
    """
    path = Path(path)
    build_tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_call_kwargs(family: str) -> dict[str, Any]:
    """Keyword arguments for a fast, valid CPU generation with a tiny pipeline.

    The prompt, negative prompt and generator are left to the caller, e.g.
    ``pipe(prompt="a red circle moves left", generator=g, **tiny_call_kwargs("wan"))``.
    Sizes fit each VAE's compression factors and each transformer's patch sizes, and
    give the video token grid recorded in ``TINY_FACTS[family]["video_token_grid"]``.
    Output is a numpy array of shape ``(batch, num_frames, height, width, 3)``.

    Args:
        family: One of :data:`TINY_FAMILIES`.

    Returns:
        A fresh dict that the caller may modify.

    Raises:
        ValueError: If ``family`` is unknown.
    """
    _check_family(family)
    kwargs: dict[str, Any] = {
        "num_frames": _NUM_FRAMES,
        "height": _SIZE,
        "width": _SIZE,
        "num_inference_steps": 2,
        "max_sequence_length": _MAX_SEQUENCE_LENGTH,
        "output_type": "np",
    }
    if family == "wan":
        kwargs["guidance_scale"] = 5.0
    elif family == "hunyuan":
        # `guidance_scale` is embedded (distilled) guidance. The default prompt template is a Llama-3 chat
        # prompt whose crop_start (95) counts real Llama-3 tokens, so use a short one for the tiny vocabulary.
        prefix_length = len(_tokenizer("bos", 256)(_HUNYUAN_TEMPLATE_PREFIX).input_ids)
        kwargs["guidance_scale"] = 6.0
        kwargs["prompt_template"] = {"template": _HUNYUAN_TEMPLATE_PREFIX + "{}", "crop_start": prefix_length}
    elif family == "cogvideox":
        kwargs["guidance_scale"] = 6.0
    elif family == "ltx":
        kwargs["guidance_scale"] = 3.0
    elif family == "skyreels":
        kwargs["guidance_scale"] = 6.0
        # Synchronous diffusion forcing over a single window. `causal_block_size` is left out on purpose:
        # passing it rewrites the transformer's config (`num_frame_per_block`) for all later calls.
        kwargs.update(base_num_frames=_NUM_FRAMES, ar_step=0)
    # motif: guidance comes from the pipeline's `guider` component, so `guidance_scale` is not accepted.
    return kwargs
