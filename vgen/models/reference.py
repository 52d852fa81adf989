"""The reference text-to-video model: a small Wan-format pipeline that vgen trains itself.

Three stock diffusers / transformers networks, sized so that the whole pipeline fits in 60 MB
of bf16 weights and a clip still has thousands of video tokens:

- ``AutoencoderKLWan``: 4x spatial and 4x temporal compression to 16 channels
  (33 x 256 x 256 pixels -> 9 x 64 x 64 latents);
- ``UMT5EncoderModel`` over a word-level tokenizer of the shapes vocabulary
  (:data:`vgen.data.VOCABULARY`);
- ``WanTransformer3DModel`` with a (1, 2, 2) patch (9 x 64 x 64 latents -> 9 x 32 x 32 = 9,216 tokens);

and the ``UniPCMultistepScheduler`` (flow prediction, flow sigmas) that the released Wan2.1
checkpoints use. The saved folder loads with stock ``diffusers.WanPipeline.from_pretrained`` and
with ``vgen.VideoPipeline.from_pretrained``::

    from vgen.models import REFERENCE, build_reference_pipeline, save_pipeline
    pipe = build_reference_pipeline(REFERENCE, seed=0)   # random weights; train with vgen.models.train
    save_pipeline(pipe, "build/reference")                 # bf16 safetensors, shards of at most 15 MB
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from vgen.data import VOCABULARY

__all__ = [
    "CONFIGS",
    "REFERENCE",
    "SPECIAL_TOKENS",
    "TINY",
    "ReferenceConfig",
    "build_reference_pipeline",
    "encode_prompts",
    "folder_bytes",
    "parameter_counts",
    "reference_config",
    "save_pipeline",
    "weight_bytes",
    "word_tokenizer",
]

_LOGVAR_INIT = -8.0  # posterior log-variance at initialisation (std 0.02): training is not spent shrinking it
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")
"""Word-level tokenizer specials, ids 0, 1, 2: padding, end of sequence (appended, as UMT5 does), unknown word."""
_PAD_ID, _EOS_ID = 0, 1


@dataclass(frozen=True)
class ReferenceConfig:
    """Sizes of the reference pipeline's three networks and of the clips it is trained on.

    Args:
        name: short name (a key of :data:`CONFIGS`).
        num_frames, height, width: training clip size in pixels; ``num_frames - 1`` must be a
            multiple of the VAE's temporal factor, height and width multiples of its spatial factor x 2.
        demo_frames, demo_height, demo_width: the smaller clip size the model is also trained
            at, for fast CPU generation (``make demo``).
        demo_steps, demo_guidance: denoising steps and guidance scale that suit the demo size.
        vae_base_dim: channels of the VAE's full-resolution stage.
        vae_dim_mult: channel multipliers per stage; ``len - 1`` stages downsample 2x in space.
        vae_num_res_blocks: residual blocks per VAE stage.
        vae_temporal_downsample: per downsampling stage, whether it also halves time.
        z_dim: latent channels (the transformer's in/out channels).
        text_dim, text_layers, text_heads, text_ff: UMT5 encoder width, depth, heads, FFN width.
        max_sequence_length: text tokens the pipeline pads prompts to (WanPipeline's default, 512);
            training pads the same way so that generation with default arguments matches it.
        heads, head_dim, layers, ffn_dim, freq_dim: Wan transformer attention heads, head size,
            blocks, FFN width and timestep-frequency size.
        rope_max_seq_len: positions per axis the rotary table covers.
        flow_shift: the scheduler's sigma shift, ``s' = shift * s / (1 + (shift - 1) * s)``;
            training samples noise levels with the same shift.
    """

    name: str = "reference"
    num_frames: int = 33
    height: int = 256
    width: int = 256
    demo_frames: int = 17
    demo_height: int = 128
    demo_width: int = 128
    demo_steps: int = 16
    demo_guidance: float = 5.0
    vae_base_dim: int = 32
    vae_dim_mult: tuple[int, ...] = (1, 2, 4)
    vae_num_res_blocks: int = 1
    vae_temporal_downsample: tuple[bool, ...] = (True, True)
    z_dim: int = 16
    text_dim: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 512
    max_sequence_length: int = 512
    heads: int = 6
    head_dim: int = 64
    layers: int = 8
    ffn_dim: int = 1536
    freq_dim: int = 256
    rope_max_seq_len: int = 1024
    flow_shift: float = 3.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ReferenceConfig.{field.name} must be a positive int, got {value!r}")
        if len(self.vae_dim_mult) < 2 or len(self.vae_temporal_downsample) != len(self.vae_dim_mult) - 1:
            raise ValueError(
                "ReferenceConfig.vae_temporal_downsample needs one entry per downsampling stage "
                f"(len(vae_dim_mult) - 1 = {len(self.vae_dim_mult) - 1}), got {self.vae_temporal_downsample!r}"
            )
        if self.head_dim < 6:
            raise ValueError(f"ReferenceConfig.head_dim must be >= 6 (rotary axes split it), got {self.head_dim}")
        if not self.flow_shift > 0:
            raise ValueError(f"ReferenceConfig.flow_shift must be > 0, got {self.flow_shift!r}")
        for frames, height, width, label in (
            (self.num_frames, self.height, self.width, ""),
            (self.demo_frames, self.demo_height, self.demo_width, "demo_"),
        ):
            if (frames - 1) % self.temporal_factor:
                raise ValueError(
                    f"ReferenceConfig.{label}frames - 1 must be a multiple of the VAE's temporal factor "
                    f"{self.temporal_factor}, got {frames}"
                )
            if height % (2 * self.spatial_factor) or width % (2 * self.spatial_factor):
                raise ValueError(
                    f"ReferenceConfig.{label}height and {label}width must be multiples of {2 * self.spatial_factor} "
                    f"(VAE spatial factor x patch 2), got {height}x{width}"
                )

    @property
    def clip_size(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the training clips."""
        return self.num_frames, self.height, self.width

    @property
    def demo_size(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the demo clips (also trained on)."""
        return self.demo_frames, self.demo_height, self.demo_width

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width."""
        return 2 ** (len(self.vae_dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first, which the Wan VAE encodes alone)."""
        return 2 ** sum(self.vae_temporal_downsample)

    def latent_shape(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int, int]:
        """``(z_dim, latent frames, latent height, latent width)`` of a clip (default: the training clip)."""
        frames, h, w = num_frames or self.num_frames, height or self.height, width or self.width
        return self.z_dim, (frames - 1) // self.temporal_factor + 1, h // self.spatial_factor, w // self.spatial_factor

    def token_grid(
        self, num_frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """``(frames, height, width)`` in video tokens after the (1, 2, 2) patch (default: the training clip)."""
        _, t, h, w = self.latent_shape(num_frames, height, width)
        return t, h // 2, w // 2

    def video_tokens(self, num_frames: int | None = None, height: int | None = None, width: int | None = None) -> int:
        """Video tokens per clip (default: the training clip; 9 x 32 x 32 = 9,216 for the reference)."""
        return math.prod(self.token_grid(num_frames, height, width))


REFERENCE = ReferenceConfig()
"""The bundled reference model: 33 x 256 x 256 clips, 9,216 video tokens, about 29M parameters."""
TINY = ReferenceConfig(
    name="tiny",
    num_frames=9,
    height=32,
    width=32,
    demo_frames=9,
    demo_height=16,
    demo_width=16,
    demo_steps=2,
    vae_base_dim=4,
    text_dim=32,
    text_layers=1,
    text_heads=2,
    text_ff=64,
    max_sequence_length=32,
    heads=2,
    head_dim=16,
    layers=2,
    ffn_dim=64,
    freq_dim=32,
    rope_max_seq_len=32,
)
"""Same structure, a few thousand parameters per network: 9 x 32 x 32 clips for tests."""
CONFIGS: dict[str, ReferenceConfig] = {config.name: config for config in (REFERENCE, TINY)}


def reference_config(name: str) -> ReferenceConfig:
    """The config called ``name`` (``"reference"`` or ``"tiny"``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown reference config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def word_tokenizer(words: Sequence[str] = VOCABULARY, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level, UMT5-style tokenizer: lower-cased, non-letters dropped, ``</s>`` appended.

    Ids: :data:`SPECIAL_TOKENS` first, then ``words`` in order; any other word is ``<unk>``.
    It saves and reloads (``AutoTokenizer.from_pretrained``) without a download.
    """
    words = list(words)
    bad = [w for w in words if not w.isalpha() or not w.islower()]
    if not words or bad or len(set(words)) != len(words):
        raise ValueError(f"words must be distinct, non-empty lower-case words, got problems with {bad or words!r}")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")])
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", _EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def _vae(config: ReferenceConfig) -> AutoencoderKLWan:
    vae = AutoencoderKLWan(
        base_dim=config.vae_base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.vae_dim_mult),
        num_res_blocks=config.vae_num_res_blocks,
        temperal_downsample=list(config.vae_temporal_downsample),
        latents_mean=[0.0] * config.z_dim,
        latents_std=[1.0] * config.z_dim,
        scale_factor_temporal=config.temporal_factor,
        scale_factor_spatial=config.spatial_factor,
    )
    with torch.no_grad():
        vae.quant_conv.bias[config.z_dim :].fill_(_LOGVAR_INIT)  # quant_conv outputs [mean, log-variance]
    return vae


def _text_encoder(config: ReferenceConfig) -> UMT5EncoderModel:
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(SPECIAL_TOKENS) + len(VOCABULARY),
            d_model=config.text_dim,
            d_kv=config.text_dim // config.text_heads,
            d_ff=config.text_ff,
            num_layers=config.text_layers,
            num_heads=config.text_heads,
            dropout_rate=0.0,
            pad_token_id=_PAD_ID,
            eos_token_id=_EOS_ID,
            decoder_start_token_id=_PAD_ID,
        )
    )


def _transformer(config: ReferenceConfig) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=config.heads,
        attention_head_dim=config.head_dim,
        in_channels=config.z_dim,
        out_channels=config.z_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=config.rope_max_seq_len,
    )


def _scheduler(config: ReferenceConfig) -> UniPCMultistepScheduler:
    # As in the released Wan2.1 diffusers checkpoints: the model output is the velocity noise - x0
    # at x_t = (1 - s) x0 + s noise, and timestep = 1000 s.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=config.flow_shift, num_train_timesteps=1000
    )


def build_reference_pipeline(config: ReferenceConfig = REFERENCE, seed: int = 0) -> WanPipeline:
    """A ``WanPipeline`` of ``config``'s sizes with random weights, deterministic in ``seed``.

    The global torch RNG is seeded before each network is built and restored afterwards.
    The VAE's ``latents_mean`` / ``latents_std`` start at 0 / 1 (training sets them), and its
    posterior's log-variance starts at -8, so that a short training is not spent shrinking it.

    Returns:
        The pipeline in float32 on CPU.
    """
    if not isinstance(config, ReferenceConfig):
        raise ValueError(f"config must be a ReferenceConfig, got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _vae(config)
        torch.manual_seed(seed + 1)
        text_encoder = _text_encoder(config)
        torch.manual_seed(seed + 2)
        transformer = _transformer(config)
    return WanPipeline(
        tokenizer=word_tokenizer(model_max_length=config.max_sequence_length),
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=_scheduler(config),
    )


def parameter_counts(config: ReferenceConfig = REFERENCE) -> dict[str, int]:
    """Parameters per network (``vae``, ``text_encoder``, ``transformer``), counted on the meta device."""
    with torch.device("meta"):
        networks = {"vae": _vae(config), "text_encoder": _text_encoder(config), "transformer": _transformer(config)}
    return {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()}


def weight_bytes(config: ReferenceConfig = REFERENCE, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of each network's weights in ``dtype`` (``total`` included), without allocating them."""
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    counts = {name: n * size for name, n in parameter_counts(config).items()}
    return {**counts, "total": sum(counts.values())}


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast,
    text_encoder: UMT5EncoderModel,
    prompts: Sequence[str],
    max_sequence_length: int,
) -> torch.Tensor:
    """Prompt embeddings exactly as ``WanPipeline.encode_prompt`` makes them, differentiably.

    The encoder runs on the prompts padded to the longest one only (padding is masked, so the
    real tokens' outputs do not depend on it); the result is zero-padded to ``max_sequence_length``
    tokens like the pipeline's. Gradients reach the text encoder when grad is enabled.

    Returns:
        ``[len(prompts), max_sequence_length, d_model]`` on the text encoder's device.
    """
    tokens = tokenizer(
        list(prompts),
        padding="longest",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
    hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.pad(hidden, (0, 0, 0, max_sequence_length - hidden.shape[1]))


def save_pipeline(
    pipe: WanPipeline, path: str | Path, *, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "15MB"
) -> Path:
    """Save a copy of ``pipe`` in diffusers format: ``dtype`` safetensors, no file over ``max_shard_size``.

    ``pipe`` itself is left as it was. The folder loads with ``WanPipeline.from_pretrained`` and
    ``vgen.VideoPipeline.from_pretrained``.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    path = Path(path)
    copy.deepcopy(pipe).to(dtype=dtype).save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    return path


def folder_bytes(path: str | Path) -> dict[str, Any]:
    """Total bytes of the files under ``path``, its largest file and its size."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    if not files:
        raise ValueError(f"{str(path)!r} holds no files")
    largest = max(files, key=lambda p: p.stat().st_size)
    return {
        "bytes": sum(p.stat().st_size for p in files),
        "files": len(files),
        "largest": str(largest.relative_to(path)),
        "largest_bytes": largest.stat().st_size,
    }
