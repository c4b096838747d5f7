"""Every TensorRT name and call in engines/ against the REAL TensorRT Python API (11.4 and the last 10.x).

The bindings wheels from PyPI are loaded through link stubs built here with the system C compiler (tests/trt_api.py
says how and what the walk checks). Nothing is built or run: this proves names, signatures and property setters,
not behaviour. CI (.ci/run) downloads the wheels first and sets ILLUME_RT_REQUIRE_TRT_API=1, so a missing wheel
fails there; elsewhere it skips with the reason."""

from __future__ import annotations

import os
import textwrap

import pytest

import trt_api


def _api(version: str) -> dict:
    try:
        return trt_api.load_api(version)
    except trt_api.ApiUnavailable as exc:
        if os.environ.get("ILLUME_RT_REQUIRE_TRT_API") == "1":
            pytest.fail(f"the real TensorRT {version} API is required here (ILLUME_RT_REQUIRE_TRT_API=1): {exc}")
        pytest.skip(f"real TensorRT {version} API unavailable: {exc}")


@pytest.mark.parametrize("version", list(trt_api.VERSIONS))
def test_engines_use_only_names_and_calls_the_real_api_has(version):
    api = _api(version)
    assert api["version"] == version
    checker = trt_api.ApiChecker(api)
    findings = checker.check_files(trt_api.engine_files(), trt_api.ROOT)
    assert not findings, "\n".join(map(str, findings))
    # the walk really resolved the backend's objects (builder, config, parser, engine, contexts, refitter ...)
    assert checker.checked > 200, checker.checked


def test_tensorrt_11_has_no_precision_flags_and_builds_strongly_typed():
    api = _api("11.4.0.106")
    flags = api["classes"]["BuilderFlag"]["members"]
    for gone in ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS"):
        assert gone not in flags
    for kept in ("WEIGHT_STREAMING", "REFIT", "EDITABLE_TIMING_CACHE"):
        assert kept in flags
    assert "STRONGLY_TYPED" in api["classes"]["NetworkDefinitionCreationFlag"]["members"]
    assert "int8_calibrator" not in api["classes"]["IBuilderConfig"]["members"]


MISTAKES = '''
def build(name):
    trt = import_tensorrt()
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)
    config.set_timing_cache(config.create_timing_cache(b""), ignore=False)
    network = builder.create_network(0)
    network.num_layers = 3
    context = make_context()
    context.execute_async_v3(0)
    config.set_flag(getattr(trt.BuilderFlag, name))
    builder.build_serialized_network(config, network)
    config.no_such_property
    trt.NoSuchClass
    return builder.build_serialized_network(network, config)
'''


@pytest.mark.parametrize("version", list(trt_api.VERSIONS))
def test_the_walk_reports_each_kind_of_mistake_with_its_line(version, tmp_path):
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "snippet.py").write_text(textwrap.dedent(MISTAKES))
    checker = trt_api.ApiChecker(_api(version))
    findings = checker.check_files(trt_api.engine_files(tmp_path), tmp_path)
    by_line = {f.line: f.message for f in findings}
    assert all(f.path == "engines/snippet.py" for f in findings)
    expected = {
        7: "set_memory_pool_limit",  # one argument missing
        8: "no parameter named 'ignore'",  # wrong keyword
        10: "cannot be assigned",  # read-only property
        12: "cannot tell which TensorRT object 'context'",  # untyped object using a TensorRT-only method
        13: "computed name",  # getattr(trt.BuilderFlag, name)
        14: "argument network is a IBuilderConfig",  # swapped arguments
        15: "has no attribute 'no_such_property'",
        16: "has no 'NoSuchClass'",
    }
    if version.startswith("11."):
        expected[6] = "has no attribute 'FP16'"  # removed in TensorRT 11
    else:
        assert 6 not in by_line  # 10.x still has it
    for line, text in expected.items():
        assert line in by_line and text in by_line[line], (line, text, by_line.get(line))
    assert set(by_line) == set(expected), sorted(by_line)


def test_signature_parsing_of_pybind11_docstrings():
    doc = ("deserialize_cuda_engine(*args, **kwargs)\nOverloaded function.\n\n"
           "1. deserialize_cuda_engine(self: tensorrt_bindings.tensorrt.Runtime, serialized_engine: "
           "typing_extensions.Buffer) -> tensorrt_bindings.tensorrt.ICudaEngine\n\n   text\n\n"
           "2. deserialize_cuda_engine(self: tensorrt_bindings.tensorrt.Runtime, stream_reader_v2: "
           "tensorrt_bindings.tensorrt.IStreamReaderV2) -> tensorrt_bindings.tensorrt.ICudaEngine\n")
    sigs = trt_api._signatures(doc)
    assert [s["params"][1]["name"] for s in sigs] == ["serialized_engine", "stream_reader_v2"]
    assert sigs[0]["ret"] == "ICudaEngine" and sigs[1]["params"][1]["type"] == "IStreamReaderV2"
    one = trt_api.parse_signature("__init__(self: tensorrt_bindings.tensorrt.Logger, min_severity: "
                                  "tensorrt_bindings.tensorrt.ILogger.Severity = <Severity.WARNING: 2>) -> None")
    assert one["params"][1] == {"name": "min_severity", "type": "ILogger.Severity", "default": True, "kind": "pos"}
    assert trt_api._bind(one, 2, [], True) is not None and trt_api._bind(one, 0, ["min_severity"], True) is None
