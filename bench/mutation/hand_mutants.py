"""Bugs planted by hand, one at a time, in a scratch copy of a runtime module: each must fail the named tests.

    .venv/bin/python bench/mutation/hand_mutants.py

Run from the repository root; the copy is the mirror of bench/mutation/run_mutmut.sh (the repository is not touched).
These are the bugs of issue 17 that once went unnoticed, and the two fixed on this branch (re-planted).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = {"generate": "tests/test_generate_loop.py", "layout": "tests/test_layout_rules.py",
         "bundle": "tests/test_bundle_reader.py"}
MUTANTS = [
    ("generate_text ignores its temperature", "generate",
     "token = choose(logits, temperature, 0, 1.0, False, rng)", "token = choose(logits, 1.0, 0, 1.0, False, rng)"),
    ("KV cache written one column early", "generate",
     "cache.kv[..., start:start + seq, :] = new_kv",
     "cache.kv[..., max(start - 1, 0):max(start - 1, 0) + seq, :] = new_kv"),
    ("every decode position 0", "generate",
     "positions = cache.next_position[:, None] + np.arange(seq, dtype=np.int64)[None]",
     "positions = np.zeros((batch, seq), dtype=np.int64)"),
    ("forced tokens fed one per call", "generate",
     "            hidden = lm.step(cache, pending)\n            steps += 1",
     "            for token in pending:\n                hidden = lm.step(cache, [token])\n                steps += 1"),
    ("guidance rows swapped", "generate",
     "guide(logits[0], logits[1] if guided else None", "guide(logits[1] if guided else logits[0], logits[0] if guided else None"),
    ("a head runs before a forced token", "generate",
     "        if slot.level is None:\n            pending.append(slot.token)\n            continue",
     "        if slot.level is None:\n            pending.append(slot.token)\n            lm.logits(hidden, 'text')\n            continue"),
    ("host cache copied every step", "generate",
     "        return dict(zip(self.names, self._views))",
     "        return {n: v.copy() for n, v in zip(self.names, self._views)}"),
    ("the reader checks only components", "bundle",
     'FILE_SECTIONS = ("components", "tables", "files")', 'FILE_SECTIONS = ("components",)'),
    ("RowTable backwards slice (fixed here) re-planted", "bundle",
     "            if step < 0:", "            if False:"),
    ("None top_p passes validation (fixed here) re-planted", "layout",
     'if (value is not None or not name.startswith("pixel_")) and (', "if value is not None and ("),
]


def main() -> int:
    failures = 0
    for title, module, old, new in MUTANTS:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            shutil.copytree(REPO / "illume_rt", scratch / "illume_rt", ignore=shutil.ignore_patterns("__pycache__"))
            for folder in ("runtime", "engines", "export"):
                shutil.copytree(REPO / folder, scratch / "illume_rt" / folder,
                                ignore=shutil.ignore_patterns("__pycache__"))
            target = scratch / "illume_rt" / "runtime" / f"{module}.py"
            text = target.read_text()
            assert text.count(old) == 1, (title, old)
            target.write_text(text.replace(old, new))
            env = {**os.environ, "PYTHONPATH": str(scratch), "HF_HUB_OFFLINE": "1"}
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--noconftest",
                                  str(REPO / TESTS[module])], cwd=scratch, env=env, capture_output=True, text=True)
            failed = [line.split(" - ")[0] for line in run.stdout.splitlines() if line.startswith("FAILED")]
            caught = run.returncode == 1 and failed
            failures += not caught
            print(f"{'caught' if caught else 'MISSED'}  {title}: {failed[0] if failed else run.stdout[-200:]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
