"""The diffusion decoder's VAE alone, per draw: each held-out scene rendered at 2x (the refinement target), encoded
(posterior mean) and decoded; PSNR against the render, the worst scenes, and the mean colour of the object in them.

    python vae_roundtrip.py SOURCE... [--json OUT]

SOURCE: a nano weights folder (its dualvitok_sdxl_decoder/vae), a training work folder's vae.pt, or the
vae_snaps.pt the probe (train_probe.diff) writes beside it: each raw snapshot and EMA state in it is scored. The
refined picture is decoded by this VAE, so its round trip bounds what refinement can score (see NOTES.md)."""

import argparse
import json
from pathlib import Path


def load_vaes(source: Path) -> dict:
    """{label: VAE in eval mode} of one SOURCE."""
    import torch

    from illume_rt.export.networks.diffusion import build_diffusion
    from illume_rt.nano import train

    if source.is_dir():
        from diffusers import AutoencoderKL

        return {str(source): AutoencoderKL.from_pretrained(source / "dualvitok_sdxl_decoder" / "vae").eval()}
    state = torch.load(source, weights_only=True)
    if "modules" in state:
        states = {str(source): state["modules"]["vae"]}
    else:  # the probe's vae_snaps.pt
        states = {**{f"{source} raw after step {step}": s for step, s in sorted(state["snaps"].items())},
                  **{f"{source} EMA {decay}": s["vae"] for decay, s in state["ema"].items()}}
    vaes = {}
    for label, weights in states.items():
        _, vaes[label] = build_diffusion(train.nano_preset())
        vaes[label].load_state_dict(weights)
        vaes[label].eval()
    return vaes


def roundtrip(label: str, vae, worst: int = 5) -> dict:
    import numpy as np
    import torch

    from illume_rt.nano import data, decoder

    rows = []
    with torch.no_grad():
        for scene in data.split()[1]:
            truth = data.render(scene, size=decoder.OUTPUT_SIZE)
            latent = vae.encode(torch.from_numpy(data.to_model_input(truth))).latent_dist.mode()
            out = vae.decode(latent).sample[0].permute(1, 2, 0).numpy()
            picture = ((out + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            shape = (truth != truth[0, 0]).any(-1)  # the object's pixels: the corner is background
            rows.append({"psnr_db": round(decoder.psnr(picture, truth), 2), "caption": scene.caption,
                         "object_rgb": truth[shape].mean(0).round().tolist(),
                         "object_rgb_decoded": picture[shape].mean(0).round().tolist()})
    psnrs = [r["psnr_db"] for r in rows]
    return {"source": label, "scenes": len(rows), "mean_psnr_db": round(float(np.mean(psnrs)), 2),
            "min_psnr_db": min(psnrs), "worst": sorted(rows, key=lambda r: r["psnr_db"])[:worst]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results = []
    for source in args.sources:
        for label, vae in load_vaes(source).items():
            results.append(roundtrip(label, vae))
            r = results[-1]
            print(f"{label}: {r['mean_psnr_db']} dB (min {r['min_psnr_db']}); worst: "
                  + "; ".join(f"{w['psnr_db']} {w['caption']} {w['object_rgb']}->{w['object_rgb_decoded']}"
                              for w in r["worst"][:3]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
