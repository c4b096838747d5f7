"""Small measuring tools: the machine's read bandwidth, peak resident memory, timing statistics, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time

import numpy as np


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int | None = None) -> dict:
    """Streaming read bandwidth of this machine in bytes/s, measured with numpy on a float32 buffer far larger than
    the caches: ``np.max`` (a vectorised read-only reduction that releases the GIL) over 1 and ``threads`` equal
    slices in parallel threads, and a BLAS dot product; the best rate of ``repeats`` tries of each is kept."""
    threads = threads or os.cpu_count() or 1
    data = np.full(nbytes // 4, 1.0, dtype=np.float32)  # written once: resident pages, not the shared zero page

    def parallel_max(count: int):
        chunks = np.array_split(data, count)

        def run() -> None:
            workers = [threading.Thread(target=np.max, args=(c,)) for c in chunks]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        return run

    methods = {f"np.max, {n} thread(s)": parallel_max(n) for n in sorted({1, threads})}
    methods["np.dot (BLAS)"] = lambda: np.dot(data, data)
    best: dict = {"bytes_per_s": 0.0}
    for name, fn in methods.items():
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            rate = data.nbytes / (time.perf_counter() - t0)
            if rate > best["bytes_per_s"]:
                best = {"bytes_per_s": rate, "best_method": name}
    best.update(method=f"numpy streaming read of {nbytes / 2**30:.2f} GiB, best of {repeats} per method "
                       f"({', '.join(methods)})", buffer_bytes=int(data.nbytes))
    return best


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """VmHWM of this process (peak resident set since start or since the last reset_peak_rss)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def stats(values: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    q = statistics.quantiles(vals, n=4) if len(vals) >= 2 else [vals[0]] * 3
    return {"n": len(vals), "median": statistics.median(vals), "min": vals[0], "max": vals[-1],
            "iqr": q[2] - q[0], "values": vals}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_bytes"] = int(fh.readline().split()[1]) * 1024
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("illume-rt", "numpy", "onnxruntime", "onnxruntime-genai", "torch", "transformers", "onnx",
                 "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
