"""Diffusion schedulers in numpy (no torch): the denoising-loop arithmetic of the diffusion decoder.

The official decoder pipeline (``vision_tokenizer/tokenizer/sdxl_decoder_pipe.py``) takes whatever diffusers
scheduler its checkpoint folder names and calls, per run: ``set_timesteps(n)``, ``init_noise_sigma`` (scales the
initial noise), then per timestep ``scale_model_input(x, t)`` before the UNet and ``step(eps, t, x)`` after the
guidance mix. This module reproduces that interface for ``EulerDiscreteScheduler`` (the SDXL default, and the
preset's choice), following diffusers' arithmetic (float32 tables, as diffusers keeps them) so that a loop written
against it matches a diffusers loop to float32 rounding. ``make_scheduler(config)`` reads a diffusers
``scheduler_config.json`` dict and refuses, naming the problem, any class or option it does not implement.

Usage (one image, guidance batched [uncond, cond] as the official pipeline does)::

    sched = make_scheduler(manifest_scheduler_config)
    sched.set_timesteps(20)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(np.concatenate([x, x]), t)
        eps_u, eps_c = np.split(unet(x_in, t, ...), 2)
        x = sched.step(eps_u + w * (eps_c - eps_u), t, x)
"""

from __future__ import annotations

import math

import numpy as np

from illume_rt.errors import IllumeError


class SchedulerError(IllumeError, ValueError):
    """A scheduler config this runtime cannot reproduce, or a call out of order."""


# Config keys diffusers writes into scheduler_config.json that do not change EulerDiscreteScheduler's arithmetic
# (SDXL's file carries DDIM/PNDM leftovers such as clip_sample and skip_prk_steps).
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "clip_sample", "clip_sample_range", "sample_max_value",
                 "set_alpha_to_one", "skip_prk_steps", "thresholding", "dynamic_thresholding_ratio"}


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace rounded as torch.linspace rounds it (float32 step, filled from both ends).

    diffusers builds its beta table with torch.linspace; numpy's rounding differs in the last bit.
    """
    s32, e32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s32], dtype=np.float32)
    step = np.float64(np.float32(e32 - s32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    return np.where(i < steps // 2, np.float64(s32) + step * i,
                    np.float64(e32) - step * (steps - 1 - i)).astype(np.float32)


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
           trained_betas) -> np.ndarray:
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return _linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return (_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2).astype(np.float32)
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(betas, dtype=np.float32)
    raise SchedulerError(f"beta_schedule {beta_schedule!r} is not implemented; use linear, scaled_linear or "
                         "squaredcos_cap_v2")


class EulerDiscreteScheduler:
    """numpy port of diffusers' ``EulerDiscreteScheduler`` (deterministic: s_churn = 0).

    Supported options: beta_schedule linear / scaled_linear / squaredcos_cap_v2 (or trained_betas),
    prediction_type epsilon / v_prediction / sample, timestep_spacing linspace / leading / trailing,
    interpolation_type linear / log_linear, use_karras_sigmas, final_sigmas_type zero / sigma_min.
    """

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 timestep_spacing: str = "linspace", timestep_type: str = "discrete", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):
        if use_exponential_sigmas or use_beta_sigmas:
            raise SchedulerError("exponential and beta sigma schedules are not implemented; "
                                 "set use_exponential_sigmas/use_beta_sigmas to false")
        if rescale_betas_zero_snr:
            raise SchedulerError("rescale_betas_zero_snr is not implemented")
        if timestep_type != "discrete":
            raise SchedulerError(f"timestep_type {timestep_type!r} is not implemented; use 'discrete'")
        if prediction_type not in ("epsilon", "v_prediction", "sample", "original_sample"):
            raise SchedulerError(f"prediction_type {prediction_type!r} is not one of epsilon, v_prediction, sample")
        if timestep_spacing not in ("linspace", "leading", "trailing"):
            raise SchedulerError(f"timestep_spacing {timestep_spacing!r} is not one of linspace, leading, trailing")
        if interpolation_type not in ("linear", "log_linear"):
            raise SchedulerError(f"interpolation_type {interpolation_type!r} is not one of linear, log_linear")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise SchedulerError(f"final_sigmas_type {final_sigmas_type!r} is not one of zero, sigma_min")
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction_type = prediction_type
        self.interpolation_type = interpolation_type
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.final_sigmas_type = final_sigmas_type

        betas = _betas(self.num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        alphas = (1.0 - betas).astype(np.float32)
        # float32 table as diffusers keeps it (torch accumulates the cumprod in double on CPU)
        self.alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        # train-time sigma per timestep, float32 like diffusers' table
        self._train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)

        self.num_inference_steps: int | None = None
        self.timesteps = np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps)[::-1].astype(
            np.float32)
        self.sigmas = np.concatenate([self._train_sigmas[::-1], [0.0]]).astype(np.float32)
        self._step_index: int | None = None

    # -- schedule ------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (descending, float32) and sigmas (num_inference_steps + 1, last one final) for a run."""
        n = int(num_inference_steps)
        if n < 1:
            raise SchedulerError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if self.timestep_spacing == "leading" and n > self.num_train_timesteps:
            raise SchedulerError(f"num_inference_steps {n} > num_train_timesteps {self.num_train_timesteps}")
        self.num_inference_steps = n
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif self.timestep_spacing == "leading":
            ratio = T // n
            timesteps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
            timesteps += self.steps_offset
        else:  # trailing
            ratio = T / n
            timesteps = np.arange(T, 0, -ratio).round().copy().astype(np.float32)
            timesteps -= 1

        train = self._train_sigmas
        log_train = np.log(train)
        if self.interpolation_type == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        else:  # log_linear
            sigmas = np.exp(_linspace_f32(np.log(train[-1]), np.log(train[0]), n + 1))
        if self.use_karras_sigmas:
            sigmas = self._karras(sigmas, n)
            timesteps = np.array([self._sigma_to_t(s, log_train) for s in sigmas])

        last = float(train[0]) if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self._step_index = None

    def _karras(self, in_sigmas: np.ndarray, n: int, rho: float = 7.0) -> np.ndarray:
        lo = self.sigma_min if self.sigma_min is not None else float(in_sigmas[-1])
        hi = self.sigma_max if self.sigma_max is not None else float(in_sigmas[0])
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho

    @staticmethod
    def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> np.ndarray:
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial Gaussian noise: latents = randn * init_noise_sigma."""
        top = np.float32(self.sigmas.max())
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float(np.sqrt(top * top + np.float32(1.0)))  # float32 arithmetic, as diffusers

    # -- per step --------------------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        return self._step_index

    def index_for_timestep(self, timestep) -> int:
        hits = np.flatnonzero(self.timesteps == np.float32(timestep))
        if hits.size == 0:
            raise SchedulerError(f"timestep {timestep} is not in this schedule; pass one of scheduler.timesteps")
        return int(hits[1] if hits.size > 1 else hits[0])  # diffusers takes the second of duplicates

    def _ensure_index(self, timestep) -> None:
        if self.num_inference_steps is None:
            raise SchedulerError("call set_timesteps(num_inference_steps) before the denoising loop")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep)

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """UNet input for this step: sample / sqrt(sigma^2 + 1)."""
        self._ensure_index(timestep)
        sigma = self.sigmas[self._step_index]
        return (sample / ((sigma ** 2 + 1) ** 0.5)).astype(sample.dtype, copy=False)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """One Euler step x_t -> x_{t-1} from the (guided) model output; returns the new sample."""
        self._ensure_index(timestep)
        if self._step_index >= len(self.sigmas) - 1:
            raise SchedulerError("step() called more times than there are timesteps")
        x = sample.astype(np.float32, copy=False)
        eps = model_output.astype(np.float32, copy=False)
        sigma = self.sigmas[self._step_index]
        if self.prediction_type == "epsilon":
            x0 = x - sigma * eps
        elif self.prediction_type == "v_prediction":
            x0 = eps * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        else:
            x0 = eps
        derivative = (x - x0) / sigma
        dt = self.sigmas[self._step_index + 1] - sigma
        prev = x + derivative * dt
        self._step_index += 1
        return prev.astype(model_output.dtype, copy=False)


SCHEDULERS = {"EulerDiscreteScheduler": EulerDiscreteScheduler}


def make_scheduler(config: dict):
    """A scheduler from a diffusers ``scheduler_config.json`` dict (``_class_name`` picks the class)."""
    name = config.get("_class_name", "EulerDiscreteScheduler")
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise SchedulerError(f"scheduler {name!r} is not implemented in the numpy runtime; "
                             f"implemented: {', '.join(SCHEDULERS)}")
    kwargs = {k: v for k, v in config.items() if k not in _IGNORED_KEYS}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise SchedulerError(f"{name}: unsupported option in scheduler config: {err}") from None
