"""Keep onnxruntime.quantization's module state across a ModelOpt call.

Why: ModelOpt's ONNX quantizer (``modelopt.onnx.quantization.quantize``, INT8/FP8 for the ``tensorrt`` target) calls
``configure_ort`` on every call, which changes onnxruntime.quantization for the whole process: it edits the op
registries in place (``QDQRegistry["LayerNormalization"] = QDQNormalization``, deletes Relu/Softmax/Gather/... from
``QDQRegistry`` and ``QLinearOpsRegistry``) and ``patch_ort_modules`` replaces methods and functions
(``MinMaxCalibrater.collect_data``, ``CalibraterBase.__init__``, ``calibrate.create_calibrator``,
``QDQQuantizer.check_opset_version``, ``BaseQuantizer.adjust_tensor_ranges``, ...). Nothing undoes it, so a later
plain ``onnxruntime.quantization.quantize_static`` in the same process (our ``ort-cpu`` INT8) quantizes with
ModelOpt's registry and calibrators and fails ("Quantization parameters are not specified for param layer_norm").
The CLI makes one quantization per process; the Python API (``quantize_bundle``) may make both flavours in one.

Restoring is safe for ModelOpt itself: ``configure_ort`` runs at the start of each INT8/FP8 ``quantize`` call and
applies its registry edits and patches again, so it never relies on a previous call having left them in place.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

_PACKAGE = "onnxruntime.quantization"
_CONTAINERS = (dict, list, set)


def _namespaces() -> list:
    """The attribute namespaces ModelOpt may change: every loaded ``onnxruntime.quantization*`` module and every
    class defined in one of them (by ``__module__``, so a class re-exported by several modules is taken once)."""
    out, seen = [], set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == _PACKAGE or name.startswith(_PACKAGE + ".")):
            continue
        if id(module) not in seen:
            seen.add(id(module))
            out.append(module)
        for value in list(vars(module).values()):
            if (isinstance(value, type) and id(value) not in seen
                    and getattr(value, "__module__", "").startswith(_PACKAGE)):
                seen.add(id(value))
                out.append(value)
    return out


def _snapshot() -> list:
    saved = []
    for owner in _namespaces():
        attrs = dict(vars(owner))
        # registries are module-level dicts edited in place: keep a copy of their contents too (not of dunders:
        # a module's __builtins__ is the interpreter's)
        contents = [(v, v.copy()) for k, v in attrs.items()
                    if type(v) in _CONTAINERS and not (k.startswith("__") and k.endswith("__"))]
        saved.append((owner, attrs, contents))
    return saved


def _restore(saved: list) -> None:
    missing = object()
    for owner, attrs, contents in saved:
        now = dict(vars(owner))
        for key in now.keys() - attrs.keys():  # added during the call
            delattr(owner, key)
        for key, value in attrs.items():
            if now.get(key, missing) is not value:  # replaced or deleted during the call
                setattr(owner, key, value)
        for container, copy in contents:
            if _same(container, copy):  # most are untouched: leave them alone (no window where one is empty)
                continue
            if isinstance(container, list):
                container[:] = copy
            else:
                container.clear()
                container.update(copy)


def _same(container, copy) -> bool:
    """Same contents by identity (values may be numpy arrays, whose == is not a bool)."""
    if len(container) != len(copy):
        return False
    if isinstance(container, dict):
        missing = object()
        return all(copy.get(k, missing) is v for k, v in container.items())
    if isinstance(container, list):
        return all(a is b for a, b in zip(container, copy))
    return container == copy


@contextmanager
def ort_quantization_state_kept():
    """Run a ModelOpt call and put onnxruntime.quantization back as it was (also when the call raises): the
    attributes of its loaded modules and of the classes defined there, and the contents of their module-level
    dicts/lists/sets (the op registries). onnxruntime.quantization is imported first so the modules ModelOpt
    patches (registry, calibrate, base_quantizer, qdq_quantizer, ...) are in the snapshot; a submodule first
    imported during the call has no earlier state to go back to and keeps what the call left."""
    import onnxruntime.quantization  # noqa: F401

    saved = _snapshot()
    try:
        yield
    finally:
        _restore(saved)
