"""onnxruntime backend."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from illume_rt.engines.base import BackendError

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


MMAP_THRESHOLD_BYTES = 1 << 20
_malloc_tuned = False


def release_large_blocks_promptly() -> bool:
    """Make glibc serve allocations of 1 MiB and more with mmap, so that freeing them returns the memory at once.

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB); after onnxruntime
    frees the protobuf copy of the weights while loading, later large blocks come from heap arenas, and the
    freed ones stayed resident: the bench preset's pipeline sat at 2.6 GB after loading in some runs and 1.5 GB
    in others. Setting the threshold explicitly turns that adjustment off. Process-wide (a malloc setting), so it
    is an opt-in: the CLI and the benchmark call it; a host embedding the runtime calls it if it wants it.
    Linux/glibc only, a no-op elsewhere. Returns whether it was applied."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    _malloc_tuned = bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES))
    return _malloc_tuned


def session_options(threads: int | None = None, emulate_fp8: bool = False, spin: bool | None = None,
                    memory_arena: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # The arena keeps every activation buffer it ever grew: the pixel decoder at 512x512 left 1.4 GB resident
    # after two runs (0.75 GB live at its peak); without it the memory goes back after each run, and decode
    # steps measured no slower (bench/results).
    opts.enable_cpu_mem_arena = memory_arena
    if spin is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if emulate_fp8:  # FP8 Q/DQ graphs only run on onnxruntime with its Q/DQ fusion off (emulated in float)
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts


class OrtEngine:
    """One onnxruntime session. ``run`` binds inputs and outputs through IO binding (``io_binding=True``): inputs
    are used in place, and outputs the caller preallocates (``out={name: array}``, e.g. a head's reused logits
    buffer) are written directly; other outputs come back as new arrays."""

    accepts_out = True  # run() takes out=: LanguageModel checks this to reuse its logits buffers

    def __init__(self, name: str, path: Path, backend: str = "ort-cpu", threads: int | None = None,
                 emulate_fp8: bool = False, io_binding: bool = True, spin: bool | None = None,
                 memory_arena: bool | None = None) -> None:
        import onnxruntime as ort

        providers = PROVIDERS.get(backend)
        if providers is None:
            raise BackendError(f"unknown onnxruntime backend {backend!r}; use one of {', '.join(PROVIDERS)}")
        available = ort.get_available_providers()
        if providers[0] not in available:
            raise BackendError(f"{backend} needs {providers[0]}, which this onnxruntime lacks (has {available}); "
                               "install onnxruntime-gpu instead of onnxruntime, or use --backend ort-cpu")
        self.name = name
        on_cpu = providers[0] == "CPUExecutionProvider"
        if memory_arena is None:  # CPU: no arena (see session_options); CUDA keeps its default
            memory_arena = not on_cpu
        if spin is None and on_cpu:
            # Each session has its own intra-op workers, and by default they spin-wait after a run. The decoding
            # loop alternates sessions every step (body, then a head), so the idle session's spinning workers
            # took the cores the running one needed: with spinning on, a bench-preset pixel step took 1.6x as
            # long (bench/results, "intra-op spinning on").
            spin = False
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, emulate_fp8, spin, memory_arena),
                                                providers=providers)
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own classes (Fail, InvalidGraph, ...)
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"onnxruntime cannot load graph {name} ({Path(path).name}): {first_line}; "
                               f"re-export the bundle, or upgrade onnxruntime (this is {ort.__version__})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # IO binding needs host memory on both sides; CUDA sessions keep the plain path
        self.io_binding = io_binding and providers[0] == "CPUExecutionProvider"
        # An IO binding holds the addresses of one run: one per thread, so a Pipeline shared by threads never
        # runs with another thread's inputs (the session itself is thread-safe)
        self._bindings = threading.local()
        self._dtypes = {o.name: _NP_DTYPES.get(o.type) for o in self.session.get_outputs()}

    def run(self, feeds: Mapping[str, np.ndarray],
            out: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Outputs in ``output_names`` order; an output named in ``out`` is written into that array (C-contiguous,
        exact shape and dtype) and returned as it."""
        out = out or {}
        if not self.io_binding:
            results = self.session.run(self.output_names, dict(feeds))
            for i, name in enumerate(self.output_names):
                if name in out:
                    out[name][...] = results[i]
                    results[i] = out[name]
            return results
        binding = getattr(self._bindings, "binding", None)
        if binding is None:
            binding = self._bindings.binding = self.session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        keep = []  # inputs must stay alive until the run ends
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            keep.append(array)
            binding.bind_cpu_input(name, array)
        bound = {}
        for name in self.output_names:
            target = out.get(name)
            if target is None:
                binding.bind_output(name, "cpu")
                continue
            if not target.flags.c_contiguous or target.dtype != self._dtypes.get(name, target.dtype):
                raise ValueError(f"{self.name}: out[{name!r}] must be a C-contiguous {self._dtypes.get(name)} array")
            binding.bind_output(name, "cpu", 0, target.dtype, list(target.shape), target.ctypes.data)
            bound[name] = target
        self.session.run_with_iobinding(binding)
        produced = binding.get_outputs()
        results = []
        for name, value in zip(self.output_names, produced):
            if name in bound:
                if list(value.shape()) != list(bound[name].shape):
                    raise ValueError(f"{self.name}: output {name} has shape {value.shape()}, out= has "
                                     f"{list(bound[name].shape)}")
                results.append(bound[name])
            else:
                results.append(value.numpy())
        return results


_NP_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32)}
