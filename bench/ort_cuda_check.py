"""The onnxruntime CUDA backend against onnxruntime CPU, on bundles already exported:
``python bench/ort_cuda_check.py OUTDIR --bundle nano=PATH [--bundle tiny=PATH] [--repeats 3]``.

Needs onnxruntime-gpu (its CUDAExecutionProvider) and a GPU; numpy, pillow, tokenizers (the runtime's own needs)
and nothing else: no torch. What it checks, each on both backends with the same inputs:

- every graph of the bundle (``OrtCudaEngine.run``: device inputs, IO binding) on the inputs a CPU run recorded
  (the body's prefill and a decode step with its cache, the heads, the encoders, the decoders, the diffusion
  graphs), with the figures of ``export.components.compare_arrays``;
- the runtime end to end: greedy text to image (the body's step ``OrtCudaStep``: KV cache on the GPU, bound by
  pointer), several images in one batch, parallel (Jacobi) decoding, understanding, editing, the diffusion
  refinement, and several threads sharing one Pipeline: codes, answers and pictures of the CUDA backend against
  the CPU backend's (and, for the batch, the threads and parallel decoding, against the CUDA backend's own
  one-by-one results, which must be equal);
- on an illume-nano bundle, the held-out prompt scorer (``nano.heldout.PromptScorer``) on both backends;
- wall time of each task on both backends (median of ``--repeats`` after one warm-up).

Writes ``ort_cuda_check.json`` and ``ort_cuda_check.md`` into OUTDIR. Runs from a checkout without installing it.
``--backend``/``--against`` pick the two backends (``ort-cpu`` for both checks the script itself without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECORDED_CALLS = 2  # per graph: the body's prefill and its first decode step (with a cache); others' first two
PROMPTS = ("a red circle at the top left on a blue background", "a small green square at the center on a white "
           "background", "a large yellow triangle at the bottom right on a black background")
QUESTION = "What color is the shape?"
EDIT = "make the shape blue"


def _import_project():
    """``illume_rt.*`` from this checkout, installed or not (as bench/device_check.py: a standalone script cannot
    import it from there before this has run)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import illume_rt

    if str(ROOT) not in list(illume_rt.__path__):
        illume_rt.__path__.append(str(ROOT))


class Recorder:
    """An Engine that keeps the first RECORDED_CALLS inputs and outputs of the one it wraps."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.calls: list[tuple[dict, list]] = []

    def run(self, feeds, out=None):
        outputs = self.inner.run(feeds)
        if len(self.calls) < RECORDED_CALLS:
            self.calls.append(({k: np.array(v, copy=True) for k, v in feeds.items()},
                               [np.array(o, copy=True) for o in outputs]))
        return outputs


def greedy(pipe, task: str = "text_to_image", **changes):
    return replace(pipe.default_sampling(task), greedy=True, **changes)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def codes_agree(a, b) -> float:
    """Fraction of code positions (semantic then pixel) where two generations chose the same code."""
    x = np.concatenate([a.semantic.ravel(), a.pixel.ravel()])
    y = np.concatenate([b.semantic.ravel(), b.pixel.ravel()])
    return float(np.mean(x == y))


def flows(pipe, refine: bool):
    """The tasks both backends run: name -> callable returning a comparable result."""
    from PIL import Image

    source = Image.fromarray(pipe.generate(PROMPTS[0], seed=0, sampling=greedy(pipe)).image)
    out = {
        "generate_greedy": lambda: pipe.generate(PROMPTS[0], seed=0, sampling=greedy(pipe)),
        "generate_sampled": lambda: pipe.generate(PROMPTS[1], seed=3),
        "understand": lambda: pipe.understand(source, QUESTION, max_new_tokens=16),
        "edit_greedy": lambda: pipe.edit(source, EDIT, seed=0, sampling=greedy(pipe, "editing")),
    }
    if refine:
        out["generate_refined"] = lambda: pipe.generate(PROMPTS[2], seed=1, sampling=greedy(pipe),
                                                        refine=pipe.default_refine())
    return out


def compare_results(name: str, got, want) -> dict:
    if name == "understand":
        return {"same_answer": got.text == want.text, "answer": got.text, "reference_answer": want.text}
    return {"codes_agree": round(codes_agree(got.tokens, want.tokens), 4),
            "image_psnr_db": round(psnr(got.image, want.image), 2)}


def graph_parity(reference, pipe, refine: bool) -> list[dict]:
    """Record each graph's inputs on ``reference`` (all its flows once), replay them on ``pipe``'s engines."""
    from illume_rt.export.components import Tolerance, compare_arrays

    names = list(reference.bundle.manifest["components"])
    recorders = {}
    for name in names:
        recorders[name] = Recorder(reference.engines[name])
        reference.replace_engine(name, recorders[name])
    try:
        for run in flows(reference, refine).values():
            run()
    finally:
        for name, recorder in recorders.items():
            reference.replace_engine(name, recorder.inner)
    tol = Tolerance(atol=1e-3, rtol=1e-3, min_cosine=0.9999)
    rows = []
    for name, recorder in recorders.items():
        for call, (feeds, want) in enumerate(recorder.calls):
            t0 = time.perf_counter()
            got = pipe.engines[name].run(feeds)
            ms = (time.perf_counter() - t0) * 1e3
            figures = {o: compare_arrays(np.asarray(g), w, tol) for o, g, w in zip(recorder.output_names, got, want)}
            rows.append({"graph": name, "call": call, "shapes": {k: list(v.shape) for k, v in feeds.items()
                                                                   if not k.startswith("past_")},
                         "ok": all(f["ok"] for f in figures.values()), "first_run_ms": round(ms, 2),
                         "worst_cosine": min(f.get("cosine", 0.0) for f in figures.values()),
                         "worst_max_abs": max(f.get("max_abs_err", float("inf")) for f in figures.values())})
    return rows


def end_to_end(reference, pipe, refine: bool) -> dict:
    want = {name: run() for name, run in flows(reference, refine).items()}
    got = {name: run() for name, run in flows(pipe, refine).items()}
    section = {name: compare_results(name, got[name], want[name]) for name in want}
    # the GPU backend against itself: a batch, parallel decoding and threads must give the one-by-one results
    solo = [pipe.generate(p, seed=0, sampling=greedy(pipe)) for p in PROMPTS]
    batch = pipe.generate(list(PROMPTS), seed=0, sampling=greedy(pipe))
    # a list of prompts gives image i the seed seed + i: greedy codes do not depend on it
    section["batch_equals_one_by_one"] = all(codes_agree(b.tokens, s.tokens) == 1.0 for b, s in zip(batch, solo))
    parallel = pipe.generate(PROMPTS[0], seed=0, sampling=greedy(pipe, parallel_window=8))
    section["parallel_decoding_equals_sequential"] = codes_agree(parallel.tokens, solo[0].tokens) == 1.0
    section["parallel_decoding_body_calls"] = {"parallel": parallel.tokens.steps, "sequential": solo[0].tokens.steps}
    results: dict[int, object] = {}
    errors: list[str] = []

    def worker(i: int) -> None:
        try:
            results[i] = pipe.generate(PROMPTS[i], seed=0, sampling=greedy(pipe))
        except Exception as exc:  # noqa: BLE001 - reported in the figures
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    section["threads_equal_one_by_one"] = not errors and all(
        codes_agree(results[i].tokens, solo[i].tokens) == 1.0 for i in range(len(PROMPTS)))
    section["thread_errors"] = errors
    return section


def timings(pipes: dict, refine: bool, repeats: int) -> dict:
    out: dict = {}
    for backend, pipe in pipes.items():
        tasks = flows(pipe, refine)
        tasks.pop("generate_sampled")
        for name, run in tasks.items():
            run()  # warm-up: sessions, allocations, cuDNN algorithm choice
            spans = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                spans.append(time.perf_counter() - t0)
            out.setdefault(name, {})[backend] = round(statistics.median(spans) * 1e3, 1)
        stages = pipe.generate(PROMPTS[0], seed=0, sampling=greedy(pipe)).timings
        out.setdefault("generate_greedy_stages_ms", {})[backend] = {k: round(v * 1e3, 1) for k, v in stages.items()}
    for task, row in out.items():
        names = list(row)
        if len(names) == 2 and not task.endswith("_stages_ms"):
            row["ratio"] = round(row[names[1]] / row[names[0]], 2)  # against / backend: the speed-up
    return out


def first_calls(path: str, backend: str, refine: bool) -> dict:
    """Wall time of a fresh Pipeline's first two greedy generations (with refinement when the bundle has it), and
    of another fresh Pipeline's first one after ``warm_up``: what the backend's first-run costs are and whether
    warming the decoders removes them."""
    from illume_rt.runtime.pipeline import Pipeline

    def generate(pipe):
        t0 = time.perf_counter()
        pipe.generate(PROMPTS[0], seed=0, sampling=greedy(pipe), refine=pipe.default_refine() if refine else None)
        return round((time.perf_counter() - t0) * 1e3, 1)

    cold = Pipeline.from_bundle(path, backend=backend)
    out = {"cold_first_ms": generate(cold), "cold_second_ms": generate(cold)}
    warm = Pipeline.from_bundle(path, backend=backend)
    t0 = time.perf_counter()
    warm.warm_up([(256, 256)], refine=refine)
    out["warm_up_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    out["warmed_first_ms"] = generate(warm)
    return out


def cudnn_search(reference, refine: bool, repeats: int = 5) -> dict:
    """The convolutional graphs under onnxruntime CUDA's three cuDNN algorithm searches (provider option
    ``cudnn_conv_algo_search``): first run and median of ``repeats`` later runs, ms, on inputs a CPU run recorded."""
    import onnxruntime as ort

    names = ["pixel_decoder"] + (["diffusion_unet", "vae_decoder"] if refine else [])
    recorders = {n: Recorder(reference.engines[n]) for n in names}
    for n, r in recorders.items():
        reference.replace_engine(n, r)
    try:
        reference.generate(PROMPTS[0], seed=0, sampling=greedy(reference))  # the pixel decoder
        if refine:  # the UNet and the VAE decoder instead of the pixel decoder
            reference.generate(PROMPTS[0], seed=0, sampling=greedy(reference),
                               refine=replace(reference.default_refine(), steps=1))
    finally:
        for n, r in recorders.items():
            reference.replace_engine(n, r.inner)
    out: dict = {}
    for name, recorder in recorders.items():
        feeds = recorder.calls[0][0]
        for search in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            session = ort.InferenceSession(str(reference.bundle.component_path(name)), providers=[
                ("CUDAExecutionProvider", {"cudnn_conv_algo_search": search}), "CPUExecutionProvider"])
            spans = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                session.run(None, feeds)
                spans.append((time.perf_counter() - t0) * 1e3)
            out.setdefault(name, {})[search] = {"first_ms": round(spans[0], 1),
                                                 "median_ms": round(statistics.median(spans[1:]), 2)}
    return out


class _Timed:
    """An Engine wrapper that sums the wall time of its calls."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.seconds, self.calls = 0.0, 0

    def run(self, feeds, out=None):
        t0 = time.perf_counter()
        result = self.inner.run(feeds)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return result


def step_profile(pipe) -> dict:
    """Where one greedy text-to-image generation's time goes: the body's steps (``run_step`` of the backend's
    step), the LM head calls, and the rest (embedding, guidance, sampling, bookkeeping), ms per body step."""
    heads = [n for n in pipe.bundle.manifest["components"] if n.startswith("lm_head_")]
    pipe.generate(PROMPTS[0], seed=0, sampling=greedy(pipe))  # warm
    step = pipe.lm.stepper  # the backend's body step (engines/llm_step.py)
    body = {"seconds": 0.0, "calls": 0}
    wrapped_step = None
    if step is not None:
        inner = step.run_step

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                body["seconds"] += time.perf_counter() - t0
                body["calls"] += 1

        step.run_step = wrapped_step = timed
    timers = {n: _Timed(pipe.engines[n]) for n in heads}
    for n, t in timers.items():
        pipe.replace_engine(n, t)
    try:
        t0 = time.perf_counter()
        result = pipe.generate(PROMPTS[0], seed=0, sampling=greedy(pipe))
        total = time.perf_counter() - t0
    finally:
        for n, t in timers.items():
            pipe.replace_engine(n, t.inner)
        if wrapped_step is not None:
            del step.run_step  # the instance attribute: the class's method again
    steps = result.tokens.steps
    head_s = sum(t.seconds for t in timers.values())
    out = {"body_steps": steps, "total_ms": round(total * 1e3, 1),
           "per_step_ms": {"body": round(body["seconds"] * 1e3 / max(body["calls"], 1), 3) if body["calls"] else None,
                           "heads": round(head_s * 1e3 / steps, 3),
                           "all": round(total * 1e3 / steps, 3)},
           "head_calls": {n: t.calls for n, t in timers.items()}, "image_decode_ms":
               round(result.timings.get("image_decode", 0.0) * 1e3, 1)}
    return out


def nano_scores(pipes: dict, prompts: int, questions: int) -> dict:
    from illume_rt.nano.heldout import PromptScorer

    out = {}
    for backend, pipe in pipes.items():
        t0 = time.perf_counter()
        out[backend] = {k: round(v, 4) for k, v in PromptScorer(prompts, questions)(pipe).items()}
        out[backend]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def environment() -> dict:
    import onnxruntime as ort

    env = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
           "ort_providers": ort.get_available_providers(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import subprocess

        env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20
                                    ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["gpu"] = None
    return env


def check_bundle(label: str, path: str, args, log) -> dict:
    from illume_rt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipes = {args.backend: Pipeline.from_bundle(path, backend=args.backend),
             args.against: Pipeline.from_bundle(path, backend=args.against)}
    pipe, reference = pipes[args.backend], pipes[args.against]
    refine = bool(reference.bundle.manifest.get("diffusion"))
    section: dict = {"bundle": path, "model": reference.bundle.manifest["model"].get("name") or label, "refine": refine}
    steps = [("graphs", lambda: graph_parity(reference, pipe, refine)),
             ("end_to_end", lambda: end_to_end(reference, pipe, refine)),
             ("timings_ms", lambda: timings({args.backend: pipe, args.against: reference}, refine, args.repeats)),
             ("first_calls", lambda: first_calls(path, args.backend, refine)),
             ("step_profile", lambda: {b: step_profile(p) for b, p in pipes.items()})]
    if args.backend == "ort-cuda":
        steps.append(("cudnn_search", lambda: cudnn_search(reference, refine)))
    if label == "nano" and args.nano_prompts:
        steps.append(("nano_scores", lambda: nano_scores(pipes, args.nano_prompts, args.nano_prompts)))
    if args.only:
        steps = [(key, step) for key, step in steps if key in args.only.split(",")]
    for key, step in steps:
        s0 = time.perf_counter()
        try:
            section[key] = step()
        except Exception as exc:  # noqa: BLE001 - one failing step must not hide the others' figures
            section[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        log(f"  {label} {key}: {time.perf_counter() - s0:.1f}s")
    section["seconds"] = round(time.perf_counter() - t0, 1)
    return section


def report(result: dict) -> str:
    env = result["environment"]
    lines = [f"# onnxruntime {result['backend']} vs {result['against']} ({result['seconds']} s)", "",
             f"command: `{result['command']}`", "",
             f"GPU: {env.get('gpu')}; onnxruntime {env['onnxruntime']} ({', '.join(env['ort_providers'])}); "
             f"Python {env['python']}; numpy {env['numpy']}; {env['cpus']} CPUs", ""]
    for label, sec in result["bundles"].items():
        lines += [f"## {label} ({sec.get('model')})", ""]
        graphs = sec.get("graphs")
        if isinstance(graphs, list):
            lines += ["| graph | call | ok | worst cosine | worst max abs | first run ms |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['graph']} | {r['call']} | {'ok' if r['ok'] else 'MISMATCH'} | {r['worst_cosine']:.7f} | "
                      f"{r['worst_max_abs']:.2e} | {r['first_run_ms']} |" for r in graphs]
        else:
            lines.append(f"graphs: {graphs}")
        lines += ["", "End to end, against the reference backend:", ""]
        e2e = sec.get("end_to_end", {})
        lines += [f"- {k}: {v}" for k, v in e2e.items()]
        tim = sec.get("timings_ms")
        if isinstance(tim, dict) and "error" not in tim:
            names = [result["backend"], result["against"]]
            lines += ["", f"| task (median ms) | {names[0]} | {names[1]} | {names[1]} / {names[0]} |",
                      "|---|---|---|---|"]
            lines += [f"| {task} | {row.get(names[0])} | {row.get(names[1])} | {row.get('ratio')} |"
                      for task, row in tim.items()]
        else:
            lines.append(f"timings: {tim}")
        for key in ("first_calls", "step_profile", "cudnn_search"):
            if key in sec:
                lines += ["", f"{key}: {json.dumps(sec[key])}"]
        if "nano_scores" in sec:
            lines += ["", f"nano held-out scorer: {sec['nano_scores']}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--bundle", action="append", required=True, help="LABEL=PATH (label 'nano' adds scoring)")
    parser.add_argument("--backend", default="ort-cuda")
    parser.add_argument("--against", default="ort-cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nano-prompts", type=int, default=30, help="held-out prompts and questions (0: none)")
    parser.add_argument("--only", default="", help="comma-separated sections (graphs, end_to_end, timings_ms, "
                                                   "first_calls, step_profile, cudnn_search, nano_scores)")
    args = parser.parse_args(argv)
    _import_project()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    result = {"backend": args.backend, "against": args.against, "environment": environment(), "bundles": {},
              "command": "python bench/ort_cuda_check.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    log(f"environment: {result['environment']}")
    for spec in args.bundle:
        label, _, path = spec.partition("=")
        try:
            result["bundles"][label] = check_bundle(label, path, args, log)
        except Exception as exc:  # noqa: BLE001
            result["bundles"][label] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "ort_cuda_check.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "ort_cuda_check.md").write_text(report(result))
    log("done")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
