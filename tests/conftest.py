import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Tiny models are overhead-bound: one thread each avoids oversubscribing the 2-core machine (torch and
# onnxruntime both spin their pools), which made single forwards 10-50x slower here.
TEST_THREADS = 1
try:
    import torch

    torch.set_num_threads(TEST_THREADS)
except ImportError:  # runtime-only install
    pass

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "illume-examples"


@pytest.fixture(scope="session")
def tiny_models():
    from illume_rt.export.bundle import build_reference_models
    from illume_rt.export.configs import get_preset

    return build_reference_models(get_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_models, tmp_path_factory):
    """The full tiny bundle (every component), exported once per test session. ILLUME_RT_TEST_TINY_BUNDLE names
    one exported earlier, to skip the export while developing (CI never sets it)."""
    from illume_rt.export.bundle import write_bundle

    reuse = os.environ.get("ILLUME_RT_TEST_TINY_BUNDLE")
    if reuse:
        return Path(reuse)
    return write_bundle(tiny_models, tmp_path_factory.mktemp("bundles") / "tiny", log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_bundle):
    from illume_rt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_bundle, threads=TEST_THREADS)


@pytest.fixture(scope="session")
def examples():
    if not EXAMPLES.is_dir():
        pytest.skip(f"example inputs not found at {EXAMPLES} (the project's shared/ folder beside the checkout)")
    return EXAMPLES
