"""Seconds per training step of illume-nano's MLLM stages with the padding mask they were trained with before and
with the causal mask only (nano/train.py ``attention_mask_for``: right-padded batches give the LLM no mask).

    python -m illume_rt.bench.nano_causal --work W [--stages focus edit] [--steps 12] [--rounds 3] -o DIR

``W`` is a nano.train work folder holding the states the stages start from (``tokens.pt``; ``mllm.pt`` for
``focus``, ``focus.pt`` for ``edit``). Each arm is a process of its own (bench/nano_threads.py ``run_arm``: the stage
trained for ``--steps`` steps from that state in a scratch folder, the first two steps not timed) on the threads
nano.train gives the stage (``stage_threads``: ``edit`` on two), the arms interleaved per round, so that drift on a
shared machine hits them alike. Also recorded: each arm's losses at every step, which must agree to float rounding
(the two masks compute the same function at every labelled position), and whether two rounds of an arm end on
bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ARMS = (("padding mask (before)", True), ("causal only (nano.train)", False))


def run_arm(work: Path, stage: str, steps: int, keep_padding_mask: bool, scratch: Path) -> dict:
    import torch

    from illume_rt.bench.nano_threads import run_arm as run_timed
    from illume_rt.nano import train

    if keep_padding_mask:
        train.attention_mask_for = lambda mask: mask
    losses: list[float] = []
    lm_loss = train.lm_loss

    def recorded(*args, **kwargs):
        loss = lm_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss

    train.lm_loss = recorded
    row = run_timed(work, stage, steps, train.stage_threads(stage, 1), scratch)
    weights = torch.load(scratch / f"{stage}.pt", weights_only=True)["modules"]["llm"]
    torch.save(weights, scratch / "llm.pt")
    return {**row, "threads": torch.get_num_threads(), "losses": losses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a nano.train work folder: the stages' start states")
    ap.add_argument("--stages", nargs="+", default=["focus", "edit"], choices=["focus", "edit", "polish"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # "STAGE:0|1", one arm in its own process
    args = ap.parse_args(argv)
    if args.arm is not None:
        stage, keep = args.arm.split(":")
        print("ARM " + json.dumps(run_arm(args.work, stage, args.steps, keep == "1", args.output)), flush=True)
        return 0
    from illume_rt.bench.nano_threads import check_arguments

    check_arguments("nano_causal", args.work, args.stages, args.steps, args.output)
    import torch

    from illume_rt.bench.measure import machine, versions

    rows, last = [], {}
    # as nano.train runs: threads set in the process, passive waiting
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="nano-causal-") as tmp:
        for r in range(args.rounds):
            for stage in args.stages:
                for name, keep in ARMS:
                    scratch = Path(tmp) / f"r{r}-{len(rows)}"
                    out = subprocess.run([sys.executable, "-m", "illume_rt.bench.nano_causal", "--arm",
                                          f"{stage}:{int(keep)}", "--work", str(args.work), "--steps",
                                          str(args.steps), "-o", str(scratch)],
                                         env=env, capture_output=True, text=True)
                    result = [line for line in out.stdout.splitlines() if line.startswith("ARM ")]
                    if out.returncode != 0 or not result:
                        raise SystemExit(f"nano_causal: the arm '{stage}, {name}' failed:\n"
                                         f"{(out.stdout + out.stderr)[-2000:]}")
                    arm = json.loads(result[-1][4:])
                    weights = torch.load(scratch / "llm.pt", weights_only=True)
                    row = {"round": r, "stage": stage, "arm": name, "threads": arm["threads"],
                           "s_per_step": round(arm["s_per_step"], 4), "losses": arm["losses"]}
                    if (stage, name) in last:
                        row["bit_identical_to_previous_round"] = all(torch.equal(last[stage, name][k], v)
                                                                     for k, v in weights.items())
                    last[stage, name] = weights
                    rows.append(row)
                    print({k: v for k, v in row.items() if k != "losses"}, flush=True)

    def median(stage: str, arm: str) -> float:
        values = sorted(r["s_per_step"] for r in rows if r["stage"] == stage and r["arm"] == arm)
        return values[len(values) // 2]

    summary = {}
    for stage in args.stages:
        before, after = (median(stage, name) for name, _ in ARMS)
        first = [next(r for r in rows if r["stage"] == stage and r["arm"] == name)["losses"] for name, _ in ARMS]
        summary[stage] = {
            "median_s_per_step": {name: median(stage, name) for name, _ in ARMS},
            "speed_ratio": round(before / after, 3),
            "largest_loss_difference": max(abs(a - b) for a, b in zip(*first)),
            "largest_weight_difference": max(float((last[stage, ARMS[0][0]][k] - v).abs().max())
                                             for k, v in last[stage, ARMS[1][0]].items())}
    given = sys.argv[1:] if argv is None else argv
    results = {"command": "python -m illume_rt.bench.nano_causal " + " ".join(map(shlex.quote, given)),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "versions": versions(), "steps": args.steps, "rows": rows, "summary": summary}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# nano MLLM steps: the padding mask vs the causal mask only", "",
             f"Command: `{results['command']}`  ", f"Created: {results['created']}  ",
             f"Machine: {results['machine']}  ", f"Versions: {results['versions']}", "",
             "| round | stage | arm | threads | s per step | bit-identical to the previous round |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['stage']} | {r['arm']} | {r['threads']} | {r['s_per_step']} | "
              f"{r.get('bit_identical_to_previous_round', '-')} |" for r in rows]
    lines.append("")
    for stage, s in summary.items():
        lines.append(f"- `{stage}`: median {s['median_s_per_step'][ARMS[0][0]]} s per step with the padding mask, "
                     f"{s['median_s_per_step'][ARMS[1][0]]} s causal only: {s['speed_ratio']:.2f}x the speed. "
                     f"Losses (each term of {args.steps} steps) differ by at most "
                     f"{s['largest_loss_difference']:.1e}, the weights after them by at most "
                     f"{s['largest_weight_difference']:.1e}.")
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(summary):]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
