"""One device check for a GPU machine: ``python bench/device_check.py OUTDIR [--presets tiny,bench]``.

With TensorRT (10.x) present: export the presets' bundles, run the TensorRT checks, build the engines (fp16),
compare every engine with onnxruntime (through polygraphy when it is installed, else directly), and time a
text-to-image run on the TensorRT backend against onnxruntime CPU.

Without TensorRT (the machine this project's lead uses: torch CUDA, onnxruntime CPU, onnx, transformers): the same
checks, a smoke test of the CUDA runtime layer the TensorRT backend uses (engines/cuda_rt.py through cuda-python:
device buffers, pinned copies, a captured and replayed CUDA graph), then every component's PyTorch reference on
CUDA against the exported graph on onnxruntime CPU (parity figures and timings), so the GPU is still exercised.

Needs only torch, onnx, onnxruntime, transformers, numpy (tensorrt, polygraphy, cuda-python optional). Writes
``device_check.json`` and ``device_check.md`` into OUTDIR. Runs from a checkout without installing it. Keeps
within a time budget (``--budget-s``, default 540): a preset that would not fit is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _import_project():
    """``illume_rt.*`` from this checkout, installed or not (the sub-packages live at the repo root)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import illume_rt

    if str(ROOT) not in list(illume_rt.__path__):
        illume_rt.__path__.append(str(ROOT))


def _optional(name: str):
    try:
        module = __import__(name)
        return getattr(module, "__version__", "present")
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return None if isinstance(exc, ImportError) else f"broken: {exc}"


def environment() -> dict:
    import numpy as np

    env = {"python": platform.python_version(), "numpy": np.__version__, "torch": _optional("torch"),
           "onnx": _optional("onnx"), "onnxruntime": _optional("onnxruntime"), "tensorrt": _optional("tensorrt"),
           "polygraphy": _optional("polygraphy"), "transformers": _optional("transformers")}
    try:
        from cuda.bindings import runtime  # noqa: F401
        env["cuda_python"] = "cuda.bindings"
    except ImportError:
        env["cuda_python"] = None
    try:
        import torch

        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    except ImportError:
        env["cuda"] = False
    try:
        import onnxruntime as ort

        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return env


def cuda_layer_smoke() -> dict:
    """engines/cuda_rt.py for real: buffers, pinned copies, a captured graph of copies replayed twice."""
    import numpy as np

    from illume_rt.engines.cuda_rt import Cuda, DeviceBuffer, PinnedArray

    cuda = Cuda()
    name, cc = cuda.device_properties(0)
    stream = cuda.stream()
    n = 1 << 20
    a, b = DeviceBuffer(cuda, n * 4), DeviceBuffer(cuda, n * 4)
    src = np.arange(n, dtype=np.float32)
    host = PinnedArray(cuda, (n,), np.float32)
    host.array[:] = src
    cuda.h2d_async(a.ptr, host.array, stream)
    cuda.memset_async(b.ptr, 0, n * 4, stream)
    cuda.begin_capture(stream)
    cuda.d2d_async(b.ptr, a.ptr, n * 4, stream)
    graph = cuda.end_capture(stream)
    cuda.launch(graph, stream)
    back = np.empty(n, np.float32)
    cuda.d2h_async(back, b.ptr, stream)
    cuda.synchronize(stream)
    ok_first = bool(np.array_equal(back, src))
    host.array[:] = -src  # replay must see the new device contents of a (same address, new data)
    cuda.h2d_async(a.ptr, host.array, stream)
    t0 = time.perf_counter()
    for _ in range(100):
        cuda.launch(graph, stream)
    cuda.synchronize(stream)
    replay_us = (time.perf_counter() - t0) / 100 * 1e6
    cuda.d2h_async(back, b.ptr, stream)
    cuda.synchronize(stream)
    ok_replay = bool(np.array_equal(back, -src))
    cuda.destroy_graph(graph)
    a.free(), b.free(), host.free()
    return {"gpu": name, "compute_capability": cc, "roundtrip_ok": ok_first, "graph_replay_ok": ok_replay,
            "graph_replay_us_4MiB_copy": round(replay_us, 1)}


def export_bundle(preset: str, out: Path, log) -> Path:
    from illume_rt.export.bundle import write_bundle

    path = out / f"bundle-{preset}"
    out.mkdir(parents=True, exist_ok=True)
    if not (path / "manifest.json").is_file():
        models = _reference_models(preset, out)
        write_bundle(models, path, log=lambda m: log("    " + m))
    return path


def _reference_models(preset: str, work: Path):
    """Random-weight reference networks; presets with the official vocabulary need a tokenizer.json: the
    benchmark's byte-level stand-in (bench/models.py) provides one."""
    from illume_rt.export.bundle import build_reference_models
    from illume_rt.export.configs import get_preset

    preset_obj = get_preset(preset)
    if preset_obj.vocab.text_vocab_size == 256:
        return build_reference_models(preset_obj)
    from illume_rt.bench.models import reference_models

    return reference_models(preset, work / f"tokenizer-{preset}")


def run_checks(bundle) -> dict:
    from illume_rt.engines.checks import check_bundle
    from illume_rt.engines.profiles import uncovered_requests

    reports = [r.to_dict() for r in check_bundle(bundle)]
    for r in reports:
        r["ops"] = len(r["ops"])
    return {"graphs": reports, "uncovered_shapes": uncovered_requests(bundle.manifest, [16, 256])[:20]}


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_cuda_vs_ort(preset: str, bundle, repeats: int = 5) -> list[dict]:
    """Each component: PyTorch reference on CUDA vs the bundle's graph on onnxruntime CPU (same inputs)."""
    import numpy as np
    import torch

    from illume_rt.engines.ort import OrtEngine
    from illume_rt.export.bundle import components_for
    from illume_rt.export.components import compare_arrays

    torch.backends.cuda.matmul.allow_tf32 = False  # parity in full fp32: TF32 convs miss the export tolerance
    torch.backends.cudnn.allow_tf32 = False
    models = _reference_models(preset, bundle.path.parent)
    rows = []
    for comp in components_for(models):
        if comp.name not in bundle.manifest["components"]:
            continue
        module = comp.build_module().to("cuda").eval()
        arrays = comp.make_inputs(comp.sample_dims(1), np.random.default_rng(0))
        ort_engine = OrtEngine(comp.name, bundle.component_path(comp.name), "ort-cpu")
        feeds = {t.name: arrays[t.name] for t in comp.inputs}
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to("cuda") for t in comp.inputs)
        with torch.no_grad():
            outs = module(*inputs)
            _sync(torch)
            t0 = time.perf_counter()
            for _ in range(repeats):
                outs = module(*inputs)
            _sync(torch)
            torch_ms = (time.perf_counter() - t0) / repeats * 1e3
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        got = ort_engine.run(feeds)
        t0 = time.perf_counter()
        for _ in range(repeats):
            got = ort_engine.run(feeds)
        ort_ms = (time.perf_counter() - t0) / repeats * 1e3
        figures = {t.name: compare_arrays(g, o.float().cpu().numpy(), comp.tolerance)
                   for t, g, o in zip(comp.outputs, got, outs)}
        rows.append({"component": comp.name, "dims": comp.sample_dims(1), "torch_cuda_ms": round(torch_ms, 3),
                     "ort_cpu_ms": round(ort_ms, 3), "ok": all(f["ok"] for f in figures.values()),
                     "outputs": figures})
        del module
    torch.cuda.empty_cache()
    return rows


def tensorrt_section(bundle, log) -> dict:
    """Build engines at the bundle's precision (strongly typed), compare each with onnxruntime, time one generation on both backends."""
    import numpy as np

    from illume_rt.engines.ort import OrtEngine
    from illume_rt.engines.profiles import engine_profiles
    from illume_rt.engines.tensorrt import open_engine
    from illume_rt.engines.tensorrt_build import build_bundle_engines
    from illume_rt.export.components import Tolerance, compare_arrays
    from illume_rt.runtime.options import SamplingConfig
    from illume_rt.runtime.pipeline import Pipeline

    section: dict = {}
    t0 = time.perf_counter()
    section["engines"] = build_bundle_engines(bundle, None, 3, log=lambda m: log("    " + m))  # bundle precision
    section["build_s"] = round(time.perf_counter() - t0, 1)
    compare = []
    rng = np.random.default_rng(0)
    for name, entry in bundle.manifest["components"].items():
        opt = {k: v[1] for k, v in engine_profiles(name, entry)[-1].shapes.items()}
        feeds = {}
        for spec in entry["inputs"]:
            shape = opt[spec["name"]]
            if spec["dtype"] == "int64":
                feeds[spec["name"]] = np.ones(shape, np.int64) if "mask" in spec["name"] else \
                    np.broadcast_to(np.arange(shape[-1], dtype=np.int64), shape).copy()
            else:
                feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
        if name == "llm":  # positions continue the past
            past = feeds["past_key_0"].shape[2]
            feeds["position_ids"] = feeds["position_ids"] + past
        via = "illume-rt runners"
        try:
            import polygraphy  # noqa: F401
            from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
            from polygraphy.comparator import Comparator, CompareFunc

            from illume_rt.engines.engine_cache import engine_dir, find_engine
            from illume_rt.engines.tensorrt import current_device

            found = find_engine(bundle.path, name, entry["sha256"], current_device())
            plan = (engine_dir(bundle.path) / found["file"]).read_bytes()
            runners = [OnnxrtRunner(SessionFromOnnx(str(bundle.component_path(name)))),
                       TrtRunner(EngineFromBytes(plan))]
            results = Comparator.run(runners, data_loader=[feeds])
            ok = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=1e-2, rtol=1e-2)))
            compare.append({"component": name, "via": "polygraphy", "ok": ok})
            continue
        except ImportError:
            pass
        trt_out = open_engine(bundle, name).run(feeds)
        ort_out = OrtEngine(name, bundle.component_path(name), "ort-cpu").run(feeds)
        figures = {spec["name"]: compare_arrays(a, b, Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.999))
                   for spec, a, b in zip(entry["outputs"], trt_out, ort_out)}
        compare.append({"component": name, "via": via, "ok": all(f["ok"] for f in figures.values()),
                        "outputs": figures})
    section["compare"] = compare
    timings = {}
    for backend in ("tensorrt", "ort-cpu"):
        pipe = Pipeline.from_bundle(bundle.path, backend=backend)
        pipe.generate("a red circle", (256, 256), seed=0, sampling=SamplingConfig(greedy=True))  # warm-up
        t0 = time.perf_counter()
        result = pipe.generate("a red circle", (256, 256), seed=0, sampling=SamplingConfig(greedy=True))
        timings[backend] = {"total_s": round(time.perf_counter() - t0, 3), "steps": result.tokens.steps,
                            "stages": {k: round(v, 4) for k, v in result.timings.items()},
                            "semantic": result.tokens.semantic.tolist()}
    section["tokens_equal_greedy"] = timings["tensorrt"].pop("semantic") == timings["ort-cpu"].pop("semantic")
    section["generate_256"] = timings
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--presets", default="tiny,bench")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--work", default=None, help="where bundles are exported (default OUTDIR/work)")
    parser.add_argument("--bench-min-s", type=float, default=300.0,
                        help="time left needed to start a non-tiny preset")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    _import_project()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    result: dict = {"environment": environment(), "presets": {}}
    log(f"environment: {json.dumps(result['environment'])}")
    have_trt = bool(result["environment"]["tensorrt"]) and not str(result["environment"]["tensorrt"]).startswith("b")
    have_cuda = bool(result["environment"].get("cuda"))
    if result["environment"]["cuda_python"] and have_cuda:
        try:
            result["cuda_layer"] = cuda_layer_smoke()
        except Exception as exc:  # noqa: BLE001
            result["cuda_layer"] = {"error": repr(exc)}
        log(f"cuda layer: {result['cuda_layer']}")
    from illume_rt.export.configs import PRESETS
    from illume_rt.runtime.bundle import load_bundle

    for preset in [p for p in args.presets.split(",") if p]:
        left = args.budget_s - (time.perf_counter() - start)
        if preset not in PRESETS:
            result["presets"][preset] = {"skipped": "preset not defined in export/configs.py"}
            continue
        if preset != "tiny" and left < args.bench_min_s:
            result["presets"][preset] = {"skipped": f"only {left:.0f}s of the budget left"}
            log(f"{preset}: skipped ({left:.0f}s left)")
            continue
        entry: dict = {}
        result["presets"][preset] = entry
        try:
            log(f"{preset}: export")
            t0 = time.perf_counter()
            work = Path(args.work) if args.work else out / "work"
            bundle = load_bundle(export_bundle(preset, work, log), verify=False)
            entry["export_s"] = round(time.perf_counter() - t0, 1)
            log(f"{preset}: checks")
            entry["checks"] = run_checks(bundle)
            if have_trt and have_cuda:
                log(f"{preset}: tensorrt build + compare + benchmark")
                entry["tensorrt"] = tensorrt_section(bundle, log)
            elif have_cuda:
                entry["tensorrt"] = "absent: ran torch CUDA reference vs onnxruntime CPU instead"
                log(f"{preset}: torch CUDA vs onnxruntime CPU")
                entry["torch_cuda_vs_ort_cpu"] = torch_cuda_vs_ort(preset, bundle)
            else:
                entry["tensorrt"] = "absent, and no CUDA device: checks only"
        except Exception as exc:  # noqa: BLE001 - report and go on to the next preset
            entry["error"] = repr(exc)
            entry["traceback"] = traceback.format_exc()[-4000:]
            log(f"{preset}: ERROR {exc!r}")
        result["wall_s"] = round(time.perf_counter() - start, 1)
        (out / "device_check.json").write_text(json.dumps(result, indent=1, default=str))  # partial results
    result["wall_s"] = round(time.perf_counter() - start, 1)
    (out / "device_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "device_check.md").write_text(summary(result))
    print(summary(result))
    failed = any("error" in e for e in result["presets"].values())
    return 1 if failed else 0


def summary(result: dict) -> str:
    env = result["environment"]
    lines = [f"# device check ({result.get('wall_s')} s)", "",
             f"GPU: {env.get('gpu', 'none')} (sm {env.get('compute_capability', '-')}); torch {env.get('torch')}; "
             f"onnxruntime {env.get('onnxruntime')}; TensorRT {env.get('tensorrt') or 'absent'}; polygraphy "
             f"{env.get('polygraphy') or 'absent'}; cuda-python {env.get('cuda_python') or 'absent'}", ""]
    if "cuda_layer" in result:
        lines += [f"CUDA layer (engines/cuda_rt.py): {result['cuda_layer']}", ""]
    for preset, entry in result["presets"].items():
        lines.append(f"## {preset}")
        if "skipped" in entry:
            lines.append(f"skipped: {entry['skipped']}")
            continue
        if "error" in entry:
            lines.append(f"ERROR: {entry['error']}")
        checks = entry.get("checks", {})
        for g in checks.get("graphs", []):
            lines.append(f"- {g['graph']}: TensorRT op/QDQ check {'ok' if g['ok'] else 'FAIL ' + str(g['errors'][:3])}")
        if checks:
            lines.append(f"- uncovered runtime shapes: {len(checks.get('uncovered_shapes', []))}")
        rows = entry.get("torch_cuda_vs_ort_cpu")
        if rows:
            lines += ["", "| component | torch CUDA ms | ORT CPU ms | parity | worst cosine | worst max abs |",
                      "|---|---|---|---|---|---|"]
            for r in rows:
                cos = min(o.get("cosine", 0) for o in r["outputs"].values())
                err = max(o.get("max_abs_err", 0) for o in r["outputs"].values())
                lines.append(f"| {r['component']} | {r['torch_cuda_ms']} | {r['ort_cpu_ms']} | "
                             f"{'ok' if r['ok'] else 'MISS'} | {cos:.7f} | {err:.2e} |")
        trt = entry.get("tensorrt")
        if isinstance(trt, dict):
            lines.append(f"- engines built in {trt.get('build_s')} s")
            for c in trt.get("compare", []):
                lines.append(f"- {c['component']}: TensorRT vs onnxruntime ({c['via']}) {'ok' if c['ok'] else 'MISS'}")
            for backend, t in trt.get("generate_256", {}).items():
                lines.append(f"- generate 256x256 on {backend}: {t['total_s']} s ({t['steps']} steps)")
        elif trt:
            lines.append(f"- TensorRT: {trt}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
