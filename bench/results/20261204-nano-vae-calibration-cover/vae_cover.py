"""The nano calibration plan's VAE-only refinements (datasets.nano_plan ``vae_only_refine``): how long they take
and the peak |latent| each hands the VAE decoder. ``python vae_cover.py BUNDLE`` (the FP32 nano bundle)."""

import sys
import time
from dataclasses import replace

import numpy as np

from illume_rt.calibration import datasets
from illume_rt.runtime.pipeline import Pipeline


def main() -> None:
    pipe = Pipeline.from_bundle(sys.argv[1], "ort-cpu", 1)
    plan = datasets.plan_for(pipe.bundle.manifest["model"], "calibration")
    only = replace(plan, generate=[], understand=[], refine=[])
    t0, c0 = time.time(), time.process_time()
    feeds, _ = datasets.capture(pipe, only, log=print)
    print(f"{len(only.vae_only_refine)} refinements in {time.time() - t0:.1f}s wall "
          f"{time.process_time() - c0:.1f}s cpu", flush=True)
    for (prompt, _, seed), feed in zip(only.vae_only_refine, feeds["vae_decoder"]):
        (latent,) = feed.values()
        print(f"{float(np.abs(latent).max()):6.2f}  {prompt} (seed {seed})")
    print("feeds", {k: len(v) for k, v in feeds.items()})


if __name__ == "__main__":
    main()
