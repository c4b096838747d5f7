"""Draws of nano's MLLM stages trained side by side on one GPU: ``python bench/nano_gpu_draws.py OUTDIR --seeds 1234 1
--focus-steps 3000 6000 [--deadline 480]``.

Each draw is ``python -m illume_rt.nano.train --device cuda`` on the committed tokenizer and diffusion decoder
(``--seed-from nano/weights --redo mllm``: stages ``tokens``, ``mllm``, ``focus``, ``edit``, ``polish``), one
process per (seed, focus steps), all started at once, each in its own work folder. How far apart draws of the
recipe's MLLM stages come out (nano/README.md, "Left out") needs several draws, and on the CPU each costs about 100
minutes of a core. First a smoke run (``ILLUME_NANO_SMOKE``: two steps a stage) checks the CUDA path in seconds,
and the script stops there if it fails.

OUTDIR gets ``meta.json`` (machine, versions, each draw's exit code and wall seconds), ``logs.tar.gz`` (each
draw's output and ``log.json``: per-stage CPU and wall seconds, held-out answers) and ``states_N.tar`` (the
finished draws' ``polish.pt``, three to a file, as the device tool brings back at most 8 files of 16 MiB). A draw
still training at ``--deadline`` seconds is stopped (its last checkpoint stays in its work folder). Scoring is left
to ``nano.evaluate`` on a weights folder exported from a ``polish.pt`` (``nano.train export``).

Never run on a GPU: session 46 prepared it for a lent H100 and was refused a machine. Checked on the CPU only
(``--device cpu``, stopped at the deadline, logs packed). On the device machine, from a checkout that is not
installed: ``illume_rt``'s folders linked into one package folder on ``PYTHONPATH`` (``pyproject.toml``'s
package-dir), as the session's command did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLLM_CHAIN = ("tokens", "mllm", "focus", "edit", "polish")


def train_command(work: Path, seed: int, focus_steps: int, device: str) -> list[str]:
    return [sys.executable, "-m", "illume_rt.nano.train", *MLLM_CHAIN, "--work", str(work), "--seed", str(seed),
            "--seed-from", str(ROOT / "nano" / "weights"), "--redo", "mllm", "--focus-steps", str(focus_steps),
            "--device", device, "--jobs", "1"]


def versions() -> dict:
    import numpy
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--focus-steps", type=int, nargs="+", default=[3000])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/nano_gpu_draws"))
    ap.add_argument("--deadline", type=float, default=480.0, help="seconds after which unfinished draws stop")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    meta = {"versions": versions(), "command": sys.argv, "draws": {}}
    t0 = time.time()

    smoke = args.work / "smoke"
    rc = subprocess.call(train_command(smoke, 1234, 2, args.device), env={**env, "ILLUME_NANO_SMOKE": "1"})
    meta["smoke"] = {"exit": rc, "wall_s": round(time.time() - t0, 1)}
    if rc:
        (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"smoke run failed (exit {rc}): stopping", flush=True)
        return 1

    draws = {}
    for focus_steps in args.focus_steps:
        for seed in args.seeds:
            name = f"focus{focus_steps}_seed{seed}"
            work = args.work / name
            work.mkdir(parents=True, exist_ok=True)
            log = open(work / "train.log", "w")
            draws[name] = (work, log, time.time(), subprocess.Popen(
                train_command(work, seed, focus_steps, args.device), env=env, stdout=log, stderr=subprocess.STDOUT))
    while any(p.poll() is None for _, _, _, p in draws.values()) and time.time() - t0 < args.deadline:
        time.sleep(2)
        for name, (_, _, start, p) in draws.items():
            if p.poll() is not None and name not in meta["draws"]:
                meta["draws"][name] = {"exit": p.returncode, "wall_s": round(time.time() - start, 1)}
                print(f"{name}: exit {p.returncode} after {time.time() - start:.0f} s", flush=True)
    for name, (_, _, start, p) in draws.items():
        if p.poll() is None:
            p.terminate()
            p.wait()
            meta["draws"][name] = {"exit": None, "stopped_at_deadline_s": round(time.time() - start, 1)}

    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for name, (work, log, _, _) in draws.items():
            log.close()
            for f in ("train.log", "log.json"):
                if (work / f).is_file():
                    tar.add(work / f, arcname=f"{name}/{f}")
    finished = [name for name, (work, *_) in draws.items() if (work / "polish.pt").is_file()]
    for k in range(0, len(finished), 3):
        with tarfile.open(args.out / f"states_{k // 3}.tar", "w") as tar:
            for name in finished[k:k + 3]:
                tar.add(draws[name][0] / "polish.pt", arcname=f"{name}/polish.pt")
    meta["wall_s"] = round(time.time() - t0, 1)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta["draws"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
