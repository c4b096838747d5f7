"""The CUDA runtime calls the TensorRT backend needs, through cuda-python (``cuda.bindings.runtime``; older
releases: ``cuda.cudart``), imported only when used.

Why cuda-python: it is NVIDIA's own binding of the CUDA runtime API (the one TensorRT's samples and demo/Diffusion
use), a small wheel with no torch, and it exposes stream capture and CUDA graphs, which polygraphy's ``cuda``
helper does not. Every call returns ``(error, value...)``; ``check`` turns a non-success error into an exception.
"""

from __future__ import annotations

import ctypes

import numpy as np

from illume_rt.engines.base import BackendError


def load_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError("the GPU backends need cuda-python (pip install cuda-python, "
                               "or 'illume-rt[gpu]')") from None
    return cudart


class Cuda:
    """Thin, checked wrapper over the runtime calls used here."""

    def __init__(self) -> None:
        self.rt = load_cudart()

    def check(self, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise BackendError(f"CUDA error {int(err)} ({name.decode() if isinstance(name, bytes) else name})")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    # -- device ---------------------------------------------------------------------------------------------
    def device_properties(self, device: int = 0) -> tuple[str, str]:
        props = self.check(self.rt.cudaGetDeviceProperties(device))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00"), f"{props.major}.{props.minor}"

    # -- memory ---------------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        if ptr:
            self.check(self.rt.cudaFree(ptr))

    def malloc_host(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMallocHost(max(int(nbytes), 1))))

    def free_host(self, ptr: int) -> None:
        if ptr:
            self.check(self.rt.cudaFreeHost(ptr))

    def memset_async(self, ptr: int, value: int, nbytes: int, stream) -> None:
        self.check(self.rt.cudaMemsetAsync(ptr, value, nbytes, stream))

    def h2d_async(self, dst: int, src: np.ndarray, stream) -> None:
        src = np.ascontiguousarray(src)
        self.check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h_async(self, dst: np.ndarray, src: int, stream) -> None:
        assert dst.flags.c_contiguous
        self.check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def d2d_async(self, dst: int, src: int, nbytes: int, stream) -> None:
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                               stream))

    def d2d_2d_async(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
                     stream) -> None:
        """``height`` rows of ``width`` bytes, rows ``src_pitch`` / ``dst_pitch`` bytes apart (cudaMemcpy2DAsync)."""
        if width and height:
            self.check(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height,
                                                 self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    # -- streams and graphs -----------------------------------------------------------------------------------
    def stream(self):
        return self.check(self.rt.cudaStreamCreate())

    @staticmethod
    def handle(stream) -> int:
        """The integer value of a cudaStream_t (what TensorRT's ``execute_async_v3`` and
        ``set_optimization_profile_async`` take)."""
        return int(stream)

    def synchronize(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream))

    def begin_capture(self, stream) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode))

    def end_capture(self, stream):
        graph = self.check(self.rt.cudaStreamEndCapture(stream))
        try:
            return self.check(self.rt.cudaGraphInstantiate(graph, 0))
        finally:
            self.check(self.rt.cudaGraphDestroy(graph))

    def launch(self, graph_exec, stream) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream))

    def destroy_graph(self, graph_exec) -> None:
        if graph_exec is not None:
            self.check(self.rt.cudaGraphExecDestroy(graph_exec))


class DeviceBuffer:
    """One device allocation that grows (never shrinks) when a larger tensor comes."""

    def __init__(self, cuda: Cuda, nbytes: int = 0) -> None:
        self.cuda, self.ptr, self.nbytes = cuda, 0, 0
        if nbytes:
            self.ensure(nbytes)

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.cuda.free(self.ptr)
            self.ptr, self.nbytes = self.cuda.malloc(nbytes), int(nbytes)
        return self.ptr

    def free(self) -> None:
        self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0


class PinnedArray:
    """A numpy array in page-locked host memory (fast, truly asynchronous copies)."""

    def __init__(self, cuda: Cuda, shape, dtype) -> None:
        self.cuda = cuda
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = cuda.malloc_host(nbytes)
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free(self) -> None:
        self.cuda.free_host(self.ptr)
        self.ptr = 0
