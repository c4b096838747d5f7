"""Diffusion decoder of ILLUME+: an SDXL-type UNet that refines the 64-channel token map into a 2x image, plus
the SDXL-type VAE that turns its latent into pixels. Reference modules (diffusers models with seeded random
weights), their export forms and component descriptors, and a torch reference of the official denoising loop.

Facts verified in the official pipeline ``vision_tokenizer/tokenizer/sdxl_decoder_pipe.py`` (ILLUME_plus commit
51de69d; "pipe:N" below is a line there):

- Models: ``UNet2DConditionModel`` + ``AutoencoderKL`` + any ``KarrasDiffusionSchedulers`` member, loaded from a
  diffusers folder (pipe:335-351; ``ILLUME/generation_eval/models/illume.py:261-267`` loads it with
  ``torch_dtype=torch.float32``). No text encoder: the prompt embeddings are constant zeros ``[1, 77, 2048]`` and the
  pooled embeddings zeros ``[1, 1280]`` (pipe:365-366), repeated per image (pipe:746-750); the negative ones are the
  same tensors (pipe:749-750). Hence cross_attention_dim 2048 and a 1280-d pooled vector (also pipe:776).
- Token map: the codebook vectors of the semantic and pixel codes, ``merge_quants`` = semantic map bicubic-upsampled
  to the pixel grid, then ``cat([semantic, pixel], dim=1)`` (``dualvitok_model.py:640-663``; pipe:309-311, 735);
  channels = pixel_channel + semantic_channel (pipe:367) = 2 x codebook dim = 64. The map sits at 1/16 of the
  token decoder's resolution, i.e. 1/32 of the 2x output. Note: the embedder casts the tokenizer to float16
  (pipe:168), so the official map is computed in fp16 and then cast to the latent dtype (pipe:848).
- Latents: 4 channels (``num_channels_latents = 4``, pipe:759), grid = output size / vae_scale_factor where
  vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1) = 8 (pipe:353, 437-443); initial noise times
  ``scheduler.init_noise_sigma`` (pipe:456). The UNet's in_channels is therefore 4 + 64 = 68 (derived: the map is
  concatenated to the latent, pipe:859).
- Map to latent grid: ``F.interpolate(map, size=latent.shape[-2:])``, i.e. mode "nearest" (pipe:848-852; the resize
  is skipped when the widths already agree). For the 2x refiner the factor is exactly 4 (output 2H -> latent H/4;
  map H/16).
- add_time_ids = ``[0, 0, 0, 0, 0, resolution_index]`` (pipe:398), where resolution_index is the position of
  ``"(width, height)"`` of the *output* in a fixed list of 12 sizes (pipe:369-371, 778-780; our
  ``runtime.layout.DIFFUSION_SIZES``). The pipeline checks ``addition_time_embed_dim * 6 + 1280`` against
  ``add_embedding.linear_1.in_features`` (pipe:400-408), so the UNet is SDXL's "text_time" kind.
- Guidance (when guidance_scale > 1 and time_cond_proj_dim is None, pipe:523-525): the batch is
  ``[uncond rows..., cond rows...]`` (pipe:802-805, 845); the uncond rows get the map zeroed, the cond rows the map
  (pipe:853-854); the text inputs are zeros for both; noise = uncond + w * (cond - uncond) (pipe:871-873);
  guidance_rescale defaults to 0 (pipe:578, 875).
- Loop order per timestep t (pipe:840-881): x_in = cat([x, x]); x_in = scheduler.scale_model_input(x_in, t);
  map_in = cat([0, nearest(map)]); eps = unet(cat([x_in, map_in], 1), t, zeros text, text_time(zeros pooled,
  time_ids)); guidance mix; x = scheduler.step(eps, t, x). Timesteps come from ``scheduler.set_timesteps(n)``
  via ``retrieve_timesteps`` (pipe:753-755). add_time_ids is one row per guidance half, repeated per image
  (pipe:805, 809): every row is the same. ``eta`` only reaches schedulers whose step takes it (pipe:543-558);
  the initial noise comes from a seeded torch.Generator (illume.py:526), which numpy cannot reproduce bit for bit.
- Decode: latents / vae.config.scaling_factor (or the latents_mean/std form when the VAE config has them,
  pipe:920-933), ``vae.decode`` -> image in [-1, 1] (pipe:935), then VaeImageProcessor.postprocess
  ((x / 2 + 0.5).clamp(0, 1), pipe:948).
- Defaults in the callers: 20 steps and guidance 2.0 (``ILLUME/app.py:768-776``), 50 steps and 1.5
  (``generation_eval/models/illume.py:31-32``); the output is 2x the token-decoder size (illume.py:520-527).

Not verifiable here (the Hugging Face folder ``ILLUME-MLLM/dualvitok-sdxl-decoder`` is not available offline):
the scheduler class and config (the pipeline accepts any Karras-family scheduler; the preset assumes SDXL-base's
EulerDiscreteScheduler: scaled_linear 0.00085..0.012, 1000 steps, epsilon, "leading" spacing, steps_offset 1),
the UNet's widths/depths and addition_time_embed_dim (preset: SDXL base, 256), and the VAE (preset: SDXL VAE,
scaling_factor 0.13025, no latents_mean/std). Loading the real folder must overwrite these preset dicts.

Export forms (what the ONNX graphs compute):
- ``diffusion_unet``: (latent, timestep, token_map, resolution_index) -> noise_pred. The graph upsamples the map
  (nearest) to the latent grid, builds add_time_ids from resolution_index and the zero pooled vector, and has no
  text input: with all 77 keys equal (zeros), every cross-attention softmax is uniform, so each cross-attention
  output is the constant ``to_out(to_v(0))`` whatever the query. The export form replaces every ``attn2`` by that
  constant (computed once from the weights when the form is built), so to_q/to_k/to_v of the cross-attentions
  drop out of the graph. Guidance stays outside: the caller batches [uncond (map zeroed), cond] and mixes.
- ``vae_decoder``: latent (as the denoising loop leaves it, i.e. *scaled*) -> image in [-1, 1]; the graph divides
  by scaling_factor (or applies latents_mean/std) itself. Post-processing to [0, 1] / uint8 is the runtime's.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from illume_rt.export.components import Component, TensorSpec, Tolerance
from illume_rt.contract import DIFFUSION_SIZES, GRAPH_IO, LATENT_CHANNELS, MAP_TO_LATENT, image_grid
from illume_rt.export.configs import NUM_ADD_TIME_IDS, Preset

TEXT_SEQ_LEN = 77  # length of the zero prompt embeddings (pipe:365); only the unfolded reference uses it


# -- sizes read from the preset ---------------------------------------------------------------------------------
def map_channels(preset: Preset) -> int:
    """Channels of the token map: semantic + pixel codebook vectors (2 x codebook dim; 64 for the real model)."""
    return 2 * preset.codebook.dim


def pooled_dim(preset: Preset) -> int:
    """Width of the (zero) pooled text embedding, from the text_time embedding's input width."""
    u = preset.diffusion.unet
    return u["projection_class_embeddings_input_dim"] - NUM_ADD_TIME_IDS * u["addition_time_embed_dim"]


def vae_scale_factor(preset: Preset) -> int:
    return 2 ** (len(preset.diffusion.vae["block_out_channels"]) - 1)


def check_config(preset: Preset) -> None:
    """The invariants the pipeline relies on; raises ValueError naming the mismatch."""
    u, v = preset.diffusion.unet, preset.diffusion.vae
    if not u or not v:
        raise ValueError(f"preset {preset.name!r} has no diffusion decoder config")
    want = v.get("latent_channels", LATENT_CHANNELS) + map_channels(preset)
    if u["in_channels"] != want:
        raise ValueError(f"UNet in_channels {u['in_channels']} != latent channels + map channels = {want}")
    if u.get("out_channels", LATENT_CHANNELS) != v.get("latent_channels", LATENT_CHANNELS):
        raise ValueError("UNet out_channels must equal the VAE's latent_channels")
    if u.get("addition_embed_type") != "text_time" or pooled_dim(preset) <= 0:
        raise ValueError("the decoder UNet must use addition_embed_type 'text_time' with a positive pooled width")


# -- reference modules ------------------------------------------------------------------------------------------
def build_diffusion(preset: Preset, device: str | None = None):
    """(unet, vae): diffusers models with seeded random weights, in eval mode.

    ``device="meta"`` builds the structure without memory (for the real presets in tests). The global torch RNG
    state is left untouched.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        with torch.device(device or "cpu"):
            unet = UNet2DConditionModel(**preset.diffusion.unet)
            vae = AutoencoderKL(**preset.diffusion.vae)
    return unet.eval(), vae.eval()


def build_scheduler(preset: Preset):
    """The diffusers scheduler named by the preset's scheduler config (build-time reference)."""
    import diffusers

    config = dict(preset.diffusion.scheduler)
    cls = getattr(diffusers, config.get("_class_name", "EulerDiscreteScheduler"))
    return cls.from_config(config)


# -- export forms -----------------------------------------------------------------------------------------------
class ZeroTextCrossAttnProcessor:
    """Cross-attention against an all-zero text sequence: a constant row, whatever the query.

    All keys equal => uniform softmax => the attention output is the common value row, so the block returns
    ``to_out(to_v(norm_cross(0)))`` broadcast over the tokens (plus the residual if the block has one).
    """

    def __init__(self, constant):
        self.constant = constant  # [C]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.constant.to(hidden_states.dtype).expand(hidden_states.shape)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _zero_text_constant(attn, cross_dim: int):
    import torch

    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise NotImplementedError("cross-attention with spatial/group norm is not folded")
    with torch.no_grad():
        p = next(attn.to_v.parameters())
        z = torch.zeros(1, 1, cross_dim, dtype=p.dtype, device=p.device)
        if attn.norm_cross:
            z = attn.norm_encoder_hidden_states(z)
        return attn.to_out[1](attn.to_out[0](attn.to_v(z))).reshape(-1).detach().clone()


def _share_weights_copy(module):
    """A structural copy of ``module`` whose parameters and buffers are the original tensors (no memory)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _unet_export_class():
    import torch
    import torch.nn.functional as F

    class DiffusionUNetExport(torch.nn.Module):
        """(latent, timestep, token_map, resolution_index) -> (noise_pred,), text conditioning folded."""

        def __init__(self, unet, pooled: int):
            super().__init__()
            unet = _share_weights_copy(unet)
            cross_dim = unet.config.cross_attention_dim
            processors = {}
            for name, proc in unet.attn_processors.items():
                if name.endswith("attn2.processor"):
                    attn = unet.get_submodule(name[: -len(".processor")])
                    processors[name] = ZeroTextCrossAttnProcessor(_zero_text_constant(attn, cross_dim))
                    # the folded block never reads its q/k/v projections: drop them from the graph
                    attn.to_q = attn.to_k = attn.to_v = None
                else:
                    processors[name] = proc
            unet.set_attn_processor(processors)
            self.unet = unet
            self.pooled = pooled
            self.cross_dim = cross_dim

        def forward(self, latent, timestep, token_map, resolution_index):
            batch = latent.shape[0]
            cond = F.interpolate(token_map.to(latent.dtype), size=latent.shape[-2:], mode="nearest")
            x = torch.cat([latent, cond], dim=1)
            time_ids = torch.cat([latent.new_zeros(batch, NUM_ADD_TIME_IDS - 1),
                                  resolution_index.to(latent.dtype).reshape(batch, 1)], dim=1)
            text = latent.new_zeros(batch, 1, self.cross_dim)  # never read: every attn2 is folded
            out = self.unet(x, timestep, encoder_hidden_states=text,
                            added_cond_kwargs={"text_embeds": latent.new_zeros(batch, self.pooled),
                                               "time_ids": time_ids}, return_dict=False)[0]
            return (out,)

    return DiffusionUNetExport


def _vae_export_class():
    import torch

    class VaeDecoderExport(torch.nn.Module):
        """(latent,) -> (image,): unscale the loop's latent, decode to [-1, 1]."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae
            cfg = vae.config
            self.scaling_factor = float(cfg.scaling_factor)
            mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
            self.has_stats = mean is not None and std is not None
            if self.has_stats:
                c = cfg.latent_channels
                self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
                self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

        def forward(self, latent):
            if self.has_stats:
                z = latent * self.latents_std / self.scaling_factor + self.latents_mean
            else:
                z = latent / self.scaling_factor
            return (self.vae.decode(z, return_dict=False)[0],)

    return VaeDecoderExport


def unet_export_module(preset: Preset, unet):
    return _unet_export_class()(unet, pooled_dim(preset)).eval()


def vae_decoder_export_module(vae):
    return _vae_export_class()(vae).eval()


# -- descriptors --------------------------------------------------------------------------------------------------
def _is_tiny(preset: Preset) -> bool:
    return preset.diffusion.unet["block_out_channels"][-1] < 256


def _map_profiles(preset: Preset) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(min, opt, max) of the token-map rows and columns over the supported output sizes."""
    if _is_tiny(preset):  # toy decoders: up to the 16x16 map of a 256x256 picture (illume-nano's size)
        side = image_grid(256, 256).pixel_rows
        return (1, 2, side), (1, 2, side)
    f = vae_scale_factor(preset) * MAP_TO_LATENT
    hs = sorted({h // f for _, h in DIFFUSION_SIZES})
    ws = sorted({w // f for w, _ in DIFFUSION_SIZES})
    opt = DIFFUSION_SIZES[0]  # 1024 x 1024
    return (hs[0], opt[1] // f, hs[-1]), (ws[0], opt[0] // f, ws[-1])


def unet_component(preset: Preset, unet) -> Component:
    """Descriptor of the denoising UNet in export form ("diffusion_unet")."""
    check_config(preset)
    c_map, c_lat = map_channels(preset), preset.diffusion.unet["out_channels"]
    (mh, mw) = _map_profiles(preset)
    batch_prof = (1, 2, 4) if _is_tiny(preset) else (1, 2, 8)
    m = MAP_TO_LATENT
    dims = {
        "batch": (2, 3, batch_prof),
        "map_h": (2, 4, mh),
        "map_w": (3, 2, mw),
        "lat_h": (2 * m, 4 * m, tuple(m * v for v in mh)),
        "lat_w": (3 * m, 2 * m, tuple(m * v for v in mw)),
    }

    def make_inputs(d: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        b = d["batch"]
        return {
            "latent": rng.standard_normal((b, c_lat, d["lat_h"], d["lat_w"])).astype(np.float32),
            "timestep": rng.uniform(0, 999, size=(b,)).astype(np.float32),
            "token_map": rng.standard_normal((b, c_map, d["map_h"], d["map_w"])).astype(np.float32),
            "resolution_index": rng.integers(0, len(DIFFUSION_SIZES), size=(b,)).astype(np.int64),
        }

    return Component(
        name="diffusion_unet",
        inputs=(
            TensorSpec(GRAPH_IO["diffusion_unet"][0][0], "float32", ("batch", c_lat, "lat_h", "lat_w")),
            TensorSpec(GRAPH_IO["diffusion_unet"][0][1], "float32", ("batch",)),
            TensorSpec(GRAPH_IO["diffusion_unet"][0][2], "float32", ("batch", c_map, "map_h", "map_w")),
            TensorSpec(GRAPH_IO["diffusion_unet"][0][3], "int64", ("batch",)),
        ),
        outputs=(TensorSpec(GRAPH_IO["diffusion_unet"][1][0], "float32", ("batch", c_lat, "lat_h", "lat_w")),),
        dims=dims,
        build_module=lambda: unet_export_module(preset, unet),
        make_inputs=make_inputs,
        tolerance=Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999),
        description=(f"SDXL-type UNet of the 2x diffusion decoder. latent: scheduler-scaled noisy latent "
                     f"(output size / {vae_scale_factor(preset)}); timestep: scheduler timestep per row; token_map: "
                     f"{c_map}-ch map at 1/16 of the token-decoder size (zeros for guidance's uncond rows), "
                     f"nearest-upsampled to the latent grid inside (lat = {m} x map); resolution_index: index of "
                     f"the output (W, H) in DIFFUSION_SIZES (add_time_ids[-1]). Zero text conditioning is folded. "
                     f"Batch guidance as [uncond rows, cond rows]."),
    )


def vae_decoder_component(preset: Preset, vae) -> Component:
    """Descriptor of the VAE decoder in export form ("vae_decoder"); scaling_factor is applied inside."""
    check_config(preset)
    c_lat = preset.diffusion.vae.get("latent_channels", LATENT_CHANNELS)
    (mh, mw) = _map_profiles(preset)
    batch_prof = (1, 1, 4)
    m = MAP_TO_LATENT
    dims = {
        "batch": (2, 1, batch_prof),
        "lat_h": (2 * m, 4 * m, tuple(m * v for v in mh)),
        "lat_w": (3 * m, 2 * m, tuple(m * v for v in mw)),
    }

    def make_inputs(d: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        shape = (d["batch"], c_lat, d["lat_h"], d["lat_w"])
        return {"latent": rng.standard_normal(shape).astype(np.float32)}

    return Component(
        name="vae_decoder",
        inputs=(TensorSpec(GRAPH_IO["vae_decoder"][0][0], "float32", ("batch", c_lat, "lat_h", "lat_w")),),
        outputs=(TensorSpec(GRAPH_IO["vae_decoder"][1][0], "float32", ("batch", preset.diffusion.vae.get("out_channels", 3),
                                                  "image_h", "image_w")),),
        dims=dims,
        build_module=lambda: vae_decoder_export_module(vae),
        make_inputs=make_inputs,
        tolerance=Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999),
        description=(f"AutoencoderKL decoder. latent: the denoising loop's final latent (scaled; the graph divides "
                     f"by scaling_factor); image: RGB in [-1, 1] at {vae_scale_factor(preset)}x the latent grid."),
    )


# -- torch reference of the official loop -----------------------------------------------------------------------
def unet_reference_call(preset: Preset, unet, latent_in, timestep, token_map, resolution_index):
    """The UNet called as the official pipeline calls it (unfolded zero text, explicit map upsample)."""
    import torch
    import torch.nn.functional as F

    b = latent_in.shape[0]
    cond = F.interpolate(token_map.to(latent_in.dtype), size=latent_in.shape[-2:])
    time_ids = torch.zeros(b, NUM_ADD_TIME_IDS, dtype=latent_in.dtype)
    time_ids[:, -1] = resolution_index.to(latent_in.dtype)
    text = torch.zeros(b, TEXT_SEQ_LEN, unet.config.cross_attention_dim, dtype=latent_in.dtype)
    pooled = torch.zeros(b, pooled_dim(preset), dtype=latent_in.dtype)
    return unet(torch.cat([latent_in, cond], 1), timestep, encoder_hidden_states=text,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]


def reference_refine(preset: Preset, unet, vae, scheduler, token_map, resolution_index: int, noise,
                     num_steps: int = 20, guidance_scale: float = 2.0):
    """The official denoising loop and decode (pipe:840-935) with diffusers objects; returns (latent, image).

    ``token_map`` [B, C, h, w] (1/16 of the token-decoder size); ``noise`` [B, 4, 4h, 4w] standard normal.
    """
    import torch

    scheduler.set_timesteps(num_steps)
    latents = noise * scheduler.init_noise_sigma
    b = latents.shape[0]
    guided = guidance_scale > 1
    rows = 2 * b if guided else b
    index = torch.full((rows,), int(resolution_index), dtype=torch.int64)
    map_in = torch.cat([torch.zeros_like(token_map), token_map]) if guided else token_map
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = torch.cat([latents] * 2) if guided else latents
            x_in = scheduler.scale_model_input(x_in, t)
            eps = unet_reference_call(preset, unet, x_in, t, map_in, index)
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return latents, image


def param_count(module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
