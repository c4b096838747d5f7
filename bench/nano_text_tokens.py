"""Seconds per training step of illume-nano's MLLM stages with the text as bytes (one id per UTF-8 byte, the
vocabulary nano had before) and as nano's byte-level BPE (nano/text_tokenizer.py: one id per word of its prompts).

    python -m illume_rt.bench.nano_text_tokens --work W [--stages mllm edit] [--steps 12] [--rounds 3] -o DIR

``W`` is a nano.train work folder holding ``tokens.pt`` (the image codes and features, which do not depend on the
text vocabulary). Each arm is a process of its own (bench/nano_threads.py ``run_arm``) that trains the stage for
``--steps`` steps in a scratch folder, the first two steps not timed, on the threads nano.train gives the stage
(``stage_threads``), from a fresh init of its vocabulary's size (``edit`` starts from that init saved as
``focus.pt``: a step's cost does not depend on the weights). The arms are interleaved per round, so that drift on a
shared machine hits them alike. Also recorded: the ids of one text-to-image example, one understanding chat and one
edit in each vocabulary.
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

ARMS = ("bytes", "nano BPE")


def use_vocabulary(arm: str) -> None:
    """Make this process's nano preset and training tokenizer those of ``arm``."""
    from illume_rt.export import configs
    from illume_rt.nano import train
    from illume_rt.runtime.tokenizer import ByteTokenizer

    if arm == "bytes":
        configs.NANO_TEXT_VOCAB_SIZE = 256
        train.nano_tokenizer = lambda preset: ByteTokenizer(preset.vocab)


def example_lengths() -> dict[str, int]:
    """Ids of one example of each kind in this process's vocabulary (what the step's cost follows)."""
    import numpy as np
    import torch

    from illume_rt.nano import data, train

    preset = train.nano_preset()
    tok = train.nano_tokenizer(preset)
    scene = data.all_scenes()[0]
    sem, pix = torch.zeros(9, 9, dtype=torch.long), torch.zeros(16, 16, dtype=torch.long)
    instruction = data.edits(scene)[0][0]
    return {"text_to_image": len(train.t2i_example(preset, tok, scene, sem, pix, scene.caption)[0]),
            "understanding": len(train.und_example(preset, tok, scene, np.random.default_rng(0))[0]),
            "edit": len(train.edit_example(preset, tok, instruction, sem, pix)[0])}


def run_arm(work: Path, stage: str, steps: int, arm: str, scratch: Path) -> dict:
    import torch

    from illume_rt.bench.nano_threads import run_arm as run_timed
    from illume_rt.nano import train

    use_vocabulary(arm)
    start = scratch.parent / (scratch.name + "-start")
    start.mkdir(parents=True)
    (start / "tokens.pt").symlink_to((work / "tokens.pt").resolve())
    for name in train.BUILT_ON[stage]:
        if name != "tokens":  # a fresh init of this vocabulary's size, as the finished stage's state
            llm, proj = train.build_mllm(train.nano_preset())
            torch.save({"modules": {"llm": llm.state_dict(), "projectors": proj.state_dict()}}, start / f"{name}.pt")
    row = run_timed(start, stage, steps, train.stage_threads(stage, 1), scratch)
    return {**row, "threads": torch.get_num_threads(), "text_vocab_size": train.nano_preset().vocab.text_vocab_size,
            "example_ids": example_lengths()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a nano.train work folder holding tokens.pt")
    ap.add_argument("--stages", nargs="+", default=["mllm", "edit"], choices=["mllm", "edit"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # "STAGE:ARM", one arm in its own process
    args = ap.parse_args(argv)
    if args.arm is not None:
        stage, arm = args.arm.split(":", 1)
        print("ARM " + json.dumps(run_arm(args.work, stage, args.steps, arm, args.output)), flush=True)
        return 0
    from illume_rt.bench.nano_threads import check_arguments

    check_arguments("nano_text_tokens", args.work, ["mllm"], args.steps, args.output)
    from illume_rt.bench.measure import machine, versions

    rows = []
    # as nano.train runs: threads set in the process, passive waiting
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="nano-text-tokens-") as tmp:
        for r in range(args.rounds):
            for stage in args.stages:
                for arm in ARMS:
                    scratch = Path(tmp) / f"r{r}-{len(rows)}"
                    out = subprocess.run([sys.executable, "-m", "illume_rt.bench.nano_text_tokens", "--arm",
                                          f"{stage}:{arm}", "--work", str(args.work), "--steps", str(args.steps),
                                          "-o", str(scratch)], env=env, capture_output=True, text=True)
                    result = [line for line in out.stdout.splitlines() if line.startswith("ARM ")]
                    if out.returncode != 0 or not result:
                        raise SystemExit(f"nano_text_tokens: the arm '{stage}, {arm}' failed:\n"
                                         f"{(out.stdout + out.stderr)[-2000:]}")
                    row = {"round": r, "stage": stage, "arm": arm, **json.loads(result[-1][4:])}
                    row["s_per_step"] = round(row["s_per_step"], 4)
                    rows.append(row)
                    print(row, flush=True)

    def median(stage: str, arm: str) -> float:
        values = sorted(r["s_per_step"] for r in rows if r["stage"] == stage and r["arm"] == arm)
        return values[len(values) // 2]

    summary = {stage: {"median_s_per_step": {arm: median(stage, arm) for arm in ARMS},
                       "speed_ratio": round(median(stage, ARMS[0]) / median(stage, ARMS[1]), 3)}
               for stage in args.stages}
    lengths = {arm: next(r for r in rows if r["arm"] == arm)["example_ids"] for arm in ARMS}
    given = sys.argv[1:] if argv is None else argv
    results = {"command": "python -m illume_rt.bench.nano_text_tokens " + " ".join(map(shlex.quote, given)),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "versions": versions(), "steps": args.steps, "example_ids": lengths, "rows": rows,
               "summary": summary}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# nano MLLM steps: text as bytes vs nano's BPE", "",
             f"Command: `{results['command']}`  ", f"Created: {results['created']}  ",
             f"Machine: {results['machine']}  ", f"Versions: {results['versions']}", "",
             "| ids of one example | " + " | ".join(ARMS) + " |", "|---|---|---|"]
    lines += [f"| {kind} | " + " | ".join(str(lengths[arm][kind]) for arm in ARMS) + " |"
              for kind in lengths[ARMS[0]]]
    lines += ["", "| round | stage | arm | threads | s per step |", "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['stage']} | {r['arm']} | {r['threads']} | {r['s_per_step']} |" for r in rows]
    lines.append("")
    for stage, s in summary.items():
        lines.append(f"- `{stage}`: median {s['median_s_per_step'][ARMS[0]]} s per step with bytes, "
                     f"{s['median_s_per_step'][ARMS[1]]} s with nano's BPE: {s['speed_ratio']:.2f}x the speed.")
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(summary):]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
