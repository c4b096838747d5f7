"""Faults (issue 11, item 8): a run killed with SIGKILL, and a disk that fills while writing (RLIMIT_FSIZE).

Neither may leave anything a later load trusts, or anything that blocks the next run, and the previous bundle or
image must stay intact. The runs are real CLI processes."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from illume_rt.runtime.bundle import BundleError, load_bundle
from illume_rt.files import scratch_dir

CLI = [sys.executable, "-m", "illume_rt.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.runtime


def limit_file_size(max_bytes: int):
    """preexec_fn: files may not grow past ``max_bytes``; writes past it fail with EFBIG (SIGXFSZ ignored, as a
    full disk fails them with ENOSPC) instead of killing the process."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before the moment to kill it")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill the process")
        time.sleep(0.05)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.export
def test_export_killed_midway_leaves_the_previous_bundle_and_nothing_trusted(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    proc = subprocess.Popen([*CLI, "export", "--preset", "tiny", "-o", str(out), "--overwrite"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.tmp-")]  # noqa: E731
    wait_for(lambda: any(any(s.iterdir()) for s in scratch()), 300, proc)  # a graph is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    load_bundle(out)  # the previous bundle, whole (hashes verified)
    leftovers = scratch()
    assert leftovers and not (leftovers[0] / "manifest.json").exists()  # never a manifest: nothing to trust
    with pytest.raises(BundleError):
        load_bundle(leftovers[0])
    scratch_dir(out)  # what the next export does first: the dead writer's folder goes
    assert not any(p.exists() for p in leftovers)


def test_generate_killed_midway_leaves_no_image(tiny_bundle, tmp_path):
    out = tmp_path / "image.png"
    proc = subprocess.Popen([*CLI, "generate", "a cat", "--bundle", str(tiny_bundle), "-o", str(out), "--resolution",
                             "512x512", "--threads", "1"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: "RANDOM" in proc.stderr.readline(), 120, proc)  # the pipeline is open: decoding starts
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.iterdir()) == []
    again = subprocess.run([*CLI, "generate", "a cat", "--bundle", str(tiny_bundle), "-o", str(out), "-q",
                            "--threads", "1"], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert Image.open(out).size == (256, 256)


def test_full_disk_while_saving_an_image_keeps_the_previous_one(tiny_bundle, tmp_path):
    out = tmp_path / "image.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(out)
    previous = out.read_bytes()
    run = subprocess.run([*CLI, "generate", "a cat", "--bundle", str(tiny_bundle), "-o", str(out), "-q",
                          "--threads", "1"], env=ENV, capture_output=True, text=True,
                         preexec_fn=limit_file_size(4096))
    assert run.returncode == 2
    assert "cannot write" in one_line(run.stderr) and "ulimit" in run.stderr
    assert out.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]  # the temporary file is gone


@pytest.mark.export
def test_full_disk_while_exporting_keeps_the_previous_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    run = subprocess.run([*CLI, "export", "--preset", "tiny", "-o", str(out), "--overwrite"], env=ENV,
                         capture_output=True, text=True, preexec_fn=limit_file_size(64 * 1024))
    assert run.returncode == 2, run.stderr
    one_line(run.stderr)
    load_bundle(out)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


FIRST_RUN = """
import json, sys, time
from pathlib import Path
import illume_rt.export.bundle as bundle_module
from illume_rt import cli

def slow_export(models, path, log=print, overwrite=False, model_info=None):
    with open(sys.argv[1], "a") as counter:
        counter.write("export\\n")
    time.sleep(1.0)  # long enough for the other first runs to arrive while this one exports
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "illume-rt-bundle"}))
    return path

bundle_module.write_bundle = slow_export
cli.builtin_models = lambda preset: None
print(cli.ensure_default_bundle("tiny", log=lambda m: None))
"""


@pytest.mark.export  # the first run exports only where the export extra is installed
def test_concurrent_first_runs_export_the_builtin_model_once(tmp_path):
    counter = tmp_path / "exports.log"
    env = {**ENV, "ILLUME_RT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_RUN, str(counter)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert counter.read_text().count("export") == 1 and len(paths) == 1
