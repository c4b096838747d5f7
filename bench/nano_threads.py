"""Seconds per training step of an illume-nano MLLM stage on 1 and on 2 threads (nano/train.py TWO_THREAD_STAGES).

    python -m illume_rt.bench.nano_threads --work W [--stage edit] [--steps 25] [--rounds 2] -o bench/results/DIR

``W`` is a nano.train work folder holding the states the stage starts from (``tokens.pt`` and, for ``edit``,
``focus.pt``). Each arm trains the stage for ``--steps`` steps from that state in a scratch copy of the folder (the
learning-rate schedule shortened to match; the cost of a step does not depend on it), the arms interleaved per
round, so drift on a shared machine hits both alike. A step's time is taken from the start of one step to the
start of the next (forward, backward, optimizer, the periodic checkpoint), the first two steps left out. Also
recorded: whether two arms at one thread count end on bit-identical weights, and how far 1 and 2 threads end apart.
Run it on an otherwise idle machine: 2 threads on a busy core measure the contention, not the stage.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

STEP_CONSTANTS = {"edit": "EDIT_STEPS", "polish": "POLISH_STEPS", "focus": "FOCUS_STEPS"}


def time_stage(work: Path, stage: str, steps: int, threads: int, scratch: Path) -> dict:
    """Train ``stage`` for ``steps`` steps on ``threads`` threads from ``work``'s states, in ``scratch``."""
    import torch

    from illume_rt.nano import train

    scratch.mkdir(parents=True)
    for name in ("tokens", *train.BUILT_ON[stage]):
        shutil.copy(work / f"{name}.pt", scratch / f"{name}.pt")
    torch.set_num_threads(threads)
    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time) at each step's start
    loop, saved_steps = train._train_loop, getattr(train, STEP_CONSTANTS[stage])

    def timed_loop(st, modules, params, n, lr, step_fn, every=20):
        def timed_step(step, rng):
            stamps.append((time.perf_counter(), time.process_time()))
            return step_fn(step, rng)
        return loop(st, modules, params, n, lr, timed_step, every)

    train._train_loop = timed_loop
    setattr(train, STEP_CONSTANTS[stage], steps)
    try:
        getattr(train, f"stage_{stage}")(scratch)
    finally:
        train._train_loop = loop
        setattr(train, STEP_CONSTANTS[stage], saved_steps)
    weights = torch.load(scratch / f"{stage}.pt", weights_only=True)["modules"]["llm"]
    (wall0, cpu0), (wall1, cpu1) = stamps[2], stamps[-1]
    return {"threads": threads, "s_per_step": (wall1 - wall0) / (len(stamps) - 3),
            "cores_busy": (cpu1 - cpu0) / (wall1 - wall0), "weights": weights}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a nano.train work folder with the stage's start states")
    ap.add_argument("--stage", default="edit", choices=sorted(STEP_CONSTANTS))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    from illume_rt.nano import train

    missing = [f"{n}.pt" for n in ("tokens", *train.BUILT_ON[args.stage]) if not (args.work / f"{n}.pt").is_file()]
    if missing:
        raise SystemExit(f"nano_threads: {args.work} lacks {', '.join(missing)}; train the stages before "
                         f"{args.stage} there first (python -m illume_rt.nano.train --work {args.work})")
    if args.steps < 4:
        raise SystemExit("nano_threads: --steps must be at least 4 (the first two steps are not timed)")
    if args.output.exists() and any(args.output.iterdir()):
        raise SystemExit(f"nano_threads: {args.output} is not empty; name a new folder")
    import torch

    from illume_rt.bench.measure import machine, versions

    rows, last = [], {}
    with tempfile.TemporaryDirectory(prefix="nano-threads-") as tmp:
        for r in range(args.rounds):
            for threads in (1, 2):
                res = time_stage(args.work, args.stage, args.steps, threads, Path(tmp) / f"r{r}t{threads}")
                if threads in last:
                    res["repeats"] = all(torch.equal(last[threads][k], v) for k, v in res["weights"].items())
                last[threads] = res["weights"]
                rows.append({"round": r, "threads": threads, "s_per_step": round(res["s_per_step"], 4),
                             "cores_busy": round(res["cores_busy"], 2),
                             **({"bit_identical_to_previous_round": res["repeats"]} if "repeats" in res else {})})
                print(rows[-1], flush=True)
    diff = max(float((last[1][k] - last[2][k]).abs().max()) for k in last[1])
    one = sorted(r["s_per_step"] for r in rows if r["threads"] == 1)
    two = sorted(r["s_per_step"] for r in rows if r["threads"] == 2)
    given = sys.argv[1:] if argv is None else argv
    results = {"command": "python -m illume_rt.bench.nano_threads " + " ".join(map(shlex.quote, given)),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "versions": versions(), "stage": args.stage, "steps": args.steps, "rows": rows,
               "median_s_per_step": {"1": one[len(one) // 2], "2": two[len(two) // 2]},
               "speedup_2_threads": round(one[len(one) // 2] / two[len(two) // 2], 2),
               "max_abs_weight_difference_1_vs_2_threads": diff}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# nano `{args.stage}` on 1 and 2 threads", "", f"Command: `{results['command']}`  ",
             f"Created: {results['created']}  ", f"Machine: {results['machine']}  ", f"Versions: {results['versions']}",
             "", "| round | threads | s per step | cores busy (CPU s / wall s) | bit-identical to the previous round |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['threads']} | {r['s_per_step']:.3f} | {r['cores_busy']:.2f} | "
              f"{r.get('bit_identical_to_previous_round', '-')} |" for r in rows]
    lines += ["", f"2 threads: {results['speedup_2_threads']}x faster per step (medians). Largest weight difference "
              f"after {args.steps} steps, 1 vs 2 threads: {diff:.2e}."]
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
