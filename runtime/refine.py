"""Diffusion refinement: the 64-channel token map drives an SDXL-type UNet to a 2x image (numpy scheduler).

Order of operations per the official SDXL decoder pipeline (see export/networks/diffusion.py for the cited lines):
noise * init_noise_sigma; per step: scale_model_input on [x, x], one UNet call on the batch [unconditional (map
zeroed), conditional], ``eps_u + w * (eps_c - eps_u)``, scheduler step; then the VAE decoder (which divides by the
scaling factor itself).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from illume_rt.engines.base import Engine
from illume_rt.contract import LATENT_CHANNELS, MAP_TO_LATENT, ImageGrid, LayoutError
from illume_rt.runtime.scheduler import make_scheduler


@dataclass(frozen=True)
class RefineConfig:
    steps: int = 20
    guidance_scale: float = 2.0  # ILLUME/app.py: 20 steps, 2.0

    def validate(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise LayoutError(f"refine steps must be a whole number, got {self.steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise LayoutError(f"refine guidance must be a finite number, got {self.guidance_scale!r}")
        if self.steps < 1:
            raise LayoutError("--steps must be at least 1 (20 is the official default)")
        if self.guidance_scale < 1.0:
            raise LayoutError("--refine-guidance must be >= 1 (1 = off; the official default is 2.0)")


# The official refinement defaults (ILLUME/app.py: 20 steps, guidance 2.0). A bundle may declare its diffusion
# decoder's own (manifest ``model.refine_defaults``, as illume-nano's guidance, chosen on its training split):
# model_refine_defaults.
OFFICIAL_REFINE = RefineConfig()
DECLARABLE_REFINE = ("steps", "guidance_scale")


def model_refine_defaults(declared: dict | None) -> RefineConfig:
    """The official refinement defaults with a model's declared fields (``{field: value}``) in their place. Raises
    LayoutError naming the bad field."""
    if declared is None:
        return OFFICIAL_REFINE
    unknown = sorted(set(declared) - set(DECLARABLE_REFINE))
    if unknown:
        raise LayoutError(f"refine_defaults: {unknown} cannot be declared; fields: {', '.join(DECLARABLE_REFINE)}")
    config = replace(OFFICIAL_REFINE, **declared)
    try:
        config.validate()
    except LayoutError as exc:
        raise LayoutError(f"refine_defaults: {exc}") from None
    return config


class Refiner:
    def __init__(self, unet: Engine, vae_decoder: Engine, scheduler_config: dict) -> None:
        self.unet, self.vae_decoder = unet, vae_decoder
        self.scheduler_config = scheduler_config

    def refine(self, token_map: np.ndarray, grid: ImageGrid, config: RefineConfig, rng: np.random.Generator
               ) -> tuple[np.ndarray, dict]:
        """token_map [1, C, pix_rows, pix_cols] -> image [3, 2H, 2W] in about [-1, 1], with timings."""
        config.validate()
        scheduler = make_scheduler(self.scheduler_config)
        scheduler.set_timesteps(config.steps)
        _, _, rows, cols = token_map.shape
        latent = rng.standard_normal((1, LATENT_CHANNELS, rows * MAP_TO_LATENT, cols * MAP_TO_LATENT))
        latent = (latent * scheduler.init_noise_sigma).astype(np.float32)
        guided = config.guidance_scale > 1.0
        maps = np.concatenate([np.zeros_like(token_map), token_map]) if guided else token_map
        batch = maps.shape[0]
        index = np.full(batch, grid.diffusion_resolution_index, dtype=np.int64)
        t0 = time.perf_counter()
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(np.concatenate([latent] * batch), t).astype(np.float32)
            (eps,) = self.unet.run({"latent": model_in, "timestep": np.full(batch, t, dtype=np.float32),
                                    "token_map": maps, "resolution_index": index})
            if guided:
                eps_u, eps_c = np.split(eps, 2)
                eps = eps_u + np.float32(config.guidance_scale) * (eps_c - eps_u)
            latent = scheduler.step(eps, t, latent).astype(np.float32)
        t1 = time.perf_counter()
        (image,) = self.vae_decoder.run({"latent": latent})
        timings = {"refine_unet": t1 - t0, "refine_vae": time.perf_counter() - t1}
        return image[0], timings
