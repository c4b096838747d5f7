"""illume-rt: export-optimized inference runtime for ILLUME+.

The public API (docs/api.md)::

    from illume_rt import Pipeline, SamplingConfig
    pipe = Pipeline.from_bundle("bundle/")
    pipe.generate("a red circle on a blue background").save("out.png")

Layers, imports pointing one way: ``illume_rt.cli`` -> ``illume_rt.runtime`` (the loop, numpy + onnxruntime) ->
``illume_rt.engines`` (backends) -> ``illume_rt.contract`` (the shared description); ``illume_rt.export`` (build
time, torch) -> ``illume_rt.contract``. ``illume_rt.errors`` and ``illume_rt.files`` sit beside the contract.
``illume_rt.calibration`` and ``illume_rt.bench`` use the runtime.

The names below load on first use, so ``import illume_rt.contract`` (every stage does) pulls in nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "Pipeline": "illume_rt.runtime.pipeline",
    "GenerationResult": "illume_rt.runtime.pipeline",
    "UnderstandingResult": "illume_rt.runtime.pipeline",
    "SamplingConfig": "illume_rt.runtime.options",
    "RefineConfig": "illume_rt.runtime.refine",
    "ImageGenerator": "illume_rt.runtime.generate",
    "TextGenerator": "illume_rt.runtime.generate",
    "LogitsProcessor": "illume_rt.runtime.generate",
    "IllumeError": "illume_rt.errors",
    "UsageError": "illume_rt.errors",
    "OutputError": "illume_rt.errors",
    "LayoutError": "illume_rt.contract",
    "BundleError": "illume_rt.runtime.bundle",
    "BackendError": "illume_rt.engines.base",
    "supported_resolutions": "illume_rt.contract",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'illume_rt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily (above)
    from illume_rt.contract import LayoutError, supported_resolutions
    from illume_rt.engines.base import BackendError
    from illume_rt.errors import IllumeError, OutputError, UsageError
    from illume_rt.runtime.bundle import BundleError
    from illume_rt.runtime.generate import ImageGenerator, LogitsProcessor, TextGenerator
    from illume_rt.runtime.options import SamplingConfig
    from illume_rt.runtime.pipeline import GenerationResult, Pipeline, UnderstandingResult
    from illume_rt.runtime.refine import RefineConfig
