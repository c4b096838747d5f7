"""Engines: TensorRT operator/Q-DQ checks, optimization profiles and their coverage of every runtime shape, the
engine cache and its refusals, buffer sizes, the fixed-shape (CUDA graph) decode plan, and the guarded GPU
backends. Runs without TensorRT or a GPU; the tests that need TensorRT skip with a reason."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from illume_rt.engines import engine_cache as ec
from illume_rt.engines.base import BackendError
from illume_rt.engines.checks import check_bundle, check_graph_ops, check_qdq
from illume_rt.engines.decode_graph import StaticHostStep, bucket_capacity, static_step_feeds
from illume_rt.engines.profiles import (
    BATCH_PREFILL_MAX_SEQ, DECODE_MAX_SEQ, MAX_IMAGES, Profile, ProfileError, engine_profiles, io_buffer_bytes, kv_cache_bytes,
    select_profile, uncovered_requests,
)
from illume_rt.engines.trt_ops import load_op_table, parse_operator_doc

onnx = pytest.importorskip("onnx", reason="the engine checks read graphs with onnx (the export extra)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """The tiny bundle with every graph (exported once per test session, tests/conftest.py)."""
    from illume_rt.runtime.bundle import load_bundle

    return load_bundle(tiny_bundle)


# -- operator table --------------------------------------------------------------------------------------------

def test_op_table_records_its_source_and_version():
    default = load_op_table()
    assert default.tensorrt_version == "10.15" and (default.opset_min, default.opset_max) == (9, 24)
    assert default.source["path"] == "docs/operators.md" and "10.15" in default.source["release"]
    assert "BF16" in default.get("MatMul").types and "BF16" in default.get("InstanceNormalization").types
    assert default.get("RMSNormalization").supported and not default.get("Unique").supported
    assert {"FP8", "FP4", "INT4"} <= set(default.network_types)
    table = load_op_table("10.1")
    assert table.tensorrt_version == "10.1"
    assert table.source["repository"].endswith("onnx/onnx-tensorrt") and len(table.source["commit"]) == 40
    assert (table.opset_min, table.opset_max) == (9, 20)
    assert table.get("MatMul").types == ("FP32", "FP16", "BF16")
    assert not table.get("Unique").supported
    assert "INT64" in table.get("ConstantOfShape").types  # the document's "INF64" typo is normalised
    assert "cubic" in table.errata["Resize"]["modes"]


def test_parse_operator_doc():
    doc = ("TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20.\n"
           "TensorRT supports the following ONNX data types: FLOAT32, BFLOAT16, and BOOL\n\n"
           "| Operator | Supported | Supported Types | Restrictions |\n|---|---|---|---|\n"
           "| Foo | Y | FP32, INF64 | `axes` must be an initializer |\n| Bar | N |\n")
    data = parse_operator_doc(doc)
    assert data["opset_max"] == 20 and data["network_types"] == ["FP32", "BF16", "BOOL"]
    assert data["ops"]["Foo"] == {"supported": True, "types": ["FP32", "INT64"],
                                  "restrictions": "`axes` must be an initializer"}
    assert data["ops"]["Bar"]["supported"] is False


def _model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def test_op_check_flags_unsupported_ops_types_and_restrictions():
    model = _model([helper.make_node("Unique", ["x"], ["u"]),
                    helper.make_node("MatMul", ["i", "i2"], ["m"]),
                    helper.make_node("Resize", ["x", "", "", "sz"], ["r"], mode="cubic", antialias=1),
                    helper.make_node("ReduceSum", ["x", "ax"], ["s"])],
                   [_vi("x"), _vi("i", TensorProto.INT32), _vi("i2", TensorProto.INT32), _vi("ax", TensorProto.INT64, (1,))],
                   [_vi("u"), _vi("m", TensorProto.INT32), _vi("r"), _vi("s")],
                   [numpy_helper.from_array(np.array([2, 4], np.int64), "sz")])
    report = check_graph_ops(model)
    text = "\n".join(report.errors)
    assert not report.ok
    assert "Unique" in text and "not supported" in text
    assert "is INT32" in text  # MatMul takes floats only
    assert "antialias" in text
    assert "must be a constant" in text  # ReduceSum axes from a graph input
    assert "mode 'cubic'" not in text  # the parser imports cubic (errata)


def test_every_graph_of_the_tiny_bundle_fits_tensorrt(bundle):
    reports = check_bundle(bundle)
    assert {r.graph for r in reports} == set(bundle.manifest["components"])
    for report in reports:
        assert report.ok, (report.graph, report.errors)
    assert sum(r.ops.get("Resize", 0) for r in reports) > 0  # the decoder's resizes were really looked at


# -- Q/DQ placement ----------------------------------------------------------------------------------------------

def _qdq_model(x_scale=0.1, zero=0, w_axis=1, w_scale_shape=(4,), q_feeds="DequantizeLinear", fp8=None,
               act_per_channel=False):
    w = np.random.default_rng(0).integers(-5, 5, size=(4, 4)).astype(np.int8)
    q_type = fp8 or TensorProto.INT8
    inits = [helper.make_tensor("x_scale", TensorProto.FLOAT, (4,) if act_per_channel else (),
                                [x_scale] * (4 if act_per_channel else 1)),
             helper.make_tensor("x_zp", q_type, (), [zero]),
             numpy_helper.from_array(w, "w_q"),
             numpy_helper.from_array(np.full(w_scale_shape, 0.05, np.float32), "w_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
             helper.make_node(q_feeds, ["x_q", "x_scale", "x_zp"] if q_feeds == "DequantizeLinear" else ["x_q"],
                              ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], axis=w_axis),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    return _model(nodes, [_vi("x")], [_vi("y")], inits, opset=19)


def test_qdq_well_placed_graph_passes():
    report = check_qdq(_qdq_model(), "int8")
    assert report.ok, report.errors
    assert not report.warnings


@pytest.mark.parametrize("kwargs, message", [
    ({"zero": 3}, "zero point must be zero"),
    ({"x_scale": -1.0}, "scale must be positive"),
    ({"w_axis": 0}, "output axis 1"),
    ({"act_per_channel": True}, "per tensor"),
    ({"q_feeds": "Relu"}, "may only feed DequantizeLinear"),
    ({"fp8": TensorProto.FLOAT8E5M2}, "E4M3FN"),
])
def test_qdq_placement_errors(kwargs, message):
    report = check_qdq(_qdq_model(**kwargs), "int8" if "fp8" not in kwargs else "fp8")
    assert any(message in e for e in report.errors), report.errors


def _weight_q_model(w_axis=1, act_channels=False, via_transpose=False):
    """ModelOpt's layout: float weights -> QuantizeLinear (per channel) -> DequantizeLinear -> MatMul."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full((4,), 0.02, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros((4,), np.int8), "w_zp"),
             numpy_helper.from_array(np.full((4,) if act_channels else (), 0.1, np.float32), "x_scale"),
             numpy_helper.from_array(np.zeros((4,) if act_channels else (), np.int8), "x_zp")]
    nodes = [helper.make_node("Relu", ["x"], ["xr"]),  # an activation computed in the graph, not a graph input
             helper.make_node("QuantizeLinear", ["xr", "x_scale", "x_zp"], ["x_q"], axis=1),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], axis=1)]
    w_in = "w"
    if via_transpose:  # a weight is still a weight after constant-foldable ops
        nodes.append(helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]))
        w_in = "w_t"
    nodes += [helper.make_node("QuantizeLinear", [w_in, "w_scale", "w_zp"], ["w_q"], axis=w_axis),
              helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=w_axis),
              helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    return _model(nodes, [_vi("x")], [_vi("y")], inits, opset=19)


def test_qdq_weight_quantizers_may_be_per_channel_activation_quantizers_may_not():
    """The bug of issue 12: ModelOpt's per-channel weight Q (float weight -> Q -> DQ) was taken for an activation."""
    for via_transpose in (False, True):
        report = check_qdq(_weight_q_model(via_transpose=via_transpose), "int8")
        assert report.ok, report.errors
    wrong_axis = check_qdq(_weight_q_model(w_axis=0), "int8")
    assert any("output axis 1" in e for e in wrong_axis.errors), wrong_axis.errors
    per_channel_act = check_qdq(_weight_q_model(act_channels=True), "int8")
    assert per_channel_act.errors and all("activations must be quantized per tensor" in e
                                          for e in per_channel_act.errors), per_channel_act.errors
    assert len(per_channel_act.errors) == 2  # the activation's Q and DQ; the weight's pair passes


def test_qdq_precision_label_and_half_quantized_ops():
    fp8_model = _qdq_model(fp8=TensorProto.FLOAT8E4M3FN)
    assert any("FP8 tensor in a graph labelled int8" in e for e in check_qdq(fp8_model, "int8").errors)
    assert check_qdq(fp8_model, "fp8").ok
    float_model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")],
                         [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    assert any("no Q/DQ" in e for e in check_qdq(float_model, "int8").errors)
    half = _model([helper.make_node("DequantizeLinear", ["w_q", "s"], ["w"]),
                   helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")],
                  [numpy_helper.from_array(np.ones((4, 4), np.int8), "w_q"),
                   helper.make_tensor("s", TensorProto.FLOAT, (), [0.1])])
    report = check_qdq(half, "int8")
    assert report.ok and any("run in float" in w for w in report.warnings)


# -- profiles ------------------------------------------------------------------------------------------------------

def test_llm_gets_prefill_and_decode_profiles(bundle):
    entry = bundle.component("llm")
    prefill, decode, batch_prefill = engine_profiles("llm", entry)
    ctx = bundle.llm["max_context"]
    assert (prefill.name, decode.name, batch_prefill.name) == ("prefill", "decode", "batch_prefill")
    assert decode.shapes["inputs_embeds"][2][1] == DECODE_MAX_SEQ
    assert prefill.shapes["inputs_embeds"][2][1] == ctx
    assert decode.shapes["past_key_0"][2][2] == ctx and prefill.shapes["past_key_0"][0][2] == 0
    assert decode.shapes["attention_mask"][2][1] == ctx + DECODE_MAX_SEQ  # the whole capacity + new positions
    assert prefill.shapes["attention_mask"][2] == (2, ctx)  # batch 2: the guidance rows
    # up to MAX_IMAGES images in one batch: their decode steps, and their prompts (not the whole context) at once
    assert decode.shapes["inputs_embeds"][2][0] == 2 * MAX_IMAGES and decode.shapes["inputs_embeds"][1][0] == 2
    assert batch_prefill.shapes["inputs_embeds"][2][:2] == (2 * MAX_IMAGES, BATCH_PREFILL_MAX_SEQ)
    heads = engine_profiles("lm_head_pixel", bundle.component("lm_head_pixel"))
    # a verify step of parallel decoding scores every position of its window in one head call
    assert [p.name for p in heads] == ["default"]
    assert heads[0].shapes["hidden"][2][0] == 2 * MAX_IMAGES * DECODE_MAX_SEQ


def test_profiles_cover_every_shape_the_runtime_asks_for(bundle):
    """All supported resolutions x prompt lengths x guidance on/off, walking the real image schedule."""
    assert uncovered_requests(bundle.manifest, [1, 16, 64, 300]) == []


def test_coverage_walk_fails_when_a_profile_is_too_small(bundle):
    manifest = copy.deepcopy(bundle.manifest)
    manifest["components"]["pixel_decoder"]["profiles"]["pix_cols"][2] = 32  # drops the wide resolutions
    manifest["components"]["llm"]["profiles"]["total"][2] = 600  # context below 512x512's token count
    manifest["components"]["llm"]["profiles"]["past"][2] = 600
    missing = uncovered_requests(manifest, [16])
    assert any(m.startswith("pixel_decoder") for m in missing)
    assert any(m.startswith("llm (decode)") for m in missing)


def test_select_profile_prefers_and_explains(bundle):
    profiles = engine_profiles("llm", bundle.component("llm"))
    from illume_rt.engines.profiles import llm_shapes

    entry = bundle.component("llm")
    assert profiles[select_profile(profiles, llm_shapes(entry, 2, 1, 100), "decode")].name == "decode"
    assert profiles[select_profile(profiles, llm_shapes(entry, 2, 40, 0), "decode")].name == "prefill"
    with pytest.raises(ProfileError, match="illume-rt build-engines"):
        select_profile(profiles, llm_shapes(entry, 2 * MAX_IMAGES + 1, 1, 10))  # more rows than any request
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        bad = copy.deepcopy(entry)
        bad["profiles"]["batch"] = [2, 1, 2]
        engine_profiles("llm", bad)
    assert Profile.from_dict(profiles[1].to_dict()) == profiles[1]


def test_buffer_sizes():
    entry = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8, "n"]},
                        {"name": "ids", "dtype": "int64", "shape": ["batch", "n"]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", "n", 3]},
                         {"name": "img", "dtype": "float32", "shape": ["batch", 3, "h", "w"]}],
             "profiles": {"batch": [1, 1, 2], "n": [1, 4, 10]}}
    profiles = engine_profiles("thing", entry)
    sizes = io_buffer_bytes(entry, profiles)
    assert sizes == {"x": 2 * 8 * 10 * 4, "ids": 2 * 10 * 8, "y": 2 * 10 * 3 * 4, "img": None}
    assert io_buffer_bytes(entry, profiles, caps={"n": 5})["x"] == 2 * 8 * 5 * 4
    llm = {"num_hidden_layers": 36, "num_key_value_heads": 2, "head_dim": 128, "kv_dtype": "float16"}
    assert kv_cache_bytes(1, llm, 1) == 36 * 1024  # 36 KiB per token per sequence (3B, 16-bit)


# -- engine cache ----------------------------------------------------------------------------------------------------

H100 = ec.DeviceInfo("11.4", "NVIDIA H100 80GB HBM3", "9.0")
L40S = ec.DeviceInfo("11.4", "NVIDIA L40S", "8.9")


def _key(**kw):
    base = dict(component="llm", graph_sha256="a" * 64, precision="fp16", recipe="none",
                build={"opt_level": 3}, device=H100)
    base.update(kw)
    return ec.EngineKey(**base)


def test_cache_key_changes_with_every_field():
    keys = {_key().digest(), _key(graph_sha256="b" * 64).digest(), _key(precision="bf16").digest(),
            _key(recipe="fp8-max").digest(), _key(build={"opt_level": 5}).digest(),
            _key(device=L40S).digest(), _key(device=replace(H100, tensorrt_version="11.5")).digest(),
            _key(device=replace(H100, compute_capability="9.0a")).digest()}
    assert len(keys) == 8
    assert _key().digest() == _key().digest()
    assert _key().filename().startswith("llm.fp16.") and _key().filename().endswith(".plan")
    # the key holds TensorRT's major.minor: a patch release maps to the same engine, a minor release does not
    assert ec.major_minor("11.4.0.106") == ec.major_minor("11.4.1.2") == "11.4" != ec.major_minor("11.5.0.1")
    with pytest.raises(ValueError):
        ec.major_minor("eleven")


def test_engine_for_another_gpu_or_version_is_refused(tmp_path):
    with pytest.raises(ec.EngineCacheError, match="build them with `illume-rt build-engines "):
        ec.find_engine(tmp_path, "llm", "a" * 64, H100)
    key = _key()
    ec.write_atomic(ec.engine_dir(tmp_path) / key.filename(), b"plan")
    ec.record_engine(tmp_path, key)
    assert ec.find_engine(tmp_path, "llm", "a" * 64, H100)["file"] == key.filename()
    with pytest.raises(ec.EngineCacheError, match=r"built for TensorRT 11.4 on NVIDIA H100.*sm_90.*L40S.*"
                                                  r"rebuild with `illume-rt build-engines"):
        ec.find_engine(tmp_path, "llm", "a" * 64, L40S)
    with pytest.raises(ec.EngineCacheError, match="TensorRT 11.5"):
        ec.find_engine(tmp_path, "llm", "a" * 64, replace(H100, tensorrt_version="11.5"))
    with pytest.raises(ec.EngineCacheError, match="another graph"):
        ec.find_engine(tmp_path, "llm", "c" * 64, H100)
    # rebuilding for the same component/precision/device replaces the index entry
    newer = _key(build={"opt_level": 5})
    ec.write_atomic(ec.engine_dir(tmp_path) / newer.filename(), b"plan2")
    ec.record_engine(tmp_path, newer)
    entries = ec.read_index(tmp_path)["engines"]
    assert len(entries) == 1 and entries[0]["key"] == newer.digest()
    assert not [p for p in ec.engine_dir(tmp_path).iterdir() if p.name.endswith(".tmp")]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "engine.plan"
    ec.write_atomic(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ec.os, "replace", boom)
    with pytest.raises(OSError):
        ec.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


# -- fixed-shape decode step (what the CUDA graph replays) -------------------------------------------------------------

def test_bucket_capacity():
    assert bucket_capacity(100, 4096) == 128
    assert bucket_capacity(128, 4096) == 128
    assert bucket_capacity(4000, 4096) == 4032  # rounded up to the next bucket of 64
    assert bucket_capacity(4090, 4096) == 4090  # the bucket (4096) leaves no room for the 4-wide step: as is
    assert bucket_capacity(4092, 4096) == 4092  # exactly room for the step
    assert bucket_capacity(4095, 4096) is None  # no room for the fixed step: plain dynamic path


def test_static_step_feeds_layout():
    mask = np.zeros((2, 8), np.int64)
    mask[:, :5] = 1
    mask[0, :2] = 0  # left padding of row 0
    embeds = np.ones((2, 2, 3), np.float32)
    positions = np.array([[3, 4], [5, 6]])
    feeds = static_step_feeds(mask, 5, embeds, positions, step=4)
    assert feeds["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1],
                                                [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]]
    assert feeds["inputs_embeds"][:, :2].sum() == 0 and feeds["inputs_embeds"][:, 2:].sum() == 12
    assert feeds["position_ids"].tolist() == [[3, 3, 3, 4], [5, 5, 5, 6]]
    with pytest.raises(ValueError):
        static_step_feeds(mask, 5, np.ones((2, 5, 3), np.float32), np.zeros((2, 5), np.int64), step=4)


@pytest.mark.parametrize("greedy", [True, False])
def test_fixed_shape_decode_gives_the_same_tokens(bundle, greedy):
    """The plan the CUDA-graph path runs (full-capacity past, masked, right-aligned padded step) run on
    onnxruntime CPU: same tokens as the plain loop."""
    from illume_rt.runtime.generate import generate_image_tokens
    from illume_rt.contract import image_grid
    from illume_rt.runtime.options import SamplingConfig
    from illume_rt.runtime.pipeline import Pipeline
    from illume_rt.runtime.prompts import text_to_image_ids

    import copy

    pipe = Pipeline(bundle, threads=2)
    lm = pipe.lm
    static = copy.copy(lm)
    static.stepper = StaticHostStep(lm.body, lm.dims)
    cond, uncond = text_to_image_ids(pipe.tokenizer, pipe.vocab, "a red circle", 256, 256)
    sampling = SamplingConfig(greedy=greedy)
    grid = image_grid(256, 256)
    a = generate_image_tokens(lm, grid, cond, uncond, sampling, np.random.default_rng(3))
    b = generate_image_tokens(static, grid, cond, uncond, sampling, np.random.default_rng(3))
    assert np.array_equal(a.semantic, b.semantic) and np.array_equal(a.pixel, b.pixel)


# -- guarded backends ---------------------------------------------------------------------------------------------------

def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has("tensorrt"), reason="TensorRT is installed: the missing-package path cannot be shown")
def test_tensorrt_backend_without_tensorrt_says_what_to_install(bundle):
    from illume_rt.runtime.pipeline import Pipeline

    with pytest.raises(BackendError, match="needs TensorRT 11"):
        Pipeline(bundle, backend="tensorrt")


def test_ort_cuda_selects_the_cuda_engine_or_explains():
    import onnxruntime as ort

    from illume_rt.engines.ort_cuda import require_cuda_provider

    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        require_cuda_provider(["CPUExecutionProvider"])
    require_cuda_provider(["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the missing-provider path cannot be shown")


def test_pipeline_routes_ort_cuda_to_the_io_binding_engine(bundle, monkeypatch):
    import illume_rt.engines.ort_cuda as oc
    from illume_rt.runtime.pipeline import open_engine

    seen = {}

    entry = bundle.component("llm")

    class Fake:
        def __init__(self, name, path, threads=None, emulate_fp8=False):
            seen[name] = path
            self.input_names = [t["name"] for t in entry["inputs"]]
            self.output_names = [t["name"] for t in entry["outputs"]]

    monkeypatch.setattr(oc, "OrtCudaEngine", Fake)
    assert isinstance(open_engine(bundle, "llm", "ort-cuda", None), Fake)
    assert seen["llm"].name == "llm.onnx"

    class Renamed(Fake):  # a graph whose IO differs from the manifest's: a bundle error, not a failure mid-run
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.output_names = ["hidden_states", "new_kv"]

    monkeypatch.setattr(oc, "OrtCudaEngine", Renamed)
    from illume_rt.runtime.bundle import BundleError

    with pytest.raises(BundleError, match="hidden_states.*re-export"):
        open_engine(bundle, "llm", "ort-cuda", None)


def test_ort_cuda_refuses_a_session_that_fell_back_to_the_cpu():
    """onnxruntime runs a session on the CPU, with a log line only, when its CUDA provider cannot start: the
    backend must say so instead of running --backend ort-cuda on the CPU."""
    from illume_rt.engines.ort_cuda import require_cuda_session

    with pytest.raises(BackendError, match=r"could not start its CUDA provider for llm.*onnxruntime-gpu\[cuda,cudnn\]"):
        require_cuda_session("llm", ["CPUExecutionProvider"])
    require_cuda_session("llm", ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_provider(), reason="needs onnxruntime-gpu (CUDA) and a GPU")
def test_ort_cuda_backend_matches_ort_cpu(bundle):
    """Every graph on the CUDA provider (device inputs, IO binding) against the CPU on the inputs a CPU run
    recorded, then the loop end to end (the body's step with the KV cache on the GPU): greedy codes, a batch
    and parallel decoding equal to one-by-one on the GPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ort_cuda_check", Path(__file__).parent.parent / "bench" /
                                                  "ort_cuda_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    from illume_rt.runtime.pipeline import Pipeline

    cpu, gpu = Pipeline(bundle, backend="ort-cpu"), Pipeline(bundle, backend="ort-cuda")
    assert "CUDAExecutionProvider" in gpu.engines["llm"].session.get_providers()
    refine = bool(bundle.manifest.get("diffusion"))
    rows = check.graph_parity(cpu, gpu, refine)
    assert {r["graph"] for r in rows} == set(bundle.manifest["components"])
    assert [r for r in rows if not r["ok"]] == []
    e2e = check.end_to_end(cpu, gpu, refine)
    assert e2e["generate_greedy"]["codes_agree"] >= 0.95, e2e
    assert e2e["understand"]["same_answer"], e2e
    assert e2e["batch_equals_one_by_one"] and e2e["parallel_decoding_equals_sequential"], e2e
    assert e2e["threads_equal_one_by_one"], e2e


def test_build_plan_without_tensorrt(bundle, tmp_path):
    """Strongly typed only: no precision flag ever; the precision and the key come from the bundle's graphs."""
    from illume_rt.engines.tensorrt_build import BuildOptions, check_requested_precision, plan_build

    key, settings = plan_build(bundle, "llm", 4, device=H100)
    assert key.precision == "fp32" and key.build["strongly_typed"] and key.build["flags"] == []
    assert [p.name for p in settings["profiles"]] == ["prefill", "decode", "batch_prefill"]
    assert key.graph_sha256 == bundle.component("llm")["sha256"] and key.build["opt_level"] == 4
    streaming, _ = plan_build(bundle, "llm", 4, device=H100,
                              options=BuildOptions(weight_streaming=True, refittable=True))
    assert streaming.build["flags"] == ["WEIGHT_STREAMING", "REFIT"] and streaming.digest() != key.digest()
    check_requested_precision(bundle, "fp32")
    with pytest.raises(BackendError, match=r"this bundle is fp32.*`illume-rt quantize .* --precision fp16 "
                                           r"--target tensorrt -o .*-fp16`"):
        check_requested_precision(bundle, "fp16")

    class QBundle:  # a component labelled int8
        path = tmp_path
        manifest = {"components": {"q": {}}}
        graph = "q.onnx"

        def component(self, name):
            return {"file": self.graph, "sha256": "d" * 64, "precision": "int8",
                    "quantization": {"recipe": "int8-smoothquant"},
                    "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}], "outputs": [], "profiles": {}}

        def component_path(self, name):
            return tmp_path / self.graph

    onnx.save(_qdq_model(), str(tmp_path / "q.onnx"))
    key, settings = plan_build(QBundle(), "q", device=H100)
    assert settings["quantized"] and key.build["flags"] == [] and key.recipe == "int8-smoothquant"
    assert key.precision == "int8"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")]), str(tmp_path / "f.onnx"))
    fake = QBundle()
    fake.graph = "f.onnx"
    with pytest.raises(BackendError, match="holds no Q/DQ"):
        plan_build(fake, "q", device=H100)


def test_no_precision_builder_flag_anywhere_in_engines():
    """TensorRT 11 removed them; a weakly typed build path must not come back (the API test checks names in
    use, this checks strings such as getattr(trt.BuilderFlag, "FP16") too)."""
    import re

    root = Path(__file__).resolve().parents[1] / "engines"
    weak = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")
    for path in root.glob("*.py"):
        text = path.read_text()
        for flag in weak:
            assert not re.search(rf"BuilderFlag\.{flag}\b", text), (path.name, flag)
        assert "int8_calibrator" not in text and "IInt8" not in text, path.name
    builder = (root / "tensorrt_build.py").read_text()
    for flag in weak:  # no flag name as a string either (getattr(trt.BuilderFlag, name))
        assert f'"{flag}"' not in builder and f"'{flag}'" not in builder, flag


def test_cli_build_engines_check_only(bundle, capsys):
    from illume_rt.cli import main

    assert main(["build-engines", str(bundle.path), "--check-only"]) == 0
    assert "checks passed" in capsys.readouterr().out
    assert main(["build-engines", str(bundle.path), "--check-only", "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert main(["build-engines", str(bundle.path), "--check-only", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "illume-rt quantize" in err and "--precision fp16 --target tensorrt" in err
    if not _has("tensorrt"):
        assert main(["build-engines", str(bundle.path)]) == 2
        assert "needs TensorRT 11" in capsys.readouterr().err


@pytest.mark.skipif(not _has("tensorrt"), reason="needs TensorRT 11 and an NVIDIA GPU (not installable here)")
def test_tensorrt_engines_match_onnxruntime(bundle, tmp_path):  # pragma: no cover - GPU machines only
    import shutil

    from illume_rt.engines.tensorrt_build import build_bundle_engines
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.runtime.options import SamplingConfig
    from illume_rt.runtime.pipeline import Pipeline

    local = tmp_path / "b"
    shutil.copytree(bundle.path, local)
    build_bundle_engines(load_bundle(local), None, 3, log=lambda m: None)
    a = Pipeline.from_bundle(local, backend="tensorrt").generate("x", (256, 256), sampling=SamplingConfig(greedy=True))
    b = Pipeline.from_bundle(local).generate("x", (256, 256), sampling=SamplingConfig(greedy=True))
    assert np.array_equal(a.tokens.semantic, b.tokens.semantic)


def test_weight_streaming_budget(monkeypatch):
    """The budget logic around TensorRT's weight-streaming properties (on a stand-in engine: no TensorRT here)."""
    from illume_rt.engines.tensorrt import WEIGHT_BUDGET_ENV, apply_weight_budget, weight_budget_from_env

    class Engine:
        streamable_weights_size = 1000
        weight_streaming_budget_v2 = -1

        def get_weight_streaming_automatic_budget(self):
            return 640

    monkeypatch.delenv(WEIGHT_BUDGET_ENV, raising=False)
    assert weight_budget_from_env() is None
    for raw, want in (("8e2", 800), ("auto", "auto"), ("5000", 5000)):
        monkeypatch.setenv(WEIGHT_BUDGET_ENV, raw)
        assert weight_budget_from_env() == want
    monkeypatch.setenv(WEIGHT_BUDGET_ENV, "lots")
    with pytest.raises(BackendError, match="give a number of bytes"):
        weight_budget_from_env()
    engine = Engine()
    assert apply_weight_budget(engine, "llm", None) is None and engine.weight_streaming_budget_v2 == -1
    assert apply_weight_budget(engine, "llm", 800) == 800 == engine.weight_streaming_budget_v2
    assert apply_weight_budget(engine, "llm", 5000) == 1000  # capped at what can stream
    assert apply_weight_budget(engine, "llm", "auto") == 640
    engine.streamable_weights_size = 0
    with pytest.raises(BackendError, match="--weight-streaming"):
        apply_weight_budget(engine, "llm", 800)
