"""Numerical parity of the MoVQ pixel encoder and decoder with the official modules of ILLUME_plus.

Not a pytest test: it needs a checkout of https://github.com/illume-unified-mllm/ILLUME_plus and einops, which CI
cannot fetch (package registries only). Run it by hand after changing export/networks/dualvitok.py:

    pip install einops
    python tests/manual/official_movq_parity.py --ref PATH/TO/ILLUME_plus

It loads ``vision_tokenizer/tokenizer/movqgan/{configuration,modeling}_movqgan.py`` from the checkout, copies the
random weights of illume-rt's DualViTok pixel branch into the official MoVQEncoder / MoVQDecoder (strict state-dict
load: every name and shape must match), and compares outputs with and without the DC up/down blocks. Exit 0 when
both match within 1e-4 (float32 summed in another order).

Last run: 2026-11-29, ILLUME_plus at its newest stored snapshot, torch 2.13.0 CPU: both cases pass; the
decoder's largest difference is 2.7e-6 (DC blocks) and 1.4e-5 (plain) of its output's range. At the old
tolerance of 1e-5 absolute, the plain case missed (2.5e-5): the test that held it had never run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch


def official_movqgan(ref: Path):
    base = ref / "vision_tokenizer" / "tokenizer" / "movqgan"
    if not (base / "modeling_movqgan.py").exists():
        sys.exit(f"official ILLUME_plus checkout not found: {base} has no modeling_movqgan.py (pass --ref)")
    pkg = types.ModuleType("_official_movqgan")
    pkg.__path__ = [str(base)]
    sys.modules.setdefault(pkg.__name__, pkg)
    mods = {}
    for name in ("configuration_movqgan", "modeling_movqgan"):
        spec = importlib.util.spec_from_file_location(f"{pkg.__name__}.{name}", base / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods["configuration_movqgan"], mods["modeling_movqgan"]


# float32, summed in another order: SpatialNorm here applies its 1x1 convs on the code grid and broadcasts
# (commit a7f52bf), the official module on the upsampled map; same numbers up to rounding
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def check(ref: Path, dc: bool) -> float:
    from illume_rt.export.configs import CodebookConfig, MoVQConfig
    from illume_rt.export.networks import dualvitok as dvt

    cfgmod, off = official_movqgan(ref)
    enc = MoVQConfig(ch=32, z_channels=8, embed_dim=8, use_dc_up_down_blocks=dc)  # GroupNorm(32) as official
    dec = MoVQConfig(ch=64, z_channels=16, embed_dim=16, use_dc_up_down_blocks=dc)
    mine = dvt.init_random_weights_(dvt.DualViTokPixel(enc, dec, CodebookConfig(8, 16, 16)), 0).eval()

    def official(c):
        return cfgmod.MoVQConfig(ch=c.ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks,
                                 attn_resolutions=list(c.attn_resolutions), z_channels=c.z_channels,
                                 embed_dim=c.embed_dim, double_z=False, dropout=0.0, use_dc_up_down_blocks=dc)

    oenc, odec = off.MoVQEncoder(official(enc)).eval(), off.MoVQDecoder(official(dec)).eval()
    sd = mine.state_dict()
    oenc.load_state_dict({k[len("pixel_encoder."):]: v for k, v in sd.items() if k.startswith("pixel_encoder.")},
                         strict=True)
    odec.load_state_dict({k[len("pixel_decoder."):]: v for k, v in sd.items() if k.startswith("pixel_decoder.")},
                         strict=True)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 48, 80, generator=g) * 2 - 1
    sem = torch.randn(2, 8, 2, 3, generator=g) * 0.2
    with torch.no_grad():
        torch.testing.assert_close(mine.pixel_encoder(image), oenc(image), **TOLERANCE)
        pix = mine.pixel_quant_conv(mine.pixel_encoder(image))
        quant = torch.cat([torch.nn.functional.interpolate(sem, pix.shape[-2:], mode="bicubic"), pix], 1)
        got, want = mine.decode(sem, pix), odec(mine.pixel_post_quant_conv(quant), quant)
        torch.testing.assert_close(got, want, **TOLERANCE)
    return float((got - want).abs().max() / want.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="ILLUME_plus checkout")
    args = parser.parse_args()
    for dc in (True, False):
        error = check(args.ref, dc)
        print(f"MoVQ encoder and decoder match the official modules (DC up/down blocks: {dc}; decoder max error "
              f"{error:.1e} of its output's range)")


if __name__ == "__main__":
    main()
