"""Bit-identity of session 46's timed run against session 40's run (MLLM chain, tokenizer) and the committed weights
(VAE): file hashes of the exported weights, and the work folders' stage states tensor by tensor. The paths are the
session's own folders (RUN: the clone the command ran in; RUN40 / W40: session 40's run); prints bit_identity.json."""
import hashlib
import json
import sys

from pathlib import Path
import torch

RUN = Path("/tmp/s46/run/nano")
RUN40 = Path("/tmp/s40/clone/nano")
W40 = Path("/tmp/s40/weights_run40")
COMMITTED = Path("/work/main/nano/weights")

def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]

def tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    return True



def main():
    out = {"files": {}, "states": {}}
    for rel in ["mllm/model.safetensors", "mllm/config.json", "mllm/tokenizer.json", "mllm/illume_rt_sampling.json",
                "dualvitok_sdxl_decoder/vae/diffusion_pytorch_model.safetensors",
                "dualvitok_sdxl_decoder/unet/diffusion_pytorch_model.safetensors",
                "dualvitok_sdxl_decoder/illume_rt_refine.json"]:
        new = RUN / "weights" / rel
        out["files"][rel] = {"this_run": sha(new), "session40_run": sha(W40 / rel) if (W40 / rel).is_file() else None,
                             "committed": sha(COMMITTED / rel)}
    a = torch.load(RUN / "weights/dualvitok/pytorch_model.bin", weights_only=True)
    b = torch.load(W40 / "dualvitok/pytorch_model.bin", weights_only=True)
    out["files"]["dualvitok/pytorch_model.bin"] = {"tensors_equal_session40_run": tensors_equal(a, b)}
    for stage in ["semantic", "pixel", "mllm", "focus", "edit", "polish", "vae", "decoder"]:
        x = torch.load(RUN / "work" / f"{stage}.pt", weights_only=True)["modules"]
        y = torch.load(RUN40 / "work" / f"{stage}.pt", weights_only=True)["modules"]
        out["states"][stage] = {"tensors_equal_session40_run": tensors_equal(x, y)}
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
