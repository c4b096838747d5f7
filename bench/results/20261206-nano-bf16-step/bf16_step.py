"""Session 49: seconds per `focus` step of nano's training in FP32 (the recipe) and under CPU autocast to BF16, on
one thread, from a work folder's `mllm.pt` and `tokens.pt`. The nano README had "bf16 training there is not
measured" for the AMD EPYC machine whose flags show avx512_bf16.

    python bf16_step.py WORK OUT.json [--steps 12] [--rounds 3]

Each arm is a process of its own (bench/nano_threads.py ``run_arm``: the first two steps not timed), the arms
interleaved per round so that drift on a shared machine hits both alike. The BF16 arm wraps the LLM's loss
(``train.lm_loss``: forward, logits and cross-entropy) in ``torch.autocast("cpu", dtype=torch.bfloat16)``; the
backward pass follows the forward's dtypes. Also recorded: the loss of the arm's first step, to show the arms
compute the same step (to BF16's rounding).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def arm(work: Path, steps: int, bf16: bool) -> dict:
    import torch

    from illume_rt.bench.nano_threads import run_arm
    from illume_rt.nano import train

    first_loss = []
    plain = train.lm_loss

    def lm_loss(*args, **kwargs):
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = plain(*args, **kwargs)
        else:
            loss = plain(*args, **kwargs)
        if len(first_loss) < 2:  # the first step's text-to-image and understanding losses
            first_loss.append(round(float(loss), 5))
        return loss

    train.lm_loss = lm_loss
    with tempfile.TemporaryDirectory() as tmp:
        timing = run_arm(work, "focus", steps, 1, Path(tmp) / "scratch")
    return {**timing, "first_step_losses": first_loss, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arm", choices=("fp32", "bf16"))
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.work, args.steps, args.arm == "bf16")))
        return
    results = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in results:
            run = subprocess.run([sys.executable, __file__, str(args.work), str(args.out), "--steps",
                                  str(args.steps), "--arm", name], capture_output=True, text=True, check=True)
            results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    med = {k: sorted(r["s_per_step"] for r in v)[len(v) // 2] for k, v in results.items()}
    summary = {"s_per_step_median": med, "bf16_speedup": round(med["fp32"] / med["bf16"], 3), "arms": results,
               "command": " ".join(sys.argv)}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("s_per_step_median", "bf16_speedup")}))


if __name__ == "__main__":
    main()
