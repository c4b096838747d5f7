"""Traced graph structures kept across exports, so that a network traced once is not traced again.

Why: tracing (``streaming.export_structure``: torch.export, decompositions, the fold) is nearly all of an export's
time (bench/results/20261203-export-trace-cache: the nano bundle exports 56.6x faster from a filled cache), while
the traced structure does not depend on the weights' values: they are held out and written afterwards by name
(``streaming.write_weights``). Re-exporting a network of the same structure with other weights (a retrained nano
scored through a temporary bundle; the test suite exporting the shapes CI already exported) can reuse it.

Off unless ``ILLUME_RT_TRACE_CACHE`` names a folder. A structure is looked up by a key describing everything the
trace reads besides the weights' values, conservatively (when in doubt, a miss, never a wrong hit):

- the sources of every illume_rt package and the versions of Python, torch, transformers, diffusers, onnx,
  onnxscript and onnx_ir;
- the tracer itself (``export_structure`` and ``fold_small_constants``: their name and bytecode, so a test or bench
  that swaps one out misses);
- every submodule: its class and that class's ``forward`` (name and bytecode), every attribute (configs and their
  fields, numbers, strings, functions by name and bytecode; tensors held as plain attributes by value, since the
  trace bakes them in as constants; hooks make a network uncacheable), every parameter and buffer by name, shape,
  dtype and whether it is lazy (their values are not part of the structure);
- the sample inputs' shapes and dtypes, the graph's input and output names and dynamic axes.

Anything the description cannot name exactly (an object whose repr shows only its address) makes the network
uncacheable: it is traced as without a cache. A path (``_name_or_path``) and a commit hash (``_commit_hash``) in a
config are left out of the key (UNKEYED_FIELDS): checkpoint loaders record where the weights came from there, and
the forward pass never reads them.

``export_onnx`` uses a cached structure only where it verifies the whole graph against PyTorch (the weights within
``FULL_VERIFY_BYTES``), and traces afresh when a cached one fails that check (the entry is replaced). Entries are
``<key>.onnx`` files: the graph with its weights as external-data references to nothing (``HELD_OUT``), written
atomically, so that two processes filling one cache at once each leave a whole file.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import sys
import types
from pathlib import Path

TRACE_CACHE_ENV = "ILLUME_RT_TRACE_CACHE"
FORMAT = 1  # bump when what an entry holds or how the key is made changes
HELD_OUT = "illume-rt-weight-held-out"  # external-data location of a weight in an entry: no file, no data
PACKAGES = ("illume_rt", "illume_rt.export", "illume_rt.runtime", "illume_rt.engines", "illume_rt.calibration",
            "illume_rt.nano")  # with their subpackages
VERSIONED = ("torch", "transformers", "diffusers", "onnx", "onnxscript", "onnx_ir", "numpy")
# Config fields that record where a config came from, not what it says: see the docstring. (diffusers'
# ``_use_default_values`` lists the fields left at their defaults, whose values are keyed as the others; it is a
# list made from a set, so its order changes from process to process.)
UNKEYED_FIELDS = frozenset({"_name_or_path", "_commit_hash", "_use_default_values"})
MAX_DEPTH = 64  # decorated forwards nest a few wrappers deep, each in the next one's closure


class Uncacheable(Exception):
    """The network holds something the key cannot describe exactly: trace it without the cache."""


def cache_folder() -> Path | None:
    value = os.environ.get(TRACE_CACHE_ENV)
    return Path(value) if value else None


def structure_key(module, inputs, input_names, output_names, dynamic_shapes) -> str | None:
    """The key of the structure ``export_structure`` would trace from these arguments, or None (uncacheable)."""
    from illume_rt.export import streaming

    try:
        description = {
            "format": FORMAT,
            "versions": _versions(),
            "sources": _sources_digest(),
            "tracer": [_function(streaming.export_structure), _function(streaming.fold_small_constants)],
            "module": _module(module),
            "inputs": [[list(x.shape), str(x.dtype)] for x in inputs],
            "names": [list(input_names), list(output_names)],
            "dynamic_shapes": _describe(dynamic_shapes, set(), 0),
        }
    except Uncacheable:
        return None
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def load(folder: Path, key: str):
    """The cached structure (an ``onnx_ir.Model`` whose weight initializers hold no value, as a fresh trace's hold
    none that is read) or None: absent, or unreadable (then traced again and rewritten)."""
    import onnx
    import onnx_ir as ir

    path = folder / f"{key}.onnx"
    try:
        proto = onnx.ModelProto()
        proto.ParseFromString(path.read_bytes())
        model = ir.serde.deserialize_model(proto)
    except Exception:  # absent or damaged: a miss, never an error (the trace it replaces is always possible)
        return None
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor) and value.const_value.location == HELD_OUT:
            value.const_value = None
    return model


def store(folder: Path, key: str, model, weight_names) -> None:
    """Write ``model`` (a fresh trace) under ``key``, its initializers named in ``weight_names`` held out; the
    model is left as it was. Best effort: a cache that cannot be written costs the next export a trace, no more."""
    import tempfile

    import onnx_ir as ir

    saved = {}
    try:
        for name, value in model.graph.initializers.items():
            if name in weight_names:
                saved[name] = value.const_value
                value.const_value = ir.ExternalTensor(HELD_OUT, 0, 0, value.dtype, shape=value.shape, name=name,
                                                      base_dir=str(folder))
        data = ir.serde.serialize_model(model).SerializeToString()
    except Exception:
        return
    finally:
        for name, const in saved.items():
            model.graph.initializers[name].const_value = const
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)  # one per writer
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, folder / f"{key}.onnx")
        tmp = None
    except OSError:
        return
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def evict(folder: Path, key: str) -> None:
    (folder / f"{key}.onnx").unlink(missing_ok=True)


# -- the key's parts ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {"python": sys.version}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
    """sha256 over every .py file of illume_rt's packages (as installed: the checkout for an editable install)."""
    from illume_rt.files import source_files

    digest = hashlib.sha256()
    for path in source_files(PACKAGES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _function(fn, depth: int = 0, seen: frozenset = frozenset()) -> list:
    """A function by name and bytecode (constants, nested code and names included) and what its closure holds."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if code is None:  # a builtin: its name says what it is
        return ["builtin", name]
    if id(fn) in seen:
        return ["cycle", name]
    defaults = [repr(d) for d in (fn.__defaults__ or ())]
    seen = seen | {id(fn)}
    captured = []
    for cell in fn.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # a cell not yet filled
            captured.append(["empty"])
            continue
        captured.append(_describe(contents, set(seen), depth + 1))
    return ["function", name, _code_digest(code), defaults, captured]


def _code_digest(code) -> str:
    """sha256 of a code object's bytecode, names and constants (nested code included). Not ``marshal.dumps``: from
    Python 3.11 on, it dumps the interpreter's specialised bytecode, which changes as the function runs."""
    digest = hashlib.sha256()
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest.update(b"code:" + _code_digest(const).encode())
        elif isinstance(const, frozenset):  # `x in {...}`: its order follows string hashing, which varies by process
            digest.update(repr(("frozenset", sorted(map(repr, const)))).encode())
        else:
            digest.update(repr((type(const).__name__, const)).encode())
    return digest.hexdigest()


def _type(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module(module) -> list:
    from illume_rt.export import streaming

    entries = []
    for name, sub in module.named_modules(remove_duplicate=False):
        attributes = {}
        for key, value in vars(sub).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue  # the tensors are listed below, by name; the submodules are entries of their own
            if "hook" in key:
                if value:  # a hook can change what forward computes, in ways the key cannot see
                    raise Uncacheable(f"{name or 'the network'} has {key}")
                continue
            attributes[key] = _describe(value, set(), 0)
        entries.append([name, _type(type(sub)), _function(type(sub).forward), attributes])
    tensors = [[name, list(t.shape), str(t.dtype), streaming.is_fake(t)]
               for name, t in streaming.module_tensors(module).items()]
    return [entries, tensors]


def _describe(value, seen: set, depth: int):
    """A JSON-able description of ``value`` that differs whenever a trace could read it differently."""
    import numpy as np
    import torch

    if depth > MAX_DEPTH:
        raise Uncacheable("nested too deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, enum.Enum):
        return ["enum", _type(type(value)), repr(value.value)]
    if isinstance(value, (torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)):
        return [type(value).__name__, str(value)]
    if isinstance(value, torch.Tensor):
        from illume_rt.export import streaming

        if streaming.is_fake(value):
            return ["fake", list(value.shape), str(value.dtype)]
        data = value.detach().contiguous().cpu()
        return ["tensor", list(data.shape), str(data.dtype),
                hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()]
    if isinstance(value, np.ndarray):
        return ["ndarray", list(value.shape), str(value.dtype), hashlib.sha256(np.ascontiguousarray(value)).hexdigest()]
    if isinstance(value, torch.nn.Module):  # a reference to a module, not one of its submodules: its kind only
        return ["module", _type(type(value))]
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)):
        if isinstance(value, functools.partial):
            return ["partial", _function(value.func, depth + 1, frozenset(seen)), _describe(value.args, seen, depth + 1),
                    _describe(value.keywords, seen, depth + 1)]
        return _function(value, depth + 1, frozenset(seen))
    if isinstance(value, type):
        return ["class", _type(value)]
    if isinstance(value, types.ModuleType):  # a Python module (its code is keyed by version or by source)
        return ["pymodule", value.__name__]
    if id(value) in seen:
        return ["cycle"]
    if isinstance(value, (list, tuple)):
        seen = seen | {id(value)}
        return [type(value).__name__, [_describe(v, seen, depth + 1) for v in value]]
    if isinstance(value, (set, frozenset)):
        items = [_describe(v, seen | {id(value)}, depth + 1) for v in value]
        return ["set", sorted(items, key=lambda d: json.dumps(d, sort_keys=True))]
    if isinstance(value, dict):
        seen = seen | {id(value)}
        return ["dict", _type(type(value)), sorted(([repr(k), _describe(v, seen, depth + 1)] for k, v in value.items()
                                                    if k not in UNKEYED_FIELDS), key=lambda kv: kv[0])]
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):  # a config, a dataclass, a dim hint: its class and its fields
        return ["object", _type(type(value)), _describe(state, seen | {id(value)}, depth + 1)]
    text = repr(value)
    if " at 0x" in text:
        raise Uncacheable(f"a {_type(type(value))} that only its address names")
    return ["repr", _type(type(value)), text]
