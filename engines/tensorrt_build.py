"""Building TensorRT engines from a bundle (build-time tooling; the runner is engines/tensorrt.py):
``build_bundle_engines``, ``refit_engine``, and the pure planning parts (``plan_build``, ``BuildOptions``).
Written against TensorRT 11's Python API (also valid on 10.16; checked against both by tests/test_trt_api.py).

Strongly typed only:
- TensorRT 11 has no precision builder flags (FP16, BF16, INT8, FP8, ...) and no INT8 calibrator: every network is
  strongly typed, so each layer runs in the type the ONNX graph gives it. The precision therefore comes from the
  bundle: FP32 graphs build FP32 engines, ``illume-rt quantize --precision fp16|bf16 --target tensorrt`` bundles
  (ModelOpt AutoCast) build FP16/BF16 engines, INT8/FP8 bundles (Q/DQ, fp16 high precision) build INT8/FP8
  engines. The network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (required on 10.x, the
  only mode on 11.x);
- optimization profiles from ``engines.profiles.engine_profiles`` (prefill + decode for the LLM);
- ``builder_optimization_level`` (0..5, TensorRT's default 3), a workspace limit, the bundle's timing cache
  loaded before and saved after each build (atomically); ``editable_timing_cache`` sets
  ``BuilderFlag.EDITABLE_TIMING_CACHE`` (TensorRT 11's replacement for the removed algorithm selector);
- ``weight_streaming``: ``BuilderFlag.WEIGHT_STREAMING`` (the runner then keeps a budget of the weights on the GPU);
- ``refittable``: ``BuilderFlag.REFIT``; ``refit_engine`` swaps in the weights of a fine-tuned graph of the same
  architecture (``Refitter`` + ``OnnxParserRefitter``) without a rebuild;
- the serialized engine written atomically under ``bundle/engines/`` and recorded in the index with its key
  (``engines.engine_cache``: graph hash, precision, recipe, build options, TensorRT major.minor, GPU).

None of the TensorRT calls here has executed (no GPU or TensorRT library where this was written): see
docs/engines.md, "What has run where".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from illume_rt.engines.base import BackendError
from illume_rt.engines.engine_cache import (PRECISIONS, TIMING_CACHE, DeviceInfo, EngineCacheError, EngineKey,
                                            engine_dir, find_engine, record_engine, rebuild_command, write_atomic)
from illume_rt.engines.profiles import Profile, engine_profiles
from illume_rt.engines.tensorrt import _logger, current_device, import_tensorrt

DEFAULT_OPT_LEVEL = 3
DEFAULT_WORKSPACE = 4 << 30
QUANTIZED_PRECISIONS = ("int8", "fp8", "int4")


def graph_is_quantized(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


@dataclass(frozen=True)
class BuildOptions:
    """Builder options beyond the optimization level and workspace (all part of the engine's cache key)."""
    weight_streaming: bool = False  # BuilderFlag.WEIGHT_STREAMING: run with a GPU weight budget
    refittable: bool = False  # BuilderFlag.REFIT: weights can be swapped in later (refit_engine)
    editable_timing_cache: bool = False  # BuilderFlag.EDITABLE_TIMING_CACHE

    def flags(self) -> list[str]:
        """The BuilderFlag names these options set (never a precision flag: TensorRT 11 has none)."""
        return [name for name, on in (("WEIGHT_STREAMING", self.weight_streaming), ("REFIT", self.refittable),
                                      ("EDITABLE_TIMING_CACHE", self.editable_timing_cache)) if on]


def build_recipe(opt_level: int, profiles: list[Profile], workspace: int, options: BuildOptions) -> dict:
    """Everything about a build that changes the engine, as part of its cache key."""
    return {"opt_level": opt_level, "strongly_typed": True, "workspace": workspace,
            "profiles": [p.to_dict() for p in profiles], "flags": options.flags()}


def bundle_precision(bundle) -> str:
    """The precision a bundle was made at (``quantize`` records it; an exported bundle is fp32)."""
    return (bundle.manifest.get("quantization") or {}).get("precision", "fp32")


def check_requested_precision(bundle, precision: str | None) -> None:
    """``build-engines --precision P`` only confirms the bundle's precision: TensorRT 11 takes it from the graphs."""
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    have = bundle_precision(bundle)
    if precision != have:
        fix = (f"illume-rt quantize {bundle.path} --precision {precision} --target tensorrt -o "
               f"{bundle.path}-{precision}" if precision != "fp32" else "export an FP32 bundle")
        raise BackendError(f"this bundle is {have}; TensorRT builds strongly typed engines whose precision comes "
                           f"from the graphs, so make a {precision} bundle first: `{fix}`")


def plan_build(bundle, name: str, opt_level: int = DEFAULT_OPT_LEVEL, workspace: int = DEFAULT_WORKSPACE,
               device: DeviceInfo | None = None, options: BuildOptions = BuildOptions()) -> tuple[EngineKey, dict]:
    """The key and build settings of one component's engine (pure: no TensorRT calls)."""
    entry = bundle.component(name)
    precision = entry.get("precision", "fp32")
    if precision not in PRECISIONS and precision != "int4":
        raise BackendError(f"{name}: unknown precision {precision!r} in the manifest; re-export or re-quantize")
    quantized = graph_is_quantized(bundle.component_path(name))
    if precision in QUANTIZED_PRECISIONS and not quantized:
        raise BackendError(f"{name}: labelled {precision} but the graph holds no Q/DQ nodes (it would build in "
                           f"float); re-run `illume-rt quantize ... --precision {precision} --target tensorrt`")
    profiles = engine_profiles(name, entry)
    quant = entry.get("quantization") or {}
    recipe = quant.get("recipe", "none")
    key = EngineKey(name, entry["sha256"], precision, recipe, build_recipe(opt_level, profiles, workspace, options),
                    device)
    return key, {"profiles": profiles, "opt_level": opt_level, "workspace": workspace, "options": options,
                 "quantized": quantized}


def build_engine(onnx_path: Path, profiles: list[Profile], opt_level: int, workspace: int,
                 timing_cache: Path | None, options: BuildOptions = BuildOptions(),
                 log: Callable[[str], None] = print) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.editable_timing_cache:
        config.set_flag(trt.BuilderFlag.EDITABLE_TIMING_CACHE)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in profile.shapes.items():
            p.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"  timing cache {timing_cache} does not fit this GPU/TensorRT; building without it")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build {onnx_path.name} (see the log above)")
    log(f"  built {onnx_path.name} in {time.perf_counter() - t0:.1f}s")
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_bundle_engines(bundle, precision: str | None = None, opt_level: int = DEFAULT_OPT_LEVEL,
                         components: list[str] | None = None, workspace: int = DEFAULT_WORKSPACE,
                         force: bool = False, log: Callable[[str], None] = print,
                         options: BuildOptions = BuildOptions()) -> list[dict]:
    """Build (or find in the cache) an engine per component; returns the index entries.

    ``precision`` only confirms the bundle's (see ``check_requested_precision``)."""
    from illume_rt.engines.checks import check_graph_ops

    check_requested_precision(bundle, precision)
    trt = import_tensorrt()
    device = current_device()
    out = engine_dir(bundle.path)
    names = components or list(bundle.manifest["components"])
    built = []
    for name in names:
        key, settings = plan_build(bundle, name, opt_level, workspace, device, options)
        path = out / key.filename()
        if path.is_file() and not force:
            log(f"{name}: cached engine {path.name}")
            record_engine(bundle.path, key, {"bytes": path.stat().st_size, "tensorrt_build": trt.__version__})
            built.append(key.to_dict())
            continue
        report = check_graph_ops(bundle.component_path(name))
        if not report.ok:
            raise BackendError(f"{name}: TensorRT {device.tensorrt_version} cannot take this graph: "
                               + "; ".join(report.errors[:5]))
        flags = ", ".join(options.flags())
        log(f"{name}: building {key.precision} (strongly typed, opt level {opt_level}{', ' + flags if flags else ''})"
            f" for {device.describe()}")
        data = build_engine(bundle.component_path(name), settings["profiles"], opt_level, workspace,
                            out / TIMING_CACHE, options, log)
        write_atomic(path, data)
        record_engine(bundle.path, key, {"bytes": len(data), "tensorrt_build": trt.__version__,
                                         "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        built.append(key.to_dict())
    return built


def refit_engine(bundle, name: str, onnx_path: Path | str, log: Callable[[str], None] = print) -> dict:
    """Swap the weights of ``onnx_path`` (a fine-tuned graph of the same architecture) into the refittable engine
    of ``name``; the refitted engine replaces the old one in the cache, keyed by the new graph's hash."""
    from illume_rt.files import sha256_file

    trt = import_tensorrt()
    logger = _logger(trt)
    device = current_device()
    entry = bundle.component(name)
    try:
        found = find_engine(bundle.path, name, entry["sha256"], device)
    except EngineCacheError as exc:
        raise BackendError(str(exc)) from None
    if "REFIT" not in found["build"].get("flags", []):
        raise BackendError(f"the {name} engine was not built refittable; rebuild it with "
                           f"`illume-rt build-engines {bundle.path} --components {name} --refittable --force`")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine((engine_dir(bundle.path) / found["file"]).read_bytes())
    if engine is None:
        raise BackendError(f"{name}: TensorRT could not deserialize the engine; rebuild it with "
                           f"`{rebuild_command(bundle.path)}`")
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
        raise BackendError(f"{name}: the weights of {onnx_path} do not fit the engine: {errors}")
    if not refitter.refit_cuda_engine():
        raise BackendError(f"{name}: TensorRT refused the refit (missing weights: {refitter.get_missing_weights()})")
    data = bytes(memoryview(engine.serialize()))
    key = EngineKey(name, sha256_file(Path(onnx_path)), found["precision"], found["recipe"], found["build"], device)
    write_atomic(engine_dir(bundle.path) / key.filename(), data)
    record_engine(bundle.path, key, {"bytes": len(data), "tensorrt_build": trt.__version__,
                                     "refitted_from": found["file"]})
    log(f"{name}: refitted from {Path(onnx_path).name} -> {key.filename()}")
    return key.to_dict()
