"""Network hyper-parameters, one dataclass per network, and the named presets built from them.

A preset is the single source for every shape: the reference modules, the export descriptors, the manifest and
the runtime all read these numbers (the runtime through the manifest).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from illume_rt.contract import LATENT_CHANNELS, VocabLayout, compact_vocab_layout, official_vocab_layout


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder (transformers Qwen2Config field names where they exist)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionTowerConfig:
    """Qwen2-VL ViT + PatchMerger (semantic branch of DualViTok, as fine-tuned inside the MLLM)."""

    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    out_dim: int = 3584  # merger output, = mm_hidden_size[0]


@dataclass(frozen=True)
class MoVQConfig:
    """MoVQ encoder or decoder (official get_movqgan_config fields)."""

    ch: int
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)
    z_channels: int = 32
    embed_dim: int = 32
    in_channels: int = 3
    out_channels: int = 3
    use_dc_up_down_blocks: bool = True
    norm_groups: int = 32  # GroupNorm groups: 32 in every official norm; the tiny preset has levels of only 8 channels


@dataclass(frozen=True)
class CodebookConfig:
    """SimVQ codebooks: a frozen Gaussian codebook times a learned dim x dim linear."""

    dim: int = 32
    semantic_size: int = 32768
    pixel_size: int = 98304


@dataclass(frozen=True)
class DiffusionConfig:
    """SDXL-type UNet (diffusers UNet2DConditionModel kwargs) conditioned on the 64-channel token map, plus VAE."""

    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    vocab: VocabLayout
    llm: LLMConfig
    vision_tower: VisionTowerConfig
    pixel_encoder: MoVQConfig
    pixel_decoder: MoVQConfig
    codebook: CodebookConfig
    diffusion: DiffusionConfig
    seed: int = 0  # random-weight presets are reproducible from this

    @property
    def projector_in_dims(self) -> tuple[int, int]:
        """mm_hidden_size: [semantic ViT features, pixel encoder features]."""
        return self.vision_tower.out_dim, self.pixel_encoder.embed_dim

    def to_dict(self) -> dict:
        return asdict(self)


# -- diffusion decoder -----------------------------------------------------------------------------------------
# Pipeline facts (zero text conditioning, add_time_ids, guidance order) are in export/networks/diffusion.py.
NUM_ADD_TIME_IDS = 6  # add_time_ids = [0, 0, 0, 0, 0, resolution_index]

# Scheduler of the released decoder: an SDXL-style EulerDiscreteScheduler config (the checkpoint's
# scheduler_config.json is unverified; the pipeline only fixes that it is one of diffusers' Karras-family
# schedulers with scale_model_input and init_noise_sigma).
SDXL_EULER_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "use_karras_sigmas": False,
}


def _sdxl_diffusion(map_channels: int) -> DiffusionConfig:
    """SDXL-base-sized UNet and VAE (diffusers kwargs) with the token map concatenated to the latent."""
    pooled_dim, time_embed_dim = 1280, 256  # pooled zeros [B,1280] (pipeline); 256 is SDXL's (unverified)
    unet = {
        "sample_size": 128,
        "in_channels": LATENT_CHANNELS + map_channels,
        "out_channels": LATENT_CHANNELS,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],  # diffusers' SDXL naming: these are head counts (head dim 64)
        "cross_attention_dim": 2048,  # prompt embeds zeros [B,77,2048] (pipeline)
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": NUM_ADD_TIME_IDS * time_embed_dim + pooled_dim,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": LATENT_CHANNELS,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    return DiffusionConfig(unet=unet, vae=vae, scheduler=dict(SDXL_EULER_SCHEDULER))


def _tiny_diffusion(map_channels: int) -> DiffusionConfig:
    """The same structure (text_time embedding, cross-attention, 8x VAE) at toy width for fast tests."""
    pooled_dim, time_embed_dim = 16, 8
    unet = {
        "sample_size": 16,
        "in_channels": LATENT_CHANNELS + map_channels,
        "out_channels": LATENT_CHANNELS,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 32,
        "use_linear_projection": True,
        "norm_num_groups": 8,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": NUM_ADD_TIME_IDS * time_embed_dim + pooled_dim,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": LATENT_CHANNELS,
        "down_block_types": ["DownEncoderBlock2D"] * 4,  # four levels: the same 8x latent as SDXL
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    return DiffusionConfig(unet=unet, vae=vae, scheduler=dict(SDXL_EULER_SCHEDULER))


def _nano_diffusion(map_channels: int) -> DiffusionConfig:
    """illume-nano's decoder (nano/decoder.py): the official structure (text_time embedding, a cross-attention level,
    8x VAE) at a width a CPU trains in minutes, for nano's flat-colour 512x512 pictures. The VAE has no mid-block
    attention (it trains on crops; attention over a crop is not attention over the picture). Its scaling_factor
    here is a placeholder: training measures it, and the checkpoint's vae/config.json carries it."""
    tiny = _tiny_diffusion(map_channels)
    unet = {**tiny.unet, "sample_size": 64}
    # One normalization group in the VAE: nano's pictures are flat colours, and GroupNorm over few channels per group
    # (the decoder's last norm before conv_out) erased their absolute colour (a red disc came out orange). (The UNet
    # keeps 8 groups: with one, it learned slower in the one run that tried it.)
    vae = {**tiny.vae, "block_out_channels": [8, 16, 32, 32], "norm_num_groups": 1, "sample_size": 512,
           "mid_block_add_attention": False}
    # The UNet predicts the clean latent ("sample"): nano's picture is all but fixed by its token map, so the
    # denoiser is close to a regression, which x0-prediction learns far faster on a CPU than epsilon-prediction
    # (same sampler; the runtime's Euler scheduler implements all three prediction types).
    return DiffusionConfig(unet=unet, vae=vae, scheduler={**SDXL_EULER_SCHEDULER, "prediction_type": "sample"})


def _tiny() -> Preset:
    codebook = CodebookConfig(dim=8, semantic_size=128, pixel_size=384)
    return Preset(
        name="tiny",
        vocab=compact_vocab_layout(256, codebook.semantic_size, codebook.pixel_size),
        llm=LLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=4096),
        vision_tower=VisionTowerConfig(embed_dim=32, depth=2, num_heads=2, out_dim=48),
        pixel_encoder=MoVQConfig(ch=8, z_channels=codebook.dim, embed_dim=codebook.dim, norm_groups=4),
        pixel_decoder=MoVQConfig(ch=16, z_channels=2 * codebook.dim, embed_dim=2 * codebook.dim, norm_groups=4),
        codebook=codebook,
        diffusion=_tiny_diffusion(2 * codebook.dim),
    )


# illume-nano's text ids: its byte-level BPE (nano/text_tokenizer.py: 256 bytes, then one id per merge learned from
# the grammar's prompts), a function of the grammar; a test builds it and checks this number.
NANO_TEXT_VOCAB_SIZE = 450


def _nano() -> Preset:
    """illume-nano: the networks of the trained miniature (nano/, weights in nano/weights/). The preset gives the
    shapes the checkpoint loaders check against; the weights come from the checkpoint."""
    codebook = CodebookConfig(dim=8, semantic_size=128, pixel_size=384)
    return Preset(
        name="nano",
        vocab=compact_vocab_layout(NANO_TEXT_VOCAB_SIZE, codebook.semantic_size, codebook.pixel_size),
        llm=LLMConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=384, rope_theta=10000.0, max_position_embeddings=4096),
        vision_tower=VisionTowerConfig(embed_dim=48, depth=2, num_heads=2, out_dim=64),
        pixel_encoder=MoVQConfig(ch=8, num_res_blocks=1, z_channels=codebook.dim, embed_dim=codebook.dim,
                                 norm_groups=4),
        pixel_decoder=MoVQConfig(ch=8, num_res_blocks=1, z_channels=2 * codebook.dim, embed_dim=2 * codebook.dim,
                                 norm_groups=4),
        codebook=codebook,
        diffusion=_nano_diffusion(2 * codebook.dim),
    )


def _official(name: str, llm: LLMConfig, vocab_rows: int) -> Preset:
    codebook = CodebookConfig()
    return Preset(
        name=name,
        vocab=official_vocab_layout(vocab_rows),
        llm=llm,
        vision_tower=VisionTowerConfig(),
        pixel_encoder=MoVQConfig(ch=128, z_channels=32, embed_dim=32),
        pixel_decoder=MoVQConfig(ch=384, z_channels=64, embed_dim=64),
        codebook=codebook,
        diffusion=_sdxl_diffusion(2 * codebook.dim),
    )


def _bench() -> Preset:
    """Memory-bound like the real model for benchmarks: a Qwen2.5-0.5B-shaped body (358M parameters, 1.43 GB in
    fp32, under the 2 GiB single-graph limit) with the official vocabulary layout, so the 283,047-row LM head and
    embedding table weigh what they do in ILLUME+ 3B at this width; small DualViTok pixel decoder; random weights."""
    codebook = CodebookConfig()
    return Preset(
        name="bench",
        vocab=official_vocab_layout(283047),
        llm=LLMConfig(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, max_position_embeddings=4096),
        vision_tower=VisionTowerConfig(embed_dim=64, depth=2, num_heads=2, out_dim=128),
        pixel_encoder=MoVQConfig(ch=32, z_channels=32, embed_dim=32),
        pixel_decoder=MoVQConfig(ch=32, z_channels=64, embed_dim=64),
        codebook=codebook,
        diffusion=_tiny_diffusion(2 * codebook.dim),
    )


PRESETS = {
    "tiny": _tiny,
    "bench": _bench,
    "nano": _nano,
    "3b": lambda: _official("3b", LLMConfig(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                                            num_key_value_heads=2, intermediate_size=11008), 283047),
    "7b": lambda: _official("7b", LLMConfig(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                            num_key_value_heads=4, intermediate_size=18944), 283175),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
