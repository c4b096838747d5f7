"""Diffusion decoder: numpy scheduler vs diffusers, folded UNet vs the official call, ONNX export of the UNet and
the VAE decoder on the tiny preset, a numpy+onnxruntime denoising loop vs the torch reference loop, and the real
presets' structure on the meta device."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch", reason="the diffusion reference needs the export extra (torch)")
diffusers = pytest.importorskip("diffusers", reason="the diffusion reference needs the export extra (diffusers)")

from illume_rt.export.configs import SDXL_EULER_SCHEDULER, get_preset  # noqa: E402
from illume_rt.export.networks import diffusion as D  # noqa: E402
from illume_rt.contract import DIFFUSION_SIZES, image_grid  # noqa: E402
from illume_rt.runtime.scheduler import EulerDiscreteScheduler, SchedulerError, make_scheduler  # noqa: E402


# -- scheduler -----------------------------------------------------------------------------------------------------
SCHEDULER_CASES = {
    "sdxl": dict(SDXL_EULER_SCHEDULER),
    "trailing_karras": dict(SDXL_EULER_SCHEDULER, timestep_spacing="trailing", use_karras_sigmas=True),
    "vpred_linspace": dict(SDXL_EULER_SCHEDULER, timestep_spacing="linspace", prediction_type="v_prediction",
                           beta_schedule="linear", beta_start=0.0001, beta_end=0.02, final_sigmas_type="sigma_min"),
    "cosine_loglinear": dict(SDXL_EULER_SCHEDULER, beta_schedule="squaredcos_cap_v2",
                             interpolation_type="log_linear"),
}


@pytest.mark.parametrize("case", list(SCHEDULER_CASES))
@pytest.mark.parametrize("steps", [20, 7])
def test_scheduler_matches_diffusers(case, steps):
    """20 (and 7) Euler steps, numpy vs diffusers, with the same random model outputs.

    Tolerance: max |numpy - diffusers| <= 1e-5 * max(1, max |x|) over every scaled input and every sample.
    """
    config = SCHEDULER_CASES[case]
    ref = getattr(diffusers, config["_class_name"]).from_config(config)
    ours = make_scheduler(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-6, atol=1e-7)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert len(ours.timesteps) == steps

    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 6, 10)).astype(np.float32) * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(x.copy())
    for t_ref, t in zip(ref.timesteps, ours.timesteps):
        eps = rng.standard_normal(x.shape).astype(np.float32)
        scaled_ref = ref.scale_model_input(x_ref, t_ref).numpy()
        scaled = ours.scale_model_input(x, t)
        assert np.abs(scaled - scaled_ref).max() <= 1e-5 * max(1.0, np.abs(scaled_ref).max())
        x_ref = ref.step(torch.from_numpy(eps), t_ref, x_ref, return_dict=False)[0]
        x = ours.step(eps, t, x)
        assert x.dtype == np.float32
        assert np.abs(x - x_ref.numpy()).max() <= 1e-5 * max(1.0, np.abs(x_ref.numpy()).max())


def test_scheduler_refuses_what_it_cannot_do():
    with pytest.raises(SchedulerError, match="DPMSolverMultistepScheduler"):
        make_scheduler({"_class_name": "DPMSolverMultistepScheduler"})
    with pytest.raises(SchedulerError, match="exponential"):
        make_scheduler(dict(SDXL_EULER_SCHEDULER, use_exponential_sigmas=True))
    with pytest.raises(SchedulerError, match="unsupported option"):
        make_scheduler(dict(SDXL_EULER_SCHEDULER, no_such_option=1))
    sched = EulerDiscreteScheduler(**{k: v for k, v in SDXL_EULER_SCHEDULER.items() if k != "_class_name"})
    with pytest.raises(SchedulerError, match="set_timesteps"):
        sched.step(np.zeros(4, np.float32), 951.0, np.zeros(4, np.float32))
    sched.set_timesteps(2)
    with pytest.raises(SchedulerError, match="not in this schedule"):
        sched.scale_model_input(np.zeros(4, np.float32), 123.5)


def test_scheduler_module_imports_without_torch():
    code = ("import sys, illume_rt.runtime.scheduler; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "3b", "7b"])
def test_unet_in_channels_are_latent_plus_map(name):
    preset = get_preset(name)
    unet_cfg, vae_cfg = preset.diffusion.unet, preset.diffusion.vae
    assert unet_cfg["in_channels"] == vae_cfg["latent_channels"] + 2 * preset.codebook.dim
    assert D.map_channels(preset) == 2 * preset.codebook.dim
    # the pipeline's own check: addition_time_embed_dim * 6 + pooled width == add_embedding input
    assert unet_cfg["projection_class_embeddings_input_dim"] == \
        6 * unet_cfg["addition_time_embed_dim"] + D.pooled_dim(preset)
    broken = dataclasses.replace(preset, diffusion=dataclasses.replace(
        preset.diffusion, unet=dict(unet_cfg, in_channels=unet_cfg["in_channels"] - 1)))
    with pytest.raises(ValueError, match="in_channels"):
        D.check_config(broken)


@pytest.mark.parametrize("name", ["3b", "7b"])
def test_official_preset_builds_on_meta(name):
    preset = get_preset(name)
    unet, vae = D.build_diffusion(preset, device="meta")
    assert next(unet.parameters()).device.type == "meta"
    assert unet.conv_in.in_channels == 68 == 4 + D.map_channels(preset)
    assert unet.conv_out.out_channels == 4
    assert unet.add_embedding.linear_1.in_features == 6 * 256 + 1280  # pipe:400-408 with 1280 pooled
    assert D.pooled_dim(preset) == 1280 and unet.config.cross_attention_dim == 2048
    assert 2.5e9 < D.param_count(unet) < 2.6e9  # SDXL-sized
    assert D.vae_scale_factor(preset) == 8 and vae.config.scaling_factor == pytest.approx(0.13025)
    # latent / map grids of every output size are whole and in the engine profile
    component = D.unet_component(preset, unet)
    prof = component.profiles()
    for w, h in DIFFUSION_SIZES:
        assert h % 32 == 0 and w % 32 == 0
        assert prof["map_h"][0] <= h // 32 <= prof["map_h"][2] and prof["lat_w"][0] <= w // 8 <= prof["lat_w"][2]
    if name == "3b":  # folding on the real structure: every cross-attention replaced, q/k/v gone
        module = component.build_module()
        folded = [p for p in module.unet.attn_processors.values() if isinstance(p, D.ZeroTextCrossAttnProcessor)]
        assert len(folded) == 70  # SDXL: 4 + 20 (down) + 10 (mid) + 30 + 6 (up) transformer blocks
        assert not any(".attn2.to_" in n and ".to_out" not in n for n, _ in module.named_parameters())
        assert any(".attn2.to_k" in n for n, _ in unet.named_parameters())  # the reference keeps its own


def test_resolution_index_follows_the_output_size():
    assert image_grid(512, 512).diffusion_resolution_index == DIFFUSION_SIZES.index((1024, 1024)) == 0
    assert image_grid(256, 256).diffusion_resolution_index == DIFFUSION_SIZES.index((512, 512)) == 11


# -- tiny preset: reference, folding, export -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    preset = get_preset("tiny")
    unet, vae = D.build_diffusion(preset)
    return preset, unet, vae


def _torch_args(arrays):
    return [torch.from_numpy(arrays[k]) for k in ("latent", "timestep", "token_map", "resolution_index")]


def test_build_is_deterministic(tiny):
    preset, unet, _ = tiny
    again, _ = D.build_diffusion(preset)
    for (name, a), (_, b) in zip(unet.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    other, _ = D.build_diffusion(dataclasses.replace(preset, seed=preset.seed + 1))
    assert not torch.equal(other.conv_in.weight, unet.conv_in.weight)
    assert unet.conv_in.in_channels == 4 + D.map_channels(preset)


def test_folded_unet_matches_official_call(tiny):
    """Export form (zero text folded, map upsampled inside) == the UNet called as the pipeline calls it."""
    preset, unet, _ = tiny
    component = D.unet_component(preset, unet)
    module = component.build_module()
    # the reference's cross-attentions must be untouched by building the export form
    assert not any(isinstance(p, D.ZeroTextCrossAttnProcessor) for p in unet.attn_processors.values())

    # give one cross-attention biased keys and values, so its zero-text output is not just to_out's bias
    block = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = unet.get_submodule(block)
    saved = attn.to_k, attn.to_v
    gen = torch.Generator().manual_seed(1)
    try:
        for proj in ("to_k", "to_v"):
            old = getattr(attn, proj)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                new.weight.copy_(torch.randn(new.weight.shape, generator=gen) * 0.1)
                new.bias.copy_(torch.randn(new.bias.shape, generator=gen))
            setattr(attn, proj, new)
        module = component.build_module()
        arrays = component.make_inputs(component.sample_dims(1), np.random.default_rng(5))
        with torch.no_grad():
            got = module(*_torch_args(arrays))[0]
            want = D.unet_reference_call(preset, unet, *_torch_args(arrays))
            # same thing with the map already nearest-upsampled by repetition: the graph's upsample is x4 repeat
            rep = np.repeat(np.repeat(arrays["token_map"], 4, axis=2), 4, axis=3)
            args = _torch_args(arrays)
            args[2] = torch.from_numpy(rep)
            want_rep = D.unet_reference_call(preset, unet, *args)
            # and the resolution index matters
            args = _torch_args(arrays)
            args[3] = (args[3] + 1) % len(DIFFUSION_SIZES)
            other_index = module(*args)[0]
    finally:
        attn.to_k, attn.to_v = saved
    scale = want.abs().max().item()
    assert scale > 1e-3
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert (got - want_rep).abs().max().item() <= 1e-5 * scale
    assert (other_index - got).abs().max().item() > 1e-4 * scale


@pytest.fixture(scope="module")
def exported(tiny, tiny_bundle):
    """The UNet and VAE decoder graphs as the session's tiny export wrote them (conftest.py tiny_bundle: export_onnx
    of these components on these modules' weights, the preset's seed), with their verification reports; not
    exported again here."""
    from conftest import export_report

    preset, unet, vae = tiny
    reports = {}
    for component in (D.unet_component(preset, unet), D.vae_decoder_component(preset, vae)):
        reports[component.name] = (*export_report(tiny_bundle, component.name), component)
    return reports


def test_export_unet_and_vae_decoder(exported):
    import onnx

    for name, (report, path, component) in exported.items():
        assert report["ok"], report
        assert len(report["cases"]) == 2
        assert report["cases"][0]["dims"] != report["cases"][1]["dims"]  # two sizes per dynamic dim
        assert all(v[0] >= 2 for v in component.dims.values())  # the exporter fixes dims sampled at 0/1
        model = onnx.load(str(path))
        inputs = [i.name for i in model.graph.input]
        assert inputs == component.input_names()
        assert "encoder_hidden_states" not in inputs
        for value in model.graph.input:
            spec = next(t for t in component.inputs if t.name == value.name)
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == list(spec.shape)
    unet_names = exported["diffusion_unet"][2].input_names()
    assert unet_names == ["latent", "timestep", "token_map", "resolution_index"]
    assert exported["vae_decoder"][2].output_names() == ["image"]


def test_numpy_loop_on_onnx_matches_reference_loop(tiny, exported):
    """The runtime's loop (numpy scheduler + onnxruntime graphs) == the official loop order in torch/diffusers."""
    import onnxruntime as ort

    preset, unet, vae = tiny
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    unet_sess = ort.InferenceSession(str(exported["diffusion_unet"][1]), opts, providers=["CPUExecutionProvider"])
    vae_sess = ort.InferenceSession(str(exported["vae_decoder"][1]), opts, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(11)
    steps, guidance, index = 4, 2.0, 3
    token_map = rng.standard_normal((1, D.map_channels(preset), 2, 3)).astype(np.float32)
    noise = rng.standard_normal((1, 4, 8, 12)).astype(np.float32)

    want_latent, want_image = D.reference_refine(preset, unet, vae, D.build_scheduler(preset),
                                                 torch.from_numpy(token_map), index, torch.from_numpy(noise),
                                                 num_steps=steps, guidance_scale=guidance)

    sched = make_scheduler(preset.diffusion.scheduler)
    sched.set_timesteps(steps)
    x = noise * np.float32(sched.init_noise_sigma)
    map_in = np.concatenate([np.zeros_like(token_map), token_map])  # [uncond, cond]
    for t in sched.timesteps:
        x_in = sched.scale_model_input(np.concatenate([x, x]), t)
        eps = unet_sess.run(None, {"latent": x_in, "timestep": np.full(2, t, np.float32), "token_map": map_in,
                                   "resolution_index": np.full(2, index, np.int64)})[0]
        eps_u, eps_c = np.split(eps, 2)
        x = sched.step(eps_u + np.float32(guidance) * (eps_c - eps_u), t, x)
    image = vae_sess.run(None, {"latent": x})[0]

    assert image.shape == (1, 3, 64, 96)
    lat_ref, img_ref = want_latent.numpy(), want_image.numpy()
    assert np.abs(x - lat_ref).max() <= 1e-4 * max(1.0, np.abs(lat_ref).max())
    assert np.abs(image - img_ref).max() <= 1e-4 * max(1.0, np.abs(img_ref).max())
