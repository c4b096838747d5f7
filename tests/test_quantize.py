"""Calibration and INT8/FP8 quantization of the tiny bundle: recipes, gates, manifest, and the runtime on the result.

Small calibration/evaluation plans keep this file near a minute on 2 cores; the default plans (what the CLI uses)
are exercised by `illume-rt quantize` (docs/quantization.md has their figures)."""

import json

import numpy as np
import pytest

pytest.importorskip("modelopt.onnx.quantization", reason="quantization needs the quant extra (nvidia-modelopt)")

from conftest import TEST_THREADS  # noqa: E402

from illume_rt.calibration import accuracy, datasets, recipes  # noqa: E402
from illume_rt.calibration.quantize import QuantizationError, quantize_bundle, summary_lines  # noqa: E402
from illume_rt.runtime.options import SamplingConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def calibration_images_made_here(tmp_path_factory):
    """Calibration adds the example photos of a folder outside the repository when it exists; here it gets an empty
    one, so every machine (CI included) calibrates and evaluates on the same synthetic images of
    calibration/datasets.py, made in code."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "EXAMPLES", tmp_path_factory.mktemp("no-example-photos"))
        patch.setattr(datasets, "capture", _once_per_plan(datasets.capture))
        patch.setattr(accuracy, "record_eval", _once_per_plan(accuracy.record_eval))
        yield


def _once_per_plan(run):
    """``run(pipe, plan, ...)`` (the FP32 calibration capture, the held-out evaluation record) done once per source
    bundle and plan in this file, a deep copy of that result for each quantization: every quantization here starts
    from the same FP32 tiny bundle with the same small plans, on one thread, so each would capture exactly the same
    feeds and outputs again (quantize_bundle consumes its copy)."""
    import copy

    done = {}

    def once(pipe, plan, *args, **kwargs):
        key = (str(pipe.bundle.path), json.dumps(plan.to_dict(), sort_keys=True), args, tuple(sorted(kwargs.items())))
        if key not in done:
            done[key] = run(pipe, plan, *args, **kwargs)
        return copy.deepcopy(done[key])

    return once


def small_plans():
    cal = datasets.CalibrationPlan(generate=[("a cat with a hat", (256, 256), 0), ("a red fox, watercolor", (256, 256), 1)],
                                   understand=[(0, "What is in this image?")], refine=[0], refine_steps=1,
                                   llm_samples_per_run=8, decoder_samples=1, max_images=2, max_new_tokens=6)
    # two held-out images: the first refined (diffusion UNet + VAE), the second through the pixel decoder
    ev = datasets.CalibrationPlan(generate=[("a busy street", (256, 256), 100), ("a quiet lake", (256, 256), 101)],
                                  understand=[(-1, "Describe it.")],
                                  refine=[0], refine_steps=1, llm_samples_per_run=10 ** 9, decoder_samples=0,
                                  max_images=3, max_new_tokens=6, seed=100)
    return cal, ev


def _quantize(src, dst, precision, target, **kw):
    cal, ev = small_plans()
    return quantize_bundle(src, dst, precision, target, threads=TEST_THREADS, calibration=cal, evaluation=ev,
                           log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def int8_cpu(tiny_bundle, tmp_path_factory):
    dst = tmp_path_factory.mktemp("quant") / "tiny-int8-cpu"
    return dst, _quantize(tiny_bundle, dst, "int8", "ort-cpu")


@pytest.fixture(scope="module")
def fp8_trt(tiny_bundle, tmp_path_factory):
    dst = tmp_path_factory.mktemp("quant") / "tiny-fp8-trt"
    return dst, _quantize(tiny_bundle, dst, "fp8", "tensorrt", components=["llm", "pixel_decoder", "vae_decoder"])


@pytest.fixture(scope="module")
def int8_trt(tiny_bundle, tmp_path_factory):
    dst = tmp_path_factory.mktemp("quant") / "tiny-int8-trt"
    return dst, _quantize(tiny_bundle, dst, "int8", "tensorrt", components=["llm", "pixel_decoder"])


@pytest.fixture(scope="module")
def fp16_trt(tiny_bundle, tmp_path_factory):
    dst = tmp_path_factory.mktemp("quant") / "tiny-fp16-trt"
    return dst, _quantize(tiny_bundle, dst, "fp16", "tensorrt", components=["llm", "pixel_decoder"])


@pytest.fixture(scope="module")
def bf16_trt(tiny_bundle, tmp_path_factory):
    dst = tmp_path_factory.mktemp("quant") / "tiny-bf16-trt"
    return dst, _quantize(tiny_bundle, dst, "bf16", "tensorrt", components=["llm", "vae_decoder"])


def _qdq(path):
    import onnx

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    zero_point_types = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            zero_point_types.add(inits[node.input[2]].data_type)
    return model, zero_point_types


def test_int8_cpu_bundle_manifest(int8_cpu, tiny_bundle):
    import onnx

    dst, manifest = int8_cpu
    on_disk = json.loads((dst / "manifest.json").read_text())
    assert on_disk["quantization"]["status"] == "passed" == manifest["quantization"]["status"]
    comps = on_disk["components"]
    for name in recipes.QUANTIZED:
        entry = comps[name]
        assert entry["precision"] == "int8", name
        q = entry["quantization"]
        assert q["target"] == "ort-cpu" and q["tool"] == "onnxruntime.quantization" and q["passed"]
        assert q["calibration_samples"] > 0 and q["graph"]["qdq_nodes"].get("QuantizeLinear", 0) > 0
        assert q["accuracy"]["worst_cosine"] >= on_disk["quantization"]["thresholds"]["cosine"]
        _, zps = _qdq(dst / entry["file"])
        assert zps == {onnx.TensorProto.UINT8, onnx.TensorProto.INT8} or onnx.TensorProto.UINT8 in zps, (name, zps)
    for name in ("lm_head_text", "lm_head_semantic", "lm_head_pixel", "token_map"):
        assert comps[name]["precision"] == "fp32" and comps[name]["kept_fp32"]
    llm = comps["llm"]["quantization"]
    assert llm["recipe"].startswith("int8-smoothquant0.5")
    assert len(llm["graph"]["smoothquant"]["smoothed"]) == 3 * 2  # qkv, gate/up, down per layer (2 layers)
    tf = llm["accuracy"]["teacher_forced"]
    assert set(tf) == {"semantic", "pixel", "answer"} and all(v["positions"] > 0 for v in tf.values())
    assert "psnr_db" in comps["pixel_decoder"]["accuracy"] and "psnr_db" in comps["vae_decoder"]["accuracy"]
    # the refinement end to end: both held-out generated pictures' codes, through the quantized UNet and VAE
    refinement = on_disk["quantization"]["refinement"]
    assert refinement["quantized"] == ["diffusion_unet", "vae_decoder"] and refinement["pictures"] == 2
    assert refinement["worst_psnr_db"] >= refinement["limit_psnr_db"] and not refinement["failures"]
    assert any(line.startswith("  refinement (") for line in summary_lines(manifest))
    cal = on_disk["quantization"]["calibration"]
    assert cal["generate"][0]["seed"] == 0 and cal["samples"]["llm"] > 2 and cal["images"]
    # the source bundle is untouched and the LM heads are byte-identical
    src = json.loads((tiny_bundle / "manifest.json").read_text())
    assert src["components"]["llm"]["precision"] == "fp32"
    assert comps["lm_head_pixel"]["sha256"] == src["components"]["lm_head_pixel"]["sha256"]
    assert comps["llm"]["sha256"] != src["components"]["llm"]["sha256"]
    assert any("llm" in line for line in summary_lines(manifest))


def test_vae_only_refinements_feed_the_vae_decoder_and_nothing_else(tiny_pipe):
    from dataclasses import replace

    cal, _ = small_plans()
    plain, _ = datasets.capture(tiny_pipe, cal, log=lambda m: None)
    more = replace(cal, vae_only_refine=[("a tall lighthouse", (256, 256), 7), ("two blue cups", (256, 256), 8)])
    feeds, record = datasets.capture(tiny_pipe, more, log=lambda m: None)
    assert len(feeds["vae_decoder"]) == len(plain["vae_decoder"]) + 2
    assert [p["prompt"] for p in record["vae_only_refine"]] == ["a tall lighthouse", "two blue cups"]
    for name in set(plain) | set(feeds):  # every other graph is calibrated on exactly the feeds it had
        if name != "vae_decoder":
            assert len(feeds[name]) == len(plain[name]), name
            for a, b in zip(feeds[name], plain[name]):
                assert all(np.array_equal(a[k], b[k]) for k in a), name
    # the extra latents are the refinements' own: different from the plan's, one per prompt
    extra = feeds["vae_decoder"][len(plain["vae_decoder"]):]
    assert not any(np.array_equal(next(iter(e.values())), next(iter(f.values())))
                   for e in extra for f in plain["vae_decoder"])
    # without the diffusion graphs asked for, nothing is refined; without the VAE decoder, not these 20-step runs
    none, _ = datasets.capture(tiny_pipe, more, log=lambda m: None, refinements=False)
    assert "vae_decoder" not in none
    unet_only, record = datasets.capture(tiny_pipe, more, log=lambda m: None, vae_refinements=False)
    assert len(unet_only["vae_decoder"]) == len(plain["vae_decoder"]) and "vae_only_refine" not in record


def test_runtime_generates_with_int8_cpu_bundle(int8_cpu, tiny_pipe):
    from illume_rt.runtime.pipeline import Pipeline

    dst, _ = int8_cpu
    pipe = Pipeline.from_bundle(dst, threads=TEST_THREADS)
    got = pipe.generate("a cat with a hat", (256, 256), seed=3, sampling=SamplingConfig(greedy=True))
    want = tiny_pipe.generate("a cat with a hat", (256, 256), seed=3, sampling=SamplingConfig(greedy=True))
    assert got.image.shape == want.image.shape == (256, 256, 3)
    # quantized, so not identical, but the same picture: most greedy codes agree on this model
    assert np.mean(got.tokens.pixel == want.tokens.pixel) > 0.5


def test_fp8_tensorrt_bundle_is_standard_qdq_and_runs(fp8_trt):
    import onnx

    from illume_rt.runtime.pipeline import Pipeline

    dst, manifest = fp8_trt
    assert manifest["quantization"]["status"] == "passed"
    entry = manifest["components"]["llm"]
    assert entry["precision"] == "fp8" and entry["quantization"]["tool"] == "nvidia-modelopt"
    model, zps = _qdq(dst / entry["file"])
    assert zps == {onnx.TensorProto.FLOAT8E4M3FN}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no custom (trt / com.microsoft) domains
    assert manifest["components"]["semantic_encoder"]["precision"] == "fp32"  # not in `components`
    pipe = Pipeline.from_bundle(dst, threads=TEST_THREADS)  # precision fp8 -> session.disable_quant_qdq=1
    result = pipe.generate("two green squares", (256, 256), seed=1)
    assert result.image.shape == (256, 256, 3) and result.image.std() > 0


def test_missed_gate_fails_unless_keep_failed(tiny_bundle, tmp_path):
    strict = {"llm_top1": 1.01, "llm_kl": 0.0, "cosine": 1.01, "psnr_db": 1e9}
    dst = tmp_path / "strict"
    with pytest.raises(QuantizationError, match="gate"):
        _quantize(tiny_bundle, dst, "int8", "tensorrt", components=["llm"], thresholds=strict)
    assert not dst.exists() and not list(tmp_path.glob(".strict*"))  # nothing half-written left behind
    manifest = _quantize(tiny_bundle, dst, "int8", "tensorrt", components=["llm"], thresholds=strict,
                         keep_failed=True)
    on_disk = json.loads((dst / "manifest.json").read_text())
    assert manifest["quantization"]["status"] == on_disk["quantization"]["status"] == "failed"
    assert on_disk["components"]["llm"]["quantization"]["passed"] is False
    assert on_disk["quantization"]["failures"]
    _, zps = _qdq(dst / on_disk["components"]["llm"]["file"])
    import onnx

    assert zps == {onnx.TensorProto.INT8}  # tensorrt flavour: signed symmetric


def test_a_refinement_that_misses_end_to_end_fails_and_names_the_graphs(tiny_bundle, tmp_path):
    """Graph gates that pass while the refined picture misses its end-to-end gate (set out of reach here): nothing is
    written, the line names the refinement, and the hint leaves both chain graphs FP32 (neither passes alone)."""
    lenient = {"llm_top1": 0.0, "llm_kl": 1e9, "cosine": -1.0, "psnr_db": -1e9, "refine_psnr_db": 1e9}
    dst = tmp_path / "refine-miss"
    with pytest.raises(QuantizationError) as caught:
        _quantize(tiny_bundle, dst, "int8", "ort-cpu", components=["pixel_decoder", "diffusion_unet", "vae_decoder"],
                  thresholds=lenient)
    message = str(caught.value)
    assert "refinement (diffusion_unet + vae_decoder quantized, 1 steps): worst picture PSNR" in message, message
    assert "leave diffusion_unet, vae_decoder in FP32: --components pixel_decoder" in message, message
    assert not dst.exists() and not list(tmp_path.glob(".refine-miss*"))
    # without the refinement's graphs, the same thresholds pass: the gate is on the chain, not on pixel_decoder
    manifest = _quantize(tiny_bundle, dst, "int8", "ort-cpu", components=["pixel_decoder"], thresholds=lenient)
    assert manifest["quantization"]["status"] == "passed" and manifest["quantization"]["refinement"] is None


def test_the_graph_that_misses_the_refinement_alone_is_the_one_blamed():
    from illume_rt.calibration import quantize

    class FakePipe:  # accuracy.refinement_figures swaps engines in and runs refine_image: the PSNR follows the swap
        def __init__(self):
            self.swapped, self.engines = set(), self

        def replace_engine(self, name, engine):
            self.swapped.add(name)

        def close(self, name):
            self.swapped.discard(name)

        def refine_image(self, semantic, pixel, grid, config, rng):
            error = 0.3 if "vae_decoder" in self.swapped else 0.001  # the VAE alone ruins it
            return np.full((3, 4, 4), error, np.float32), {}

    from illume_rt.runtime.refine import RefineConfig

    refs = [{"semantic": None, "pixel": None, "grid": None, "config": RefineConfig(), "seed": 0,
             "image": np.zeros((3, 4, 4), np.float32)}]
    results = {"llm": {"passed": True}, "diffusion_unet": {"passed": True}, "vae_decoder": {"passed": True}}
    figures = quantize._refinement_gate(FakePipe(), results, refs, 30.0, lambda name: object())
    assert figures["failures"] and figures["alone"]["vae_decoder"] < 30.0 <= figures["alone"]["diffusion_unet"]
    assert results["vae_decoder"]["blamed_for_refinement"] and "blamed_for_refinement" not in results["diffusion_unet"]
    assert quantize._fp32_hint(results) == "; or leave vae_decoder in FP32: --components llm,diffusion_unet"


def test_a_decoded_picture_is_gated_on_psnr_and_other_graphs_on_cosine():
    """Pictures are gated on PSNR against FP32, their cosine only reported (a picture near mid-gray reads a low
    cosine for a small error: illume-nano's VAE picture, 0.905 at 33.2 dB); every other graph on its cosine."""
    from illume_rt.calibration.quantize import _gate

    limits = {"cosine": 0.99, "psnr_db": 30.0, "llm_top1": 0.9, "llm_kl": 0.1}
    near_gray = {"worst_cosine": 0.905, "psnr_db": 33.2}
    assert _gate("vae_decoder", near_gray, limits) == []
    assert _gate("vae_decoder", {**near_gray, "psnr_db": 29.0}, limits) == ["vae_decoder: PSNR 29.00 dB < 30.0"]
    assert _gate("diffusion_unet", {"worst_cosine": 0.905}, limits) == [
        "diffusion_unet: worst cosine 0.90500 < 0.99"]


def test_a_missed_gate_names_the_graphs_to_leave_in_fp32():
    from illume_rt.calibration.quantize import _fp32_hint

    results = {"llm": {"passed": True}, "vae_decoder": {"passed": False}, "pixel_decoder": {"passed": True}}
    assert _fp32_hint(results) == "; or leave vae_decoder in FP32: --components llm,pixel_decoder"
    assert _fp32_hint({"llm": {"passed": False}}) == ""  # nothing passed: nothing to keep
    assert _fp32_hint({"llm": {"passed": True}}) == ""


def _registries_as_shipped():
    """onnxruntime.quantization.registry executed afresh under another name: the op registries as onnxruntime
    defines them, whatever any quantization earlier in this process did to the loaded module."""
    import importlib.util

    import onnxruntime.quantization.registry as loaded

    spec = importlib.util.spec_from_file_location("onnxruntime.quantization._registry_as_shipped", loaded.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh


def test_tensorrt_then_ort_cpu_in_one_process(tiny_bundle, tmp_path):
    """ModelOpt (tensorrt target) patches onnxruntime.quantization process-wide; an ort-cpu INT8 quantization
    after it in the same process failed ("Quantization parameters are not specified for param layer_norm") until
    each ModelOpt call put onnxruntime.quantization back (calibration/ort_state.py)."""
    import onnxruntime.quantization.calibrate as calibrate
    import onnxruntime.quantization.registry as registry

    comp = ["semantic_encoder"]  # has LayerNormalization, which ModelOpt re-registers; small and fast
    trt = _quantize(tiny_bundle, tmp_path / "trt", "int8", "tensorrt", components=comp, keep_failed=True)
    shipped = _registries_as_shipped()
    for name in ("QDQRegistry", "QLinearOpsRegistry", "IntegerOpsRegistry"):
        assert getattr(registry, name) == getattr(shipped, name), name
    patched = [f"{owner.__name__}.{key}" for owner in (calibrate, calibrate.CalibraterBase, calibrate.MinMaxCalibrater,
                                                      calibrate.HistogramCalibrater, calibrate.HistogramCollector)
               for key, value in vars(owner).items() if getattr(value, "__module__", "").startswith("modelopt")]
    assert not patched
    cpu = _quantize(tiny_bundle, tmp_path / "cpu", "int8", "ort-cpu", components=comp, keep_failed=True)
    for manifest in (trt, cpu):
        assert manifest["components"]["semantic_encoder"]["quantization"]["accuracy"]["worst_cosine"] > 0.9
    _, zps = _qdq(tmp_path / "cpu" / cpu["components"]["semantic_encoder"]["file"])
    import onnx

    assert onnx.TensorProto.UINT8 in zps  # onnxruntime's own U8S8, not ModelOpt's signed activations


def test_ort_quantization_state_kept_undoes_patches_also_on_error():
    """What ModelOpt's configure_ort does, by hand: the context puts it all back even when the call raises."""
    import onnxruntime.quantization.calibrate as calibrate
    import onnxruntime.quantization.registry as registry

    from illume_rt.calibration.ort_state import ort_quantization_state_kept

    qdq, qlinear = dict(registry.QDQRegistry), dict(registry.QLinearOpsRegistry)
    create, collect = calibrate.create_calibrator, calibrate.MinMaxCalibrater.collect_data
    with pytest.raises(RuntimeError, match="modelopt failed"):
        with ort_quantization_state_kept():
            registry.QDQRegistry["LayerNormalization"] = object
            del registry.QLinearOpsRegistry["Relu"]
            calibrate.create_calibrator = lambda *a, **k: None
            calibrate.MinMaxCalibrater.collect_data = lambda self, reader: None
            calibrate.MinMaxCalibrater.added_by_the_call = 1
            raise RuntimeError("modelopt failed")
    assert registry.QDQRegistry == qdq and registry.QLinearOpsRegistry == qlinear
    assert calibrate.create_calibrator is create and calibrate.MinMaxCalibrater.collect_data is collect
    assert not hasattr(calibrate.MinMaxCalibrater, "added_by_the_call")


def test_smoothquant_keeps_the_function(tiny_bundle, tmp_path):
    """The migration of scales must not change the FP32 graph's outputs (it only moves range around)."""
    import onnxruntime as ort

    from illume_rt.calibration.recipes import smoothquant
    from illume_rt.export.configs import get_preset
    from illume_rt.export.llm import llm_component

    comp = llm_component(get_preset("tiny"), None)
    feeds = [comp.make_inputs(comp.sample_dims(i), np.random.default_rng(i)) for i in (0, 1)]
    out = tmp_path / "smooth.onnx"
    report = smoothquant(tiny_bundle / "llm.onnx", out, feeds, 0.5, TEST_THREADS)
    assert len(report["smoothed"]) == 6 and any(abs(r["scale_range"][1] - 1) > 0.05 for r in report["smoothed"])
    a = ort.InferenceSession(str(tiny_bundle / "llm.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feed in feeds:
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_quantize_cli_arguments():
    from illume_rt.cli import build_parser

    args = build_parser().parse_args(["quantize", "B", "--precision", "fp8", "--target", "ort-cpu", "-o", "O",
                                      "--keep-failed"])
    assert (args.precision, args.target, args.output, args.keep_failed) == ("fp8", "ort-cpu", "O", True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "B", "--precision", "int4", "-o", "O"])
    args = build_parser().parse_args(["quantize", "B", "--precision", "bf16", "-o", "O"])
    assert (args.precision, args.target, args.high_precision) == ("bf16", "tensorrt", None)


# -- the chain: export (tiny_bundle) -> quantize --target tensorrt -> build-engines --check-only, every precision ----

def _elem_types(model) -> dict:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
def test_tensorrt_bundle_of_each_precision_passes_the_engine_check(precision, request, capsys):
    """Issue 12: every precision's TensorRT bundle must be accepted by `build-engines --check-only` (the INT8/FP8
    ones were refused: per-channel weight quantizers taken for activations), carry its precision in the graphs
    (TensorRT 11 is strongly typed), and keep FP32 where accuracy needs it."""
    import onnx

    from illume_rt.cli import main
    from illume_rt.engines.checks import check_bundle
    from illume_rt.engines.tensorrt_build import plan_build
    from illume_rt.runtime.bundle import load_bundle

    dst, manifest = request.getfixturevalue(f"{precision}_trt")
    assert manifest["quantization"]["status"] == "passed" and manifest["quantization"]["precision"] == precision
    assert main(["build-engines", str(dst), "--check-only", "--precision", precision]) == 0
    assert "checks passed" in capsys.readouterr().out
    bundle = load_bundle(dst)
    assert all(r.ok for r in check_bundle(bundle))

    low = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
    for name in manifest["quantization"]["components"]:
        entry = manifest["components"][name]
        q = entry["quantization"]
        assert entry["precision"] == precision and q["target"] == "tensorrt" and q["passed"]
        key, _ = plan_build(bundle, name)
        assert key.precision == precision and key.build["flags"] == [] and key.build["strongly_typed"]
        model = onnx.load(str(dst / entry["file"]))
        types = _elem_types(model)
        for value in (*model.graph.input, *model.graph.output):  # IO stays as exported
            assert value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64), value.name
        want_low = low.get(precision) or low[q["high_precision"]]
        assert any(t == want_low for t in types.values()), f"{name}: no {precision} tensors: not converted"
        if precision in low:  # AutoCast: softmax and norm reductions stay FP32
            kept = [n for n in model.graph.node if n.op_type in ("Softmax", "ReduceMean", "InstanceNormalization")]
            assert kept and all(types.get(n.output[0]) == onnx.TensorProto.FLOAT for n in kept), name
            assert q["accuracy"]["evaluated_on"].startswith("onnxruntime CPU")
        else:  # Q/DQ with FP16 high precision; per-channel weight scales (what the engine check used to refuse)
            assert q["high_precision"] == "fp16" and manifest["quantization"]["high_precision"] == "fp16"
            inits = {i.name: i for i in model.graph.initializer}
            per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                           and n.input[1] in inits and int(np.prod(inits[n.input[1]].dims)) > 1]
            assert per_channel or precision == "fp8", name  # INT8 weights per channel; FP8 per tensor
    for head in ("lm_head_text", "lm_head_semantic", "lm_head_pixel"):  # logits stay FP32
        assert manifest["components"][head]["precision"] == "fp32"


def test_float_and_high_precision_options_refuse_bad_combinations(tiny_bundle, tmp_path, capsys):
    from illume_rt.cli import main

    assert main(["quantize", str(tiny_bundle), "--precision", "bf16", "--target", "ort-cpu",
                 "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use --target tensorrt" in err
    assert main(["quantize", str(tiny_bundle), "--precision", "fp16", "--high-precision", "bf16",
                 "-o", str(tmp_path / "x")]) == 2
    assert "int8/fp8 only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    r = recipes.recipe_for("llm", "int8", "tensorrt")
    assert r.high_precision == "fp16" and r.name == "int8-smoothquant0.5-max-fp16-tensorrt"
    assert recipes.recipe_for("llm", "int8", "ort-cpu").high_precision == "fp32"
    assert recipes.recipe_for("llm", "fp8", "tensorrt", "bf16").high_precision == "bf16"
    assert "Softmax" in recipes.recipe_for("llm", "bf16", "tensorrt").keep_fp32_ops


def _rotary_angle_graph(path):
    """A graph with a rotary angle (positions x inverse frequency -> cos, sin) beside an unrelated MatMul."""
    import onnx
    from onnx import TensorProto, helper

    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    nodes = [helper.make_node("Cast", ["position_ids"], ["pos_f"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["pos_f", "axis"], ["pos_col"], name="column"),
             helper.make_node("Mul", ["pos_col", "inv_freq"], ["angle"], name="angle"),
             helper.make_node("Cos", ["angle"], ["cos"], name="cos"),
             helper.make_node("Sin", ["angle"], ["sin"], name="sin"),
             helper.make_node("MatMul", ["x", "w"], ["xw"], name="proj"),
             helper.make_node("Relu", ["xw"], ["y"], name="act")]
    graph = helper.make_graph(
        nodes, "rotary",
        [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in ("cos", "sin", "y")],
        [helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
         helper.make_tensor("inv_freq", TensorProto.FLOAT, [4], inv_freq.tolist()),
         helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return inv_freq


def test_fp16_conversion_keeps_the_rotary_angle_fp32_even_when_calibration_positions_are_short(tmp_path):
    """AutoCast keeps a node FP32 only where its reference run saw a value above 512. Calibrated on positions below
    that, the angle (about the position, in radians) would be converted, and at positions 300-400 FP16 rounds it by
    up to 0.125 rad: cos/sin wrong in the second decimal. recipes.angle_nodes keeps the whole angle chain FP32, so
    cos/sin match float64 to FP32 precision there, while the MatMul beside it is still converted."""
    import onnx
    import onnxruntime as ort

    src, dst = tmp_path / "rotary.onnx", tmp_path / "rotary.fp16.onnx"
    inv_freq = _rotary_angle_graph(src)
    assert recipes.angle_nodes(onnx.load(str(src))) == ["angle", "column", "cos", "sin", "to_float"]
    feeds = [{"position_ids": np.arange(8 * i, 8 * i + 8, dtype=np.int64),
              "x": np.ones((8, 4), np.float32)} for i in range(8)]  # positions 0-63: far below 512
    recipe = recipes.recipe_for("llm", "fp16", "tensorrt")
    info = recipes.convert_float(recipe, src, dst, feeds, tmp_path)
    assert info["angle_nodes_kept_fp32"] == 5
    converted = onnx.load(str(dst))
    assert info["casts_to_low_precision"] > 0  # the MatMul branch went FP16
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in converted.graph.initializer if i.name == "inv_freq")
    positions = np.arange(300, 400, dtype=np.int64)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    cos, sin = session.run(["cos", "sin"], {"position_ids": positions, "x": np.ones((100, 4), np.float32)})
    angle = positions[:, None].astype(np.float64) * inv_freq.astype(np.float64)[None]
    assert np.abs(cos - np.cos(angle)).max() < 1e-4 and np.abs(sin - np.sin(angle)).max() < 1e-4


def _conv_chain_graph(path):
    """x -> conv_in -> Relu -> conv_mid (+ a conditioning MatMul beside it) -> Relu -> conv_out -> y, with node names
    that say nothing of their place, as an exporter writes them. 16 channels and 3x3 kernels, MatMul dims of 16 and
    more: below that ModelOpt leaves a Conv or MatMul unquantized on purpose (its small-kernel rules)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, list(shape), rng.normal(0, 0.1, shape).astype(np.float32)
                                  .ravel().tolist())

    conv = dict(pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    nodes = [helper.make_node("Conv", ["x", "w_a"], ["a"], name="node_conv2d", **conv),
             helper.make_node("Relu", ["a"], ["a_act"], name="relu_a"),
             helper.make_node("Conv", ["a_act", "w_b"], ["b"], name="node_conv2d_12", **conv),
             helper.make_node("MatMul", ["cond", "w_t"], ["c_emb"], name="node_linear"),
             helper.make_node("Add", ["b", "c_emb"], ["bc"], name="add_c"),
             helper.make_node("Relu", ["bc"], ["b_act"], name="relu_b"),
             helper.make_node("Conv", ["b_act", "w_c"], ["y"], name="node_conv2d_1", **conv)]
    graph = helper.make_graph(
        nodes, "conv_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16]),
         helper.make_tensor_value_info("cond", TensorProto.FLOAT, [1, 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])],
        [weight("w_a", 16, 16, 3, 3), weight("w_b", 16, 16, 3, 3), weight("w_c", 16, 16, 3, 3),
         weight("w_t", 16, 16)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_the_unets_first_and_last_convolutions_stay_fp32_found_from_the_graph(tmp_path, target):
    """The diffusion UNet's INT8 recipes keep the convolution that reads the graph's input and the one that writes
    its output in high precision (recipes.KEEP_BOUNDARY_CONVS: measured on nano's decoder, worst cosine 0.944 ->
    0.9989), and quantize every other weighted node. The boundary convs are found from the structure, not by name:
    here the last conv is named ``_1`` and the MatMul beside the chain, which also reads a graph input, is not a
    convolution and is quantized. The names are an exporter's, where one kept name begins the others
    (node_conv2d, node_conv2d_1, node_conv2d_12): ModelOpt matches its exclusions as patterns at the start of a name,
    and a bare name once kept every convolution of nano's UNet in FP16 while its report claimed them quantized."""
    import onnx

    src, dst = tmp_path / "chain.onnx", tmp_path / "chain.int8.onnx"
    _conv_chain_graph(src)
    assert recipes.boundary_convs(onnx.load(str(src))) == ["node_conv2d", "node_conv2d_1"]
    recipe = recipes.recipe_for("diffusion_unet", "int8", target)
    assert recipe.keep_boundary_convs and recipe.to_dict()["keep_boundary_convs"]
    assert not recipes.recipe_for("pixel_decoder", "int8", target).keep_boundary_convs
    assert recipes.recipe_for("diffusion_unet", "fp8", "tensorrt").keep_boundary_convs
    rng = np.random.default_rng(1)
    feeds = [{name: rng.normal(size=(1, 16, 16, 16)).astype(np.float32) for name in ("x", "cond")} for _ in range(4)]
    info = recipes.quantize_graph(recipe, src, dst, feeds, threads=1, work=tmp_path)
    assert {"node_conv2d", "node_conv2d_1"} <= set(info["kept_fp32_nodes"])
    q = onnx.load(str(dst))
    dequantized = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    # the FP16 remainder of the tensorrt flavour puts a Cast between a DQ and its Conv/MatMul
    dequantized |= {n.output[0] for n in q.graph.node if n.op_type == "Cast" and n.input[0] in dequantized}
    reads_int8 = {n.name for n in q.graph.node if n.op_type in ("Conv", "MatMul") and set(n.input) & dequantized}
    assert reads_int8 == {"node_conv2d_12", "node_linear"}
    # of 4 weighted: the middle conv and the conditioning MatMul, as counted from the graph written
    assert info["quantized_nodes"] == 2 and "planned_but_left_high_precision" not in info


def _two_matmul_graph(path, width: int = 64):
    """x [rows, width] -> MatMul -> Relu -> MatMul -> y, rows dynamic (calibration feeds of varied lengths)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, list(shape),
                                  rng.normal(0, 0.2, shape).astype(np.float32).ravel().tolist())

    nodes = [helper.make_node("MatMul", ["x", "w_a"], ["a"], name="up"),
             helper.make_node("Relu", ["a"], ["a_act"], name="act"),
             helper.make_node("MatMul", ["a_act", "w_b"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "two_matmuls",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", width])],
                              [weight("w_a", width, width), weight("w_b", width, width)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def _quantize_with_one_rare_value(recipe, name: str, tmp_path):
    """Quantize the two-MatMul graph with ``recipe`` on 16 feeds of varied lengths (as the LLM's calibration
    captures them), one of which holds a single value of 50 among ~200k normal ones; return the quantize_graph info,
    the step of the input's QuantizeLinear, and the mean absolute error against FP32 on ordinary held-out inputs."""
    import onnx

    import onnxruntime as ort
    from onnx import numpy_helper

    src = tmp_path / "two.onnx"
    if not src.is_file():
        _two_matmul_graph(src)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(size=(int(rng.integers(150, 250)), 64)).astype(np.float32)} for _ in range(16)]
    feeds[5]["x"][7, 3] = 50.0  # one rare value
    held_out = [{"x": rng.normal(size=(100, 64)).astype(np.float32)} for _ in range(4)]
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    dst = tmp_path / f"{name}.onnx"
    (tmp_path / name).mkdir()
    info = recipes.quantize_graph(recipe, src, dst, feeds, threads=1, work=tmp_path / name)
    q = onnx.load(str(dst))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    step = [float(inits[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    err = np.mean([np.abs(session.run(None, f)[0] - reference.run(None, f)[0]).mean() for f in held_out])
    return info, step[0], err


def test_percentile_calibration_keeps_one_rare_value_from_setting_the_step_of_every_other(tmp_path):
    """illume-nano's INT8 ort-cpu LLM takes percentile ranges (recipes.LLM_ORT_CPU_CALIBRATION): with MinMax one
    outlier among ~200k calibrated values sets the input's quantization step, with the 99.999th percentile it does
    not, and the graph's error on ordinary inputs drops with it. Feeds of varied lengths, which onnxruntime's own
    histogram calibrators cannot stack."""
    from dataclasses import replace

    from illume_rt.calibration import streamed

    nano = recipes.recipe_for("llm", "int8", "ort-cpu", preset="nano")
    assert (nano.calibration_method, nano.percentile) == ("Percentile", recipes.CALIBRATION_PERCENTILE)
    assert nano.name == "int8-Percentile99.999-ort-cpu" and nano.to_dict()["percentile"] == 99.999
    default = recipes.recipe_for("llm", "int8", "ort-cpu")
    assert (default.calibration_method, default.percentile) == ("MinMax", None)
    assert recipes.recipe_for("vae_decoder", "int8", "ort-cpu", preset="nano").calibration_method == "MinMax"
    # the tensorrt LLM's ranges are ModelOpt's: entropy for nano (LLM_TENSORRT_CALIBRATION), max for the others
    trt_nano = recipes.recipe_for("llm", "int8", "tensorrt", preset="nano")
    assert (trt_nano.calibration_method, trt_nano.name) == ("entropy", "int8-entropy-fp16-tensorrt")
    assert recipes.recipe_for("llm", "int8", "tensorrt").calibration_method == "max"
    assert recipes.recipe_for("pixel_decoder", "int8", "tensorrt", preset="nano").calibration_method == "max"
    assert recipes.recipe_for("llm", "fp8", "tensorrt", preset="nano").calibration_method == "max"
    assert streamed.streamable(replace(trt_nano, high_precision="fp32")) is None
    assert streamed.streamable(nano) is None and streamed.streamable(default) == "ort-cpu"

    nano_graph = replace(nano, component="two_matmuls", smoothquant_alpha=None)
    info_p, step_p, err_p = _quantize_with_one_rare_value(nano_graph, "percentile", tmp_path)
    _, step_m, err_m = _quantize_with_one_rare_value(replace(nano_graph, calibration_method="MinMax", percentile=None),
                                                     "minmax", tmp_path)
    assert info_p["percentile_ranges"] == 4  # the inputs and outputs of both MatMuls: x, a, a_act, y
    assert step_m > (50.0 + 4.0) / 255  # MinMax: the outlier sets the step
    assert step_p < 10.0 / 255, (step_p, step_m)  # the 99.999th percentile of ~200k normal values is about 4.4
    assert err_p < 0.7 * err_m, (err_p, err_m)  # measured 0.073 against 0.131 (weights are 7-bit in both)


def test_entropy_calibration_keeps_one_rare_value_from_setting_the_tensorrt_step(tmp_path):
    """illume-nano's INT8 tensorrt LLM takes ModelOpt's entropy ranges (recipes.LLM_TENSORRT_CALIBRATION): with max
    one outlier sets the input's quantization step, with entropy (the histogram's KL-optimal clip) it does not, and
    the graph's error on ordinary inputs drops with it. FP32 remainder, so the figures are the Q/DQ's alone."""
    from dataclasses import replace

    nano = recipes.recipe_for("llm", "int8", "tensorrt", high_precision="fp32", preset="nano")
    graph = replace(nano, component="two_matmuls", smoothquant_alpha=None)
    _, step_e, err_e = _quantize_with_one_rare_value(graph, "entropy", tmp_path)
    _, step_m, err_m = _quantize_with_one_rare_value(replace(graph, calibration_method="max"), "max", tmp_path)
    assert step_m > 49.0 / 127  # max: the outlier sets the step (symmetric INT8)
    assert step_e < 10.0 / 127, (step_e, step_m)  # measured 0.032 (a clip near 4.1) against 0.394
    assert err_e < 0.7 * err_m, (err_e, err_m)  # measured 0.023 against 0.175
