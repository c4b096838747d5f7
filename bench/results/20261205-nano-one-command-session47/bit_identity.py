"""Bit-identity of session 47's timed run (the side chain started with the command) against session 46's run (the
side chain started after `pixel`): every exported file's hash, and every stage state tensor by tensor. The paths are
the sessions' own folders (RUN: the clone the command ran in; RUN46: session 46's); prints bit_identity.json."""
import hashlib
import json
import sys
from pathlib import Path

import torch

RUN = Path("/tmp/s47/run/nano")
RUN46 = Path("/tmp/s46/run/nano")
STAGES = ["semantic", "pixel", "tokens", "mllm", "focus", "edit", "polish", "vae", "decoder"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return True  # numbers and strings (losses, timings) are not weights


def main():
    out = {"files": {}, "states": {}}
    for new in sorted(p for p in (RUN / "weights").rglob("*") if p.is_file()):
        rel = new.relative_to(RUN / "weights")
        old = RUN46 / "weights" / rel
        if rel.suffix in (".json",) and rel.name in ("training.json", "eval.json", "quantized_eval.json"):
            continue  # timings, or the committed weights' measurements the run does not write
        out["files"][str(rel)] = {"this_run": sha(new), "session46_run": sha(old) if old.is_file() else None}
        if rel.suffix == ".bin":  # a torch.save archive: its tensors too, in case only the container differs
            out["files"][str(rel)]["tensors_equal_session46_run"] = tensors_equal(
                torch.load(new, weights_only=True), torch.load(old, weights_only=True))
    for stage in STAGES:
        x = torch.load(RUN / "work" / f"{stage}.pt", weights_only=True)
        y = torch.load(RUN46 / "work" / f"{stage}.pt", weights_only=True)
        out["states"][stage] = {"tensors_equal_session46_run": tensors_equal(x, y)}
    out["all_equal"] = (all(v["this_run"] == v["session46_run"] or v.get("tensors_equal_session46_run")
                            for v in out["files"].values())
                        and all(v["tensors_equal_session46_run"] for v in out["states"].values()))
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
