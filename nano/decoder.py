"""illume-nano's diffusion decoder: the official decoder's structure at toy size, trained to draw nano's pictures at
2x (512x512) from their 16-channel token map (``python -m illume_rt.nano.train vae decoder``).

Structure (the official one, ``export/networks/diffusion.py``): an SDXL-type ``UNet2DConditionModel`` whose input is
the 4-channel VAE latent concatenated with the token map (nearest-upsampled to the latent grid), with zero text
conditioning and ``add_time_ids = [0, 0, 0, 0, 0, resolution_index]``, denoising for an ``AutoencoderKL`` with an 8x
latent; sizes in ``export/configs.py`` (``_nano_diffusion``). Two training stages:

- ``vae``: the autoencoder on 512x512 renders of training scenes (L1 + L2 reconstruction from the posterior mean, a
  tiny KL term), mostly on crops (convolutional; a full picture costs 16x a 128-px crop), then whole pictures so
  that GroupNorm sees their statistics. Its ``scaling_factor`` is then set so that the latents of training pictures
  have unit standard deviation (what the noise schedule assumes; SDXL's 0.13025 was measured the same way).
- ``decoder``: the UNet, on the scheduler's noise schedule and prediction type (the ones the runtime samples with),
  on pairs (token map of a jittered 256x256 training picture through the frozen nano tokenizer, VAE latent of the
  same scene rendered at 512x512). The map is zeroed for 10% of the examples: guidance's unconditional row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from illume_rt.contract import DIFFUSION_SIZES, MAP_TO_LATENT
from illume_rt.nano import data

OUTPUT_SIZE = 2 * data.IMAGE_SIZE  # the decoder's output: 2x nano's 256x256
RESOLUTION_INDEX = DIFFUSION_SIZES.index((OUTPUT_SIZE, OUTPUT_SIZE))  # add_time_ids[-1] (the runtime's for 256x256)
MAP_DROP_P = 0.1  # share of examples with the map zeroed: the unconditional row of guidance
# Offset noise: the training noise gets a constant per example and channel of this standard deviation. At the
# schedule's last step x_t still holds sqrt(alphas_cumprod) ~ 0.07 of the clean latent, and nano's backgrounds are
# flat, so the mean of x_t over ~4000 latent cells gives the background colour away. A UNet that learned to read it
# there reads the pure noise the sampler starts from instead of the token map, and draws the background in the
# colour the noise suggests. With the offset, x_t's mean tells the colour less, and the map has to. Measured on a
# from-scratch tokenizer (nano/README.md "Refinement"): 0.1 took held-out refinement from 25.9 to 27.9 dB (Lanczos:
# 27.1); the worst scene's background still went wrong for 2 of 6 seeds (was 4), so 0.1 lessens it, not removes it.
# More is not better: 0.3 drew that scene worse and refined at 27.6 dB (session 21), so the rest is not this leak.
OFFSET_NOISE = 0.1
KL_WEIGHT = 1e-6  # as Stable Diffusion's VAE: a latent near a Gaussian's scale, reconstruction first


def jittered_pair(scene: data.Scene, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same jittered scene at 256x256 (the tokenizer's input) and 512x512 (the decoder's target)."""
    return (data.render(scene, np.random.default_rng(seed)),
            data.render(scene, np.random.default_rng(seed), size=OUTPUT_SIZE))


@torch.no_grad()
def codes(encoder, pixel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, 256, 256] in [-1, 1] -> (semantic [B, 9, 9], pixel [B, 16, 16]) code grids of the nano tokenizer."""
    semantic = pixel.semantic_quantizer.nearest_indices(encoder(images))
    return semantic, pixel.pixel_quantizer.nearest_indices(pixel.pixel_quant_conv(pixel.pixel_encoder(images)))


@torch.no_grad()
def token_maps(encoder, pixel, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 256, 256] in [-1, 1] -> the runtime's token map [B, 2 x dim, 16, 16]: merge_quants of the codebook
    vectors of the pictures' semantic and pixel codes (what ``Pipeline.refine_image`` feeds the UNet)."""
    from illume_rt.export.networks.dualvitok import merge_quants

    semantic, pixel_codes = codes(encoder, pixel, images)
    return merge_quants(pixel.semantic_quantizer.indices_to_codes(semantic),
                        pixel.pixel_quantizer.indices_to_codes(pixel_codes))


def unet_call(preset, unet, latent_in: torch.Tensor, timestep: torch.Tensor, token_map: torch.Tensor
              ) -> torch.Tensor:
    """The UNet as the official pipeline calls it for nano's output size (zero text, text_time ids); ``preset``:
    the nano preset the UNet was built from (its pooled width)."""
    from illume_rt.export.networks.diffusion import unet_reference_call

    index = torch.full((latent_in.shape[0],), RESOLUTION_INDEX, dtype=torch.int64)
    return unet_reference_call(preset, unet, latent_in, timestep, token_map, index)


def object_crops(images: torch.Tensor, scenes: list[data.Scene], size: int, rng: np.random.Generator
                 ) -> torch.Tensor:
    """One ``size`` crop per picture, half of them around the shape (edges are where the pixels are hard)."""
    full = images.shape[-1]
    out = []
    for img, scene in zip(images, scenes):
        if rng.random() < 0.5:
            fy, fx = data.POSITIONS[scene.position]
            cy, cx = fy * full + rng.uniform(-0.1, 0.1) * full, fx * full + rng.uniform(-0.1, 0.1) * full
            r, c = int(np.clip(cy - size / 2, 0, full - size)), int(np.clip(cx - size / 2, 0, full - size))
        else:
            r, c = rng.integers(0, full - size + 1, 2)
        out.append(img[:, r:r + size, c:c + size])
    return torch.stack(out)


def object_share(picture: np.ndarray, scene: data.Scene) -> torch.Tensor:
    """[1, 64, 64]: the share of each latent cell's 8x8 pixels of a 512x512 picture that are not background."""
    mask = np.any(picture != np.array(data.BACKGROUNDS[scene.background], np.uint8), axis=-1).astype(np.float32)
    cell = OUTPUT_SIZE // 64
    return torch.from_numpy(mask.reshape(64, cell, 64, cell).mean(axis=(1, 3))[None])


def crop_corner(scene: data.Scene, map_side: int, cells: int, rng: np.random.Generator) -> tuple[int, int]:
    """(row, col) of a ``cells``-wide crop of the map grid: half of them around the shape, half anywhere."""
    if rng.random() < 0.5:
        fy, fx = data.POSITIONS[scene.position]
        centre = np.array([fy, fx]) * map_side + rng.uniform(-cells / 4, cells / 4, 2)
        r, c = np.clip(np.round(centre - cells / 2), 0, map_side - cells).astype(int)
        return int(r), int(c)
    r, c = rng.integers(0, map_side - cells + 1, 2)
    return int(r), int(c)


def vae_loss(vae, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Reconstruction from the posterior mean (the latent the UNet is trained on, ``latents``): sampling the
    posterior at its initial unit variance buried the picture in noise and the decoder learned slowly (L1 0.15
    after 400 steps); the KL term then only keeps the means near a Gaussian's scale."""
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.mode()).sample
    l1 = F.l1_loss(rec, x)
    return l1 + F.mse_loss(rec, x) + KL_WEIGHT * posterior.kl().mean(), l1.item()


@torch.no_grad()
def latents(vae, images: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """The latents the decoder is trained to produce: the posterior mean, times the scaling factor (the loop's
    latent; the exported VAE decoder divides by it)."""
    return vae.encode(images).latent_dist.mode() * scaling_factor


def noised(scheduler, x0: torch.Tensor, rng: np.random.Generator):
    """(x_t, t, eps) with t uniform over the scheduler's training steps: the DDPM forward process the Euler
    sampler inverts (its scale_model_input turns its sigma-scaled latent back into this x_t). The noise has an
    offset per example and channel (OFFSET_NOISE), see there."""
    b = x0.shape[0]
    t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, b)).long()
    eps = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    eps = eps + OFFSET_NOISE * torch.from_numpy(rng.standard_normal((b, x0.shape[1], 1, 1)).astype(np.float32))
    alpha = scheduler.alphas_cumprod[t].float().view(b, 1, 1, 1)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps, t.float(), eps


def training_target(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output, by the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        alpha = scheduler.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        return alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
    raise ValueError(f"prediction type {kind!r}")


@torch.no_grad()
def first_step_pictures(preset, unet, vae, token_map: torch.Tensor, seeds, steps: int = 20) -> np.ndarray:
    """uint8 [len(seeds), 512, 512, 3]: the clean picture the UNet predicts at the sampler's first step from each
    seed's starting noise (the Euler scheduler's first timestep and input scaling, as the runtime samples; nano's
    UNet predicts the clean latent). A decoder that follows the token map predicts the same picture for every
    seed; one that reads the background from the noisy latent (see OFFSET_NOISE) does not."""
    from illume_rt.export.networks.diffusion import build_scheduler

    scheduler = build_scheduler(preset)
    assert scheduler.config.prediction_type == "sample", scheduler.config.prediction_type
    scheduler.set_timesteps(steps)
    t0 = scheduler.timesteps[0]
    side = token_map.shape[-1] * MAP_TO_LATENT
    noise = torch.cat([torch.from_numpy(np.random.default_rng(seed).standard_normal((1, vae.config.latent_channels,
                                                                                        side, side)))
                       for seed in seeds]).float()
    latent_in = scheduler.scale_model_input(noise * scheduler.init_noise_sigma, t0)
    clean = unet_call(preset, unet, latent_in, t0.float().expand(len(seeds)), token_map.expand(len(seeds), -1, -1, -1))
    pictures = vae.decode(clean / vae.config.scaling_factor).sample
    return ((pictures.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


# -- evaluation: refined 2x output against the pixel decoder's output upscaled with Lanczos ----------------------
def tokenizer_from_weights(dualvitok_file):
    """(semantic encoder, DualViTokPixel) from a nano tokenizer file: what turns a picture into its codes (the
    training-only semantic encoder is in the file; the runtime has no picture -> codes graph)."""
    from illume_rt.nano import train

    encoder, _, pixel = train.build_tokenizer_modules(train.nano_preset())
    state = torch.load(dualvitok_file, weights_only=True)
    prefix = "semantic_encoder."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    pixel.load_state_dict({k: v for k, v in state.items() if not k.startswith((prefix, "semantic_decoder."))})
    return encoder.eval(), pixel.eval()


def bundle_tokenizer(bundle: Path) -> Path | None:
    """The nano tokenizer file ``bundle`` was exported from: refinement is scored from pictures' codes, and the
    runtime has no picture -> codes graph, so they come from that file. It is the file the manifest names
    (model.source.dualvitok) while it still holds the recorded bytes, else the committed one if that holds them
    (a bundle exported in another checkout); None when neither does."""
    from illume_rt.files import sha256_file
    from illume_rt.nano.checkpoint import COMMITTED

    source = json.loads((bundle / "manifest.json").read_text())["model"].get("source", {}).get("dualvitok") or {}
    recorded = (source.get("files") or {}).get(COMMITTED.dualvitok.name, {}).get("sha256")
    named = Path(source["path"]) if source.get("path") else None
    for candidate in (named, COMMITTED.dualvitok):
        if recorded and candidate is not None and candidate.is_file() and sha256_file(candidate) == recorded:
            return candidate
    return None


def picture_codes(encoder, pixel, picture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [256, 256, 3] -> (semantic [9, 9], pixel [16, 16]) code grids."""
    semantic, pixel_codes = codes(encoder, pixel, torch.from_numpy(data.to_model_input(picture)))
    return semantic[0].numpy(), pixel_codes[0].numpy()


def refinement_scores(pipe, scenes: list[data.Scene], encoder, pixel, config=None, seed: int = 0) -> dict:
    """Each scene's canonical 256x256 picture -> its codes -> (a) the runtime's diffusion decoder (2x) and (b) the
    runtime's pixel decoder upscaled to 2x with Lanczos; PSNR of each against the scene rendered at 2x. ``config``:
    the refinement (default: what ``--refine`` gets, the bundle's ``default_refine``)."""
    from PIL import Image

    from illume_rt.contract import image_grid
    from illume_rt.runtime.pipeline import to_uint8

    config = config or pipe.default_refine()
    grid = image_grid(data.IMAGE_SIZE, data.IMAGE_SIZE)
    refined, lanczos = [], []
    for scene in scenes:
        semantic, codes = picture_codes(encoder, pixel, data.render(scene))
        truth = data.render(scene, size=OUTPUT_SIZE)
        image, _ = pipe.refine_image(semantic, codes, grid, config, np.random.default_rng(seed))
        refined.append(psnr(to_uint8(image), truth))
        small = Image.fromarray(to_uint8(pipe.decode_image(semantic, codes)))
        lanczos.append(psnr(np.asarray(small.resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.LANCZOS)), truth))
    return {"scenes": len(scenes), "steps": config.steps, "guidance": config.guidance_scale, "seed": seed,
            "refined_psnr_db": round(float(np.mean(refined)), 2), "lanczos_psnr_db": round(float(np.mean(lanczos)), 2),
            "refined_better_share": round(float(np.mean(np.array(refined) > np.array(lanczos))), 3)}
