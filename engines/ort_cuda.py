"""onnxruntime with the CUDA execution provider, IO binding on device buffers, behind the same ``Engine``
interface. Needs ``onnxruntime-gpu`` (installed *instead of* onnxruntime); without it, opening raises a
BackendError that says so.

- ``OrtCudaEngine.run``: inputs are copied once into device OrtValues that are kept and reused while the shape
  stays the same (``update_inplace``), outputs are bound to the device and copied back to the host once.
- ``OrtCudaStep`` (the LLM body's step, engines/llm_step.py): the KV cache is one device OrtValue [layers, 2, batch, kv_heads, capacity, head_dim];
  each layer's cache inputs are bound to their block of it by raw pointer (``bind_input`` with ``buffer_ptr``;
  the whole capacity, masked), ``new_kv`` to a device staging buffer, and one strided device copy
  (cudaMemcpy2D through cuda-python) puts the new columns in place: the cache never crosses to the host; only
  ``hidden`` comes back for the LM head and the sampler.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from illume_rt.contract import HIDDEN, NEW_KV
from illume_rt.engines.base import BackendError
from illume_rt.engines.llm_step import DeviceKVCache, host_feeds

PROVIDER = "CUDAExecutionProvider"


def require_cuda_provider(available: list[str] | None = None) -> None:
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if PROVIDER not in available:
        raise BackendError(f"--backend ort-cuda needs onnxruntime's {PROVIDER}, which this onnxruntime lacks (has "
                           f"{', '.join(available)}); pip uninstall onnxruntime && pip install onnxruntime-gpu "
                           "(or 'illume-rt[gpu]'), or use --backend ort-cpu")


_libraries_loaded = False


def load_cuda_libraries(ort) -> None:
    """Load the CUDA and cuDNN libraries onnxruntime-gpu was built for from the pip packages (nvidia-*, or
    PyTorch's) before the first session, as onnxruntime documents (``preload_dlls``): without it, a machine whose
    CUDA comes from pip and not from LD_LIBRARY_PATH cannot load the CUDA provider. Best effort, once per
    process; ``require_cuda_session`` reports what still fails."""
    global _libraries_loaded
    if _libraries_loaded or not hasattr(ort, "preload_dlls"):
        return
    _libraries_loaded = True
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 -- libraries on the system path may still serve; the session check decides
        pass


def require_cuda_session(name: str, session_providers: list[str]) -> None:
    """onnxruntime falls back to the CPU, with a log line only, when the CUDA provider cannot start (libraries
    missing, no GPU visible): refuse that, since --backend ort-cuda would then silently run on the CPU."""
    if PROVIDER not in session_providers:
        raise BackendError(f"onnxruntime-gpu could not start its CUDA provider for {name} (it ran on "
                           f"{', '.join(session_providers)}): check that nvidia-smi sees a GPU and that the CUDA and "
                           "cuDNN libraries it was built for are installed (pip install 'onnxruntime-gpu[cuda,cudnn]'),"
                           " or use --backend ort-cpu")


class OrtCudaEngine:
    def __init__(self, name: str, path, threads: int | None = None, emulate_fp8: bool = False,
                 device_id: int = 0) -> None:
        import onnxruntime as ort

        from illume_rt.engines.ort import session_options

        require_cuda_provider()
        load_cuda_libraries(ort)
        self.ort, self.name, self.device_id = ort, name, device_id
        providers = [(PROVIDER, {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), session_options(threads, emulate_fp8), providers=providers)
        require_cuda_session(name, self.session.get_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._device_inputs: dict[str, object] = {}

    def _device_value(self, name: str, array: np.ndarray):
        value = self._device_inputs.get(name)
        if value is not None and tuple(value.shape()) == array.shape and value.data_type() == _ort_type(array):
            value.update_inplace(array)
        else:
            value = self.ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id)
            self._device_inputs[name] = value
        return value

    def binding(self):
        return self.session.io_binding()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        io = self.session.io_binding()
        for name in self.input_names:
            io.bind_ortvalue_input(name, self._device_value(name, np.ascontiguousarray(feeds[name])))
        for name in self.output_names:
            io.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()

    def language_step(self, dims) -> "OrtCudaStep":
        """The LLM body's step with the cache on the GPU (engines/llm_step.py)."""
        if self.name != "llm":
            raise BackendError(f"{self.name} is not the LLM body")
        return OrtCudaStep(self, dims)


def _ort_type(array: np.ndarray) -> str:
    return {np.dtype(np.float32): "tensor(float)", np.dtype(np.int64): "tensor(int64)",
            np.dtype(np.float16): "tensor(float16)"}.get(array.dtype, "")


class _DeviceKV:
    def __init__(self, value, shape) -> None:
        self.value, self.shape, self.ptr = value, tuple(shape), value.data_ptr()


class OrtCudaStep:
    """The LLM body's step with the KV cache on the GPU, bound by pointer (see module docstring)."""

    def __init__(self, body: OrtCudaEngine, dims) -> None:
        self.body, self.dims = body, dims
        self._new_kv = None
        self._cuda = None

    def new_cache(self, batch: int, capacity: int) -> DeviceKVCache:
        shape = self.dims.shape(batch, capacity)
        value = self.body.ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dims.dtype), "cuda",
                                                           self.body.device_id)  # unwritten columns: finite
        return DeviceKVCache(_DeviceKV(value, shape), self.dims.dtype.itemsize)

    def run_step(self, cache: DeviceKVCache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray
                 ) -> np.ndarray:
        from illume_rt.engines.cuda_rt import Cuda

        start, seq = cache.length, embeds.shape[1]
        body, d = self.body, self.dims
        batch, dev = embeds.shape[0], body.device_id
        io = body.session.io_binding()
        for name, array in host_feeds(cache, embeds, mask, positions).items():
            io.bind_ortvalue_input(name, body._device_value(name, array))
        past_shape = cache.input_shape()
        for name, ptr in cache.addresses().items():
            io.bind_input(name, "cuda", dev, d.dtype, past_shape, ptr)
        staging = d.shape(batch, seq)
        new_kv = self._staging(staging)
        # outputs come back in the order they were bound: hidden first, and only it is read on the host
        io.bind_output(HIDDEN, "cpu")
        io.bind_output(NEW_KV, "cuda", dev, d.dtype, staging, new_kv.data_ptr())
        body.session.run_with_iobinding(io)  # returns after the CUDA provider synchronized its stream
        hidden = io.get_outputs()[0].numpy()
        cuda = self._cuda = self._cuda or Cuda()
        cache.write(cuda, new_kv.data_ptr(), seq, 0, start, seq, 0)
        cuda.synchronize(0)
        return hidden

    def _staging(self, shape):
        """A device OrtValue for new_kv of this shape, reused while the shape repeats (decode steps)."""
        value = self._new_kv
        if value is None or tuple(value.shape()) != tuple(shape):
            value = self._new_kv = self.body.ort.OrtValue.ortvalue_from_shape_and_type(
                shape, self.dims.dtype, "cuda", self.body.device_id)
        return value
