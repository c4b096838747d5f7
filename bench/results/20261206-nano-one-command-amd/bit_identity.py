"""Session 48's timed run on the AMD EPYC machine against the committed weights: each exported file's hash, the
tokenizer's tensors, and each stage's final loss against the committed `training.json` (the committed weights have
no stage states to compare). The committed MLLM and tokenizer were trained on an AMD EPYC machine (sessions 31-32),
its VAE and diffusion UNet on the Intel Xeon (session 45). RUN: the clone the command ran in; prints JSON."""
import hashlib
import json
import sys
from pathlib import Path

RUN = Path("/tmp/s48/run/nano")
COMMITTED = Path("/work/main/nano/weights")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def tensors_equal(a, b) -> bool:
    import torch
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    return True  # numbers and strings are not weights


def main():
    import torch
    out = {"files": {}, "final_loss": {}}
    for new in sorted(p for p in (RUN / "weights").rglob("*") if p.is_file()):
        rel = new.relative_to(RUN / "weights")
        if rel.name in ("training.json", "eval.json", "quantized_eval.json"):
            continue  # timings, or measurements the command does not write
        old = COMMITTED / rel
        entry = {"this_run": sha(new), "committed": sha(old) if old.is_file() else None}
        if rel.suffix == ".bin":  # a torch.save archive: its tensors too, in case only the container differs
            entry["tensors_equal_committed"] = tensors_equal(torch.load(new, weights_only=True),
                                                             torch.load(old, weights_only=True))
        entry["equal"] = entry["this_run"] == entry["committed"] or bool(entry.get("tensors_equal_committed"))
        out["files"][str(rel)] = entry
    ours = json.loads((RUN / "weights" / "training.json").read_text())
    theirs = json.loads((COMMITTED / "training.json").read_text())
    for stage, rec in ours.items():
        if "final_loss" in rec:
            out["final_loss"][stage] = {"this_run": rec["final_loss"],
                                        "committed": theirs.get(stage, {}).get("final_loss")}
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
