"""Seconds per training step of an illume-nano MLLM stage on 1 and on 2 threads (nano/train.py TWO_THREAD_STAGES),
alone on the machine or beside other work.

    python -m illume_rt.bench.nano_threads --work W [--stage edit] [--steps 25] [--rounds 2] -o bench/results/DIR
    python -m illume_rt.bench.nano_threads --work W --busy --steps 12 --rounds 1 -o bench/results/DIR

``W`` is a nano.train work folder holding the states the stage starts from (``tokens.pt`` and, for ``edit``,
``focus.pt``). Each arm is a process of its own that trains the stage for ``--steps`` steps from that state in a
scratch copy of the folder (the learning-rate schedule shortened to match; the cost of a step does not depend on
it), the arms interleaved per round, so that drift on a shared machine hits them alike. A step's time runs from
the start of one step to the start of the next (forward, backward, optimizer, the periodic checkpoint), the first
two steps left out.

Arms: 1 thread; 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` (what nano.train sets); with ``--busy`` also 2 threads at
OpenMP's default waiting. ``--busy`` runs them as the training is meant to run, niced to 19 in the background, while
one process of other work (a pure-Python loop at normal priority, in the same session) holds a core.

Also recorded: whether two rounds of one arm end on bit-identical weights, and how far 1 and 2 threads end apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

STEP_CONSTANTS = {"mllm": "MLLM_STEPS", "focus": "FOCUS_STEPS", "edit": "EDIT_STEPS", "polish": "POLISH_STEPS"}
# (name, threads, OMP_WAIT_POLICY or None for OpenMP's default)
ARMS = (("1 thread", 1, "PASSIVE"), ("2 threads, passive waiting", 2, "PASSIVE"))
BUSY_ARMS = ARMS + (("2 threads, OpenMP's default waiting", 2, None),)


def run_arm(work: Path, stage: str, steps: int, threads: int, scratch: Path) -> dict:
    """In an arm's own process: train ``stage`` for ``steps`` steps on ``threads`` threads from ``work``'s states,
    in ``scratch``; the timings (the weights stay in ``scratch``)."""
    import torch

    from illume_rt.nano import train

    scratch.mkdir(parents=True)
    for name in ("tokens", *train.BUILT_ON[stage]):
        shutil.copy(work / f"{name}.pt", scratch / f"{name}.pt")
    torch.set_num_threads(threads)
    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time) at each step's start
    loop = train._train_loop

    def timed_loop(st, modules, params, n, lr, step_fn, every=20):
        def timed_step(step, rng):
            stamps.append((time.perf_counter(), time.process_time()))
            return step_fn(step, rng)
        return loop(st, modules, params, n, lr, timed_step, every)

    train._train_loop = timed_loop
    setattr(train, STEP_CONSTANTS[stage], steps)
    getattr(train, f"stage_{stage}")(scratch)
    (wall0, cpu0), (wall1, cpu1) = stamps[2], stamps[-1]
    return {"s_per_step": (wall1 - wall0) / (len(stamps) - 3), "cores_busy": (cpu1 - cpu0) / (wall1 - wall0)}


def check_arguments(prog: str, work: Path, stages: list[str], steps: int, output: Path) -> None:
    """One line naming the fix, before any arm runs: states missing from ``work``, too few steps to time, or an
    output folder that already holds something (a bench never writes over results)."""
    from illume_rt.nano import train

    for stage in stages:
        missing = [f"{n}.pt" for n in ("tokens", *train.BUILT_ON[stage]) if not (work / f"{n}.pt").is_file()]
        if missing:
            raise SystemExit(f"{prog}: {work} lacks {', '.join(missing)}; train the stages before {stage} there "
                             f"first (python -m illume_rt.nano.train --work {work})")
    if steps < 4:
        raise SystemExit(f"{prog}: --steps must be at least 4 (the first two steps are not timed)")
    if output.exists() and any(output.iterdir()):
        raise SystemExit(f"{prog}: {output} is not empty; name a new folder")


def start_arm(args, threads: int, policy: str | None, scratch: Path, busy: bool):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})  # threads are set in the arm, as nano.train does
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-m", "illume_rt.bench.nano_threads", "--arm", str(threads), "--work", str(args.work),
           "--stage", args.stage, "--steps", str(args.steps), "-o", str(scratch)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=(lambda: os.nice(19)) if busy else None)


def load_weights(scratch: Path, stage: str):
    import torch

    return torch.load(scratch / f"{stage}.pt", weights_only=True)["modules"]["llm"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a nano.train work folder with the stage's start states")
    ap.add_argument("--stage", default="edit", choices=sorted(STEP_CONSTANTS))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="beside one process of other work, the arms niced to 19")
    ap.add_argument("--arm-timeout", type=int, default=600,
                    help="seconds after which an arm is stopped and reported as not done (two threads can crawl)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--arm", type=int, default=None, help=argparse.SUPPRESS)  # one arm, in its own process
    args = ap.parse_args(argv)
    if args.arm is not None:
        print("ARM " + json.dumps(run_arm(args.work, args.stage, args.steps, args.arm, args.output)), flush=True)
        return 0
    check_arguments("nano_threads", args.work, [args.stage], args.steps, args.output)
    import torch

    from illume_rt.bench.measure import machine, versions

    arms = BUSY_ARMS if args.busy else ARMS
    rows, last = [], {}
    hog = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None)
    try:
        with tempfile.TemporaryDirectory(prefix="nano-threads-") as tmp:
            for r in range(args.rounds):
                for name, threads, policy in arms:
                    scratch = Path(tmp) / f"r{r}-{len(rows)}"
                    arm = start_arm(args, threads, policy, scratch, args.busy)
                    try:
                        out, _ = arm.communicate(timeout=args.arm_timeout)
                    except subprocess.TimeoutExpired:
                        arm.kill()
                        arm.communicate()
                        rows.append({"round": r, "arm": name, "threads": threads,
                                     "s_per_step": None, "note": f"not done after {args.arm_timeout} s"})
                        print(rows[-1], flush=True)
                        continue
                    result = [line for line in out.splitlines() if line.startswith("ARM ")]
                    if arm.returncode != 0 or not result:
                        raise SystemExit(f"nano_threads: the arm '{name}' failed:\n{out[-2000:]}")
                    row = {"round": r, "arm": name, "threads": threads, **json.loads(result[-1][4:])}
                    weights = load_weights(scratch, args.stage)
                    if name in last:
                        row["bit_identical_to_previous_round"] = all(torch.equal(last[name][k], v)
                                                                     for k, v in weights.items())
                    last[name] = weights
                    row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                    rows.append(row)
                    print(row, flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    one, two = last.get(ARMS[0][0]), last.get(ARMS[1][0])
    diff = max(float((one[k] - two[k]).abs().max()) for k in one) if one and two else None

    def median(arm: str):
        values = sorted(r["s_per_step"] for r in rows if r["arm"] == arm and r["s_per_step"] is not None)
        return values[len(values) // 2] if values else None

    medians = {name: median(name) for name, _, _ in arms}
    given = sys.argv[1:] if argv is None else argv
    results = {"command": "python -m illume_rt.bench.nano_threads " + " ".join(map(shlex.quote, given)),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "versions": versions(), "stage": args.stage, "steps": args.steps, "busy": args.busy, "rows": rows,
               "median_s_per_step": medians, "max_abs_weight_difference_1_vs_2_threads": diff}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    base = medians[ARMS[0][0]]
    lines = [f"# nano `{args.stage}` on 1 and 2 threads" + (", beside other work" if args.busy else ""), "",
             f"Command: `{results['command']}`  ", f"Created: {results['created']}  ",
             f"Machine: {results['machine']}  ", f"Versions: {results['versions']}", "",
             "| round | arm | s per step | cores busy (CPU s / wall s) | bit-identical to the previous round |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['arm']} | {r['s_per_step'] if r['s_per_step'] is not None else r['note']} | "
              f"{r.get('cores_busy', '-')} | {r.get('bit_identical_to_previous_round', '-')} |" for r in rows]
    lines += [""] + [f"- {name}: median {m} s per step" + (f", {base / m:.2f}x the speed of 1 thread" if m and base
                                                           else "") for name, m in medians.items()]
    if diff is not None:
        lines.append(f"- Largest weight difference after {args.steps} steps, 1 vs 2 threads: {diff:.2e}.")
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(medians) - 1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
