"""onnxruntime backend."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from illume_rt.engines.base import BackendError

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session_options(threads: int | None = None, emulate_fp8: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if emulate_fp8:  # FP8 Q/DQ graphs only run on onnxruntime with its Q/DQ fusion off (emulated in float)
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


class OrtEngine:
    def __init__(self, name: str, path: Path, backend: str = "ort-cpu", threads: int | None = None,
                 emulate_fp8: bool = False) -> None:
        import onnxruntime as ort

        providers = PROVIDERS.get(backend)
        if providers is None:
            raise BackendError(f"unknown onnxruntime backend {backend!r}; use one of {', '.join(PROVIDERS)}")
        available = ort.get_available_providers()
        if providers[0] not in available:
            raise BackendError(f"{backend} needs {providers[0]}, which this onnxruntime lacks (has {available}); "
                               "install onnxruntime-gpu instead of onnxruntime, or use --backend ort-cpu")
        self.name = name
        self.session = ort.InferenceSession(str(path), session_options(threads, emulate_fp8), providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, dict(feeds))
