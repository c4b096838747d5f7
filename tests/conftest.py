import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Tiny models are overhead-bound: one thread each avoids oversubscribing the 2-core machine (torch and
# onnxruntime both spin their pools), which made single forwards 10-50x slower here.
TEST_THREADS = 1

# CI sets ILLUME_RT_NO_SKIPS=1: then a skipped test fails the run, unless its reason names something no CI machine
# here can have (a GPU, CUDA, TensorRT's libraries). A skip must never hide a test that could have run.
SKIPS_ALLOWED_IN_CI = ("TensorRT", "GPU", "CUDA")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("ILLUME_RT_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    hidden = [report for report in skipped
              if not any(word in str(report.longrepr) for word in SKIPS_ALLOWED_IN_CI)]
    if hidden:
        for report in hidden:
            reporter.write_line(f"SKIPPED IN CI (not allowed): {report.nodeid}: {report.longrepr}")
        session.exitstatus = 1


# The suite runs on two pytest-xdist workers (pyproject.toml addopts: -n 2): each test file's tests go to one worker,
# so a file's module fixtures (quantized bundles, exports) are built once, and the files that share the session's
# export of the official checkpoints (conftest official_ckpt_bundle, the suite's slowest step) go together, so it
# is built once too. (xdist's own --dist loadgroup cannot do this under pytest 9.2: it renames test ids through an
# attribute pytest no longer reads.)
SHARED_EXPORT_FILES = {"test_checkpoints.py": "official checkpoints", "test_verify_tokens.py": "official checkpoints"}


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # a hook of pytest-xdist, absent when it is not installed
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        """One scope per test file, files that share a session export merged."""

        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return SHARED_EXPORT_FILES.get(Path(file).name, file)

    return FileGroups(config, log)


# The runtime as users install it (.ci/run's second environment): only the default install, no torch, and the
# package from site-packages, not this source tree. ILLUME_RT_RUNTIME_ONLY=1 makes sure of both before any test runs,
# so that environment cannot silently have torch (pytest -m "runtime and not export"; bundles from the env vars).
BUILD_TIME_PACKAGES = ("torch", "transformers", "diffusers", "onnx")


def pytest_sessionstart(session):
    if os.environ.get("ILLUME_RT_RUNTIME_ONLY") != "1":
        return
    import importlib.util

    import illume_rt

    present = [m for m in BUILD_TIME_PACKAGES if importlib.util.find_spec(m) is not None]
    if present:
        raise pytest.UsageError(f"ILLUME_RT_RUNTIME_ONLY=1 but {', '.join(present)} can be imported here")
    source_tree = Path(__file__).resolve().parents[1]
    if Path(illume_rt.__file__).resolve().is_relative_to(source_tree):
        raise pytest.UsageError(f"ILLUME_RT_RUNTIME_ONLY=1 but illume_rt comes from the source tree "
                                f"({illume_rt.__file__}), not from an installed package")
    missing = [v for v in ("ILLUME_RT_TEST_TINY_BUNDLE", "ILLUME_RT_TEST_NANO_BUNDLE") if not os.environ.get(v)]
    if missing:
        raise pytest.UsageError(f"ILLUME_RT_RUNTIME_ONLY=1 needs bundles exported elsewhere: set {', '.join(missing)}")


try:
    import torch

    torch.set_num_threads(TEST_THREADS)
except ImportError:  # runtime-only install
    pass


@pytest.fixture(scope="session")
def tiny_models():
    from illume_rt.export.bundle import build_reference_models
    from illume_rt.export.configs import get_preset

    return build_reference_models(get_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(request, tmp_path_factory):
    """The full tiny bundle (every component), exported once per test session. ILLUME_RT_TEST_TINY_BUNDLE names
    one exported earlier (`illume-rt export --preset tiny -o DIR`): to skip the export while developing, and in
    .ci/run, which exports it once for both of its environments (the runtime-only one cannot export)."""
    reuse = os.environ.get("ILLUME_RT_TEST_TINY_BUNDLE")
    if reuse:
        return Path(reuse)
    from illume_rt.export.bundle import write_bundle

    return write_bundle(request.getfixturevalue("tiny_models"), tmp_path_factory.mktemp("bundles") / "tiny",
                        log=lambda m: None)


def export_report(bundle: Path, name: str) -> tuple[dict, Path]:
    """(verification report, graph file) of component ``name`` as the export of ``bundle`` recorded them: the manifest's
    accuracy entry (method, cases, worst figures: export/bundle.py keeps them from export_onnx's report), with
    ``ok`` as verify_onnx computes it (every output of every case within tolerance). For tests that check a tiny graph
    the session's export already wrote (``tiny_bundle``: same preset, same seed) instead of exporting it again."""
    import json

    entry = json.loads((Path(bundle) / "manifest.json").read_text())["components"][name]
    report = dict(entry["accuracy"])
    report["ok"] = bool(report["cases"]) and all(out["ok"] for case in report["cases"]
                                                 for out in case["outputs"].values())
    return report, Path(bundle) / entry["file"]


@pytest.fixture(scope="session")
def nano_bundle():
    """illume-nano's bundle: the built-in model's, exported on first use (cached), or ILLUME_RT_TEST_NANO_BUNDLE."""
    reuse = os.environ.get("ILLUME_RT_TEST_NANO_BUNDLE")
    if reuse:
        return Path(reuse)
    from illume_rt.cli import ensure_default_bundle

    return ensure_default_bundle("nano", log=lambda m: None)


@pytest.fixture(scope="session")
def official_ckpt(tmp_path_factory):
    """Synthetic checkpoints in the official layout at tiny shapes (tests/official_checkpoint.py): MLLM untied and
    sharded, MLLM tied in one file, a DualViTok bin with model and EMA weights, a diffusers decoder folder."""
    from official_checkpoint import write_official_checkpoints

    return write_official_checkpoints(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="session")
def official_ckpt_bundle(official_ckpt, tmp_path_factory):
    """(exit code, stderr, bundle folder) of `illume-rt export --checkpoint mllm --tokenizer-checkpoint dualvitok.bin
    --tokenizer-ema --diffusion decoder --preset tiny` on ``official_ckpt``, with the verification budget at 0:
    every lazy graph takes its sampled check (or none), as the 3B and 7B do. Exported once per session (the
    export is the slowest step of the suite): tests/test_checkpoints.py checks what the CLI recorded and loaded,
    tests/test_verify_tokens.py the sampled checks and the token check on it. Tests must not change the folder
    (copy it first)."""
    import contextlib
    import io

    from illume_rt.cli import main
    from illume_rt.export import components

    root, out = official_ckpt["root"], tmp_path_factory.mktemp("official-bundle") / "bundle"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(components, "FULL_VERIFY_BYTES", 0)
        rc = main(["export", "--checkpoint", str(root / "mllm"), "--tokenizer-checkpoint", str(root / "dualvitok.bin"),
                   "--tokenizer-ema", "--diffusion", str(root / "decoder"), "--preset", "tiny", "-o", str(out)])
    return rc, err.getvalue(), out


@pytest.fixture(scope="session")
def tiny_pipe(tiny_bundle):
    from illume_rt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_bundle, threads=TEST_THREADS)


# The example inputs the tests use, made here (nothing outside the repository): the sizes and kinds of the
# ILLUME+ examples (odd sizes, both orientations, PNG with alpha, palette and grey PNGs, JPEGs), drawn from
# illume-nano's scenes so that the content is structured, not noise.
EXAMPLE_UNDERSTAND = {"0.png": ((695, 734), "RGB"), "1.png": ((879, 633), "RGBA"), "2.png": ((512, 513), "P"),
                      "3.png": ((274, 312), "L")}
EXAMPLE_EDIT = {"0.jpg": (493, 493), "1.jpg": (535, 751), "2.jpg": (720, 722), "3.jpg": (500, 501),
                "4.jpg": (500, 501), "5.jpg": (499, 500)}  # (width, height)
EXAMPLE_INSTRUCTIONS = ["Make the shape blue.", "Add a hat on the dog.", "Move it to the bottom right.",
                        "Make the background black.", "Make it a square.", "Make it large."]


@pytest.fixture(scope="session")
def examples(tmp_path_factory):
    import json

    import numpy as np
    from PIL import Image

    from illume_rt.nano import data

    root = tmp_path_factory.mktemp("examples")
    scenes = data.all_scenes()
    for sub in ("understand", "edit"):
        (root / sub).mkdir()
    for i, (name, ((width, height), mode)) in enumerate(EXAMPLE_UNDERSTAND.items()):
        img = Image.fromarray(data.render(scenes[i * 37 % len(scenes)])).resize((width, height), Image.BICUBIC)
        if mode == "RGBA":  # a transparent band: composited on white by the runtime, as transformers does
            alpha = np.full((height, width), 255, np.uint8)
            alpha[: height // 3] = 0
            img = img.convert("RGBA")
            img.putalpha(Image.fromarray(alpha))
        elif mode == "P":
            img = img.convert("P", palette=Image.ADAPTIVE, colors=16)
        elif mode == "L":
            img = img.convert("L")
        img.save(root / "understand" / name)
    lines = []
    for i, ((name, (width, height)), instruction) in enumerate(zip(EXAMPLE_EDIT.items(), EXAMPLE_INSTRUCTIONS)):
        img = Image.fromarray(data.render(scenes[(i * 53 + 11) % len(scenes)], np.random.default_rng(i)))
        img.resize((width, height), Image.BICUBIC).save(root / "edit" / name, quality=90)
        lines.append(json.dumps({"images": [name], "conversations": [{"from": "human",
                                                                       "value": f"<image>{instruction}"}]}))
    (root / "edit" / "edit_test_examples.jsonl").write_text("\n".join(lines) + "\n")
    return root

