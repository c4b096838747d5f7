"""The real TensorRT Python API without a GPU, and an AST walk of engines/ that checks every TensorRT name and call
against it. Used by tests/test_trt_api.py; also a script:

    python tests/trt_api.py [VERSION ...]      # check engines/ against these TensorRT versions, print the findings

How the real API is loaded: PyPI's ``tensorrt-cu13-bindings`` (11.x) and ``tensorrt-cu12-bindings`` (10.x) wheels
hold the real pybind11 module ``tensorrt_bindings``. It links ``libnvinfer``, ``libnvinfer_plugin`` and
``libnvonnxparser`` (``.so.11`` / ``.so.10``) and calls nine C functions from them (the builder, runtime, refitter,
parser and parser-refitter factories, the two plugin registries, plugin init, the parser version). Three stub
libraries defining those nine (returning null/0), built here with the system C compiler and loaded with
RTLD_GLOBAL before the import, satisfy the dynamic linker. Every class, enum member, property and method signature
(pybind11 puts the signatures in the docstrings) can then be read; nothing can be built or run (every factory
returns null).

The dump runs in a subprocess per version (two versions of one module cannot share a process) and is cached as
JSON beside the wheels: ``$ILLUME_RT_CACHE/trt-api`` (default ``~/.cache/illume-rt/trt-api``).

What the walk checks, per file of engines/ (file:line for each finding):
- ``trt.X`` names: classes, functions, enums of the module; ``trt.Enum.MEMBER`` members; attributes of an object
  whose TensorRT type is known: the method or property must exist on that class (or a base);
- each call of a TensorRT function, constructor or method: positional count and keyword names must fit one of
  its overloads (self excluded); an argument whose TensorRT type is known must match a TensorRT-typed parameter;
- assignments to properties (``config.builder_optimization_level = 3``): the property must have a setter;
- ``getattr(trt_object, name)`` with a name that is not a string literal: refused (it cannot be checked);
- coverage: in a file that uses TensorRT, an attribute that only TensorRT classes define (``execute_async_v3``,
  ``num_io_tensors``...) on an object whose type the walk cannot tell is an error: annotate the object
  (``context: trt.IExecutionContext``, under ``if TYPE_CHECKING: import tensorrt as trt``).

How types are known: ``trt`` is the tensorrt module (``trt = import_tensorrt()``, or a parameter named ``trt``);
``trt.Class(...)`` is an instance; a method's or property's return type comes from its signature; variables and
``self.`` attributes take the type of what is assigned to them; annotations (``x: trt.ICudaEngine``,
``list[trt.IExecutionContext]``, a project class) give the type of parameters and attributes.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The versions checked: the current 11.x and the last 10.x (the oldest supported; see docs/engines.md).
VERSIONS = {"11.4.0.106": "tensorrt-cu13-bindings", "10.16.1.11": "tensorrt-cu12-bindings"}
C_FUNCTIONS = {
    "nvinfer": ["createInferBuilder_INTERNAL", "createInferRuntime_INTERNAL", "createInferRefitter_INTERNAL",
                "getPluginRegistry", "getBuilderPluginRegistry"],
    "nvinfer_plugin": ["initLibNvInferPlugins"],
    "nvonnxparser": ["createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getNvOnnxParserVersion"],
}
ROOT = Path(__file__).resolve().parents[1]


class ApiUnavailable(RuntimeError):
    """The wheel could not be downloaded or the stubs could not be built (the message says which and why)."""


def cache_dir() -> Path:
    base = os.environ.get("ILLUME_RT_CACHE") or str(Path.home() / ".cache" / "illume-rt")
    return Path(base) / "trt-api"


# ------------------------------------------------------------------------------------------------------------------
# Wheels, stubs, dump
# ------------------------------------------------------------------------------------------------------------------

def wheel_dir(version: str) -> Path:
    """Folder holding the unpacked ``tensorrt_bindings`` of ``version`` (downloaded with pip once)."""
    import zipfile

    out = cache_dir() / f"bindings-{version}-py{sys.version_info[0]}{sys.version_info[1]}"
    if (out / "tensorrt_bindings" / "__init__.py").is_file():
        return out
    dist = VERSIONS.get(version)
    if dist is None:
        dist = "tensorrt-cu13-bindings" if version.startswith("11.") else "tensorrt-cu12-bindings"
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"{dist.replace('-', '_')}-{version}-cp{sys.version_info[0]}{sys.version_info[1]}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels),
               f"{dist}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        if proc.returncode or not found:
            raise ApiUnavailable(f"could not download {dist}=={version} from PyPI ({' '.join(cmd)}): "
                                 f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no wheel'}")
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(found[-1]) as zf:
        zf.extractall(tmp)
    os.replace(tmp, out)
    return out


def stub_dir(major: str) -> Path:
    """Three stub libraries (libnvinfer.so.MAJOR, ...) defining the nine functions the bindings call."""
    out = cache_dir() / f"stubs-{major}"
    names = [f"lib{lib}.so.{major}" for lib in C_FUNCTIONS]
    if all((out / n).is_file() for n in names):
        return out
    out.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    for lib, funcs in C_FUNCTIONS.items():
        src = out / f"{lib}.c"
        src.write_text("".join(f"void *{f}(void) {{ return 0; }}\n" for f in funcs))
        so = out / f"lib{lib}.so.{major}"
        cmd = [cc, "-shared", "-fPIC", f"-Wl,-soname,{so.name}", "-o", str(so) + ".tmp", str(src)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise ApiUnavailable(f"no C compiler ({cc}) to build the TensorRT link stubs; install gcc") from None
        if proc.returncode:
            raise ApiUnavailable(f"building {so.name} failed: {proc.stderr.strip()}")
        os.replace(str(so) + ".tmp", so)
    return out


def load_api(version: str) -> dict:
    """The API description of one TensorRT version (cached JSON; made by a subprocess on first use)."""
    path = cache_dir() / f"api-{version}.json"
    if path.is_file():
        return json.loads(path.read_text())
    bindings = wheel_dir(version)
    stubs = stub_dir(version.split(".")[0])
    proc = subprocess.run([sys.executable, __file__, "--dump", str(bindings), str(stubs)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"dumping the TensorRT {version} API failed:\n{proc.stderr[-3000:]}")
    api = json.loads(proc.stdout)
    if api["version"] != version:
        raise RuntimeError(f"asked for TensorRT {version}, the wheel says {api['version']}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(api))
    os.replace(tmp, path)
    return api


_PREFIX = re.compile(r"\btensorrt_bindings\.tensorrt\.|\btensorrt\.tensorrt\.")


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def parse_signature(line: str) -> dict | None:
    """``name(self: T, a: int, b: X = <...>) -> R`` (a pybind11 docstring line) -> params and return type."""
    m = re.match(r"^\s*(?:\d+\.\s*)?(\w+)\((.*)\)\s*->\s*(.+?)\s*$", line)
    if not m:
        return None
    params = []
    for raw in _split_top(m.group(2)):
        kind = "pos"
        if raw.startswith("**"):
            kind, raw = "varkw", raw[2:]
        elif raw.startswith("*"):
            kind, raw = "varargs", raw[1:]
        name_type, _, default = raw.partition("=")
        name, _, typ = name_type.partition(":")
        params.append({"name": name.strip(), "type": _PREFIX.sub("", typ.strip()), "default": bool(default.strip()),
                       "kind": kind})
    return {"name": m.group(1), "params": params, "ret": _PREFIX.sub("", m.group(3).strip())}


def _signatures(doc: str | None) -> list[dict]:
    if not doc:
        return []
    lines = doc.strip().splitlines()
    if "Overloaded function." in doc:
        sigs = [parse_signature(ln) for ln in lines if re.match(r"^\s*\d+\.\s*\w+\(", ln)]
    else:
        sigs = [parse_signature(lines[0])]
    return [s for s in sigs if s]


def _dump(bindings: str, stubs: str) -> dict:
    """Runs in a subprocess: load the stubs, import the real bindings, describe every public name."""
    import ctypes
    import inspect

    for so in sorted(Path(stubs).glob("lib*.so.*")):
        if not so.name.endswith(".tmp"):
            ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, bindings)
    import tensorrt_bindings as trt

    classes: dict[str, dict] = {}

    def qual(cls) -> str:
        return cls.__qualname__

    def describe_class(cls) -> None:
        name = qual(cls)
        if name in classes:
            return
        entry = {"bases": [qual(b) for b in cls.__mro__[1:] if b.__module__ == cls.__module__], "members": {}}
        classes[name] = entry
        for attr in dir(cls):
            if attr.startswith("__") and attr not in ("__init__", "__call__", "__getitem__", "__len__",
                                                       "__enter__", "__exit__", "__int__", "__index__"):
                continue
            try:
                value = inspect.getattr_static(cls, attr)
            except AttributeError:
                continue
            if isinstance(value, property):
                sig = _signatures(value.fget.__doc__ if value.fget else None)
                entry["members"][attr] = {"kind": "property", "type": sig[0]["ret"] if sig else "",
                                          "settable": value.fset is not None}
            elif isinstance(value, type):
                if value.__module__ == trt.tensorrt.__name__:
                    describe_class(value)
                entry["members"][attr] = {"kind": "class", "type": qual(value)}
            elif isinstance(value, (staticmethod, classmethod)):
                entry["members"][attr] = {"kind": "static", "sigs": _signatures(getattr(cls, attr).__doc__)}
            elif type(getattr(cls, attr)).__module__ == trt.tensorrt.__name__ or not callable(value):
                entry["members"][attr] = {"kind": "value", "type": qual(type(getattr(cls, attr)))}
            else:
                entry["members"][attr] = {"kind": "method", "sigs": _signatures(getattr(value, "__doc__", None))}

    module: dict[str, dict] = {}
    for name in dir(trt):
        if name.startswith("_"):
            continue
        value = getattr(trt, name)
        if isinstance(value, type):
            describe_class(value)
            module[name] = {"kind": "class", "type": qual(value)}
        elif inspect.isfunction(value):
            sig = inspect.signature(value)
            params = [{"name": p.name, "type": "", "default": p.default is not p.empty,
                       "kind": {p.VAR_POSITIONAL: "varargs", p.VAR_KEYWORD: "varkw"}.get(p.kind, "pos")}
                      for p in sig.parameters.values()]
            module[name] = {"kind": "function", "sigs": [{"name": name, "params": params, "ret": ""}]}
        elif callable(value) and type(value).__name__ == "builtin_function_or_method":
            module[name] = {"kind": "function", "sigs": _signatures(value.__doc__)}
        elif isinstance(value, type(sys)):
            module[name] = {"kind": "module"}
        else:
            module[name] = {"kind": "value", "type": qual(type(value))}
    module["__version__"] = {"kind": "value", "type": "str"}
    return {"version": trt.__version__, "module": module, "classes": classes}


# ------------------------------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------------------------------

MODULE = ("module",)


@dataclass(frozen=True)
class T:
    """A type the walk knows: a TensorRT class object, a TensorRT instance, a project class instance, a list."""
    kind: str  # "cls" | "inst" | "proj" | "list" | "func" | "method"
    name: str
    item: "T | None" = None
    owner: str = ""  # for "method": the class it was found on


@dataclass
class Finding:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class _ClassInfo:
    attrs: dict = field(default_factory=dict)  # self.<name> -> T
    methods: set = field(default_factory=set)


class ApiChecker:
    def __init__(self, api: dict) -> None:
        self.api = api
        self.version = api["version"]
        self.findings: list[Finding] = []
        self.project: dict[str, _ClassInfo] = {}
        trt_names = set()
        for cls in api["classes"].values():
            trt_names |= set(cls["members"])
        common = set()
        for obj in (list, dict, str, bytes, int, float, tuple, set, object, Path, memoryview):
            common |= set(dir(obj))
        try:
            import numpy as np

            common |= set(dir(np.ndarray)) | set(dir(np.dtype))
        except ImportError:
            pass
        try:  # onnx protos (model.graph.node ...)
            import onnx

            for proto in (onnx.ModelProto, onnx.GraphProto, onnx.NodeProto, onnx.TensorProto, onnx.ValueInfoProto):
                common |= set(dir(proto)) | set(proto.DESCRIPTOR.fields_by_name)
        except ImportError:
            pass
        self.trt_only = {n for n in trt_names if not n.startswith("_")} - common
        self.checked = 0  # TensorRT names resolved and checked

    # -- API lookups -------------------------------------------------------------------------------------------
    def member(self, cls: str, name: str) -> tuple[dict | None, str]:
        for c in [cls, *self.api["classes"].get(cls, {}).get("bases", [])]:
            m = self.api["classes"].get(c, {}).get("members", {}).get(name)
            if m is not None:
                return m, c
        return None, cls

    def type_of_name(self, typ: str) -> T | None:
        typ = typ.strip()
        m = re.fullmatch(r"(?:typing\.)?Optional\[(.+)\]", typ)
        if m:
            typ = m.group(1)
        return T("inst", typ) if typ in self.api["classes"] else None

    def is_a(self, cls: str, want: str) -> bool:
        return cls == want or want in self.api["classes"].get(cls, {}).get("bases", [])

    # -- entry points --------------------------------------------------------------------------------------------
    def check_files(self, paths: list[Path], root: Path) -> list[Finding]:
        trees = {}
        for path in paths:
            trees[path] = ast.parse(path.read_text(), str(path))
        for tree in trees.values():  # project classes: names, methods, annotated class attributes
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    info = self.project.setdefault(node.name, _ClassInfo())
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            info.methods.add(item.name)
        # names the project's own classes define (here and in runtime/) are not TensorRT-only
        for path in sorted(root.glob("*/*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            self.trt_only.discard(item.name)
                        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                            self.trt_only.discard(item.target.id)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                        isinstance(node.value, ast.Name) and node.value.id == "self":
                    self.trt_only.discard(node.attr)
        for final in (False, True):  # pass 1 learns self.<attr> types, pass 2 reports
            for path, tree in trees.items():
                rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
                uses_trt = any(isinstance(n, ast.Name) and n.id == "trt" for n in ast.walk(tree))
                _Walker(self, rel, final, uses_trt).visit_module(tree)
        return self.findings

    def report(self, path: str, line: int, message: str) -> None:
        f = Finding(path, line, message)
        if not any(str(x) == str(f) for x in self.findings):
            self.findings.append(f)


def _bind(sig: dict, n_pos: int, keywords: list[str], skip_self: bool) -> str | None:
    """None if a call with ``n_pos`` positionals and ``keywords`` fits ``sig``, else why not."""
    params = list(sig["params"])
    if skip_self and params and params[0]["name"] in ("self", "arg0"):
        params = params[1:]
    positional = [p for p in params if p["kind"] == "pos"]
    varargs = any(p["kind"] == "varargs" for p in params)
    varkw = any(p["kind"] == "varkw" for p in params)
    if n_pos > len(positional) and not varargs:
        return f"{n_pos} positional arguments, it takes at most {len(positional)}"
    filled = {p["name"] for p in positional[:n_pos]}
    for kw in keywords:
        if kw in filled:
            return f"keyword {kw!r} is already given by position"
        if kw not in {p["name"] for p in positional} and not varkw:
            return f"no parameter named {kw!r}"
        filled.add(kw)
    missing = [p["name"] for p in positional if not p["default"] and p["name"] not in filled]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def _sig_text(sig: dict, skip_self: bool) -> str:
    params = sig["params"][1:] if skip_self and sig["params"] and sig["params"][0]["name"] in ("self", "arg0") \
        else sig["params"]
    return f"{sig['name']}({', '.join(p['name'] + ('=...' if p['default'] else '') for p in params)})"


class _Walker:
    def __init__(self, checker: ApiChecker, path: str, final: bool, uses_trt: bool) -> None:
        self.c, self.path, self.final, self.uses_trt = checker, path, final, uses_trt
        self.cls: str | None = None
        self.foreign: set[str] = set()  # names bound to other imported modules

    def err(self, node, message: str) -> None:
        if self.final:
            self.c.report(self.path, node.lineno, f"TensorRT {self.c.version}: {message}")

    # -- structure -----------------------------------------------------------------------------------------------
    def visit_module(self, tree: ast.Module) -> None:
        env: dict[str, T | tuple] = {}
        self.block(tree.body, env)

    def block(self, stmts, env) -> None:
        for stmt in stmts:
            self.stmt(stmt, env)

    def annotation(self, node) -> T | tuple | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(node, ast.BinOp):  # X | None
            return self.annotation(node.left) or self.annotation(node.right)
        if isinstance(node, ast.Subscript):
            base = node.value.id if isinstance(node.value, ast.Name) else ""
            if base in ("list", "List", "Sequence", "tuple"):
                inner = self.annotation(node.slice)
                return T("list", "list", inner) if isinstance(inner, T) else None
            if base == "Optional":
                return self.annotation(node.slice)
            return None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            t = self.attr_type(node, MODULE, node.attr)
            return T("inst", t.name) if isinstance(t, T) and t.kind == "cls" else None
        if isinstance(node, ast.Name) and node.id in self.c.project:
            return T("proj", node.id)
        return None

    def function(self, fn, env_outer) -> None:
        env = dict(env_outer)
        args = fn.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if a.arg == "trt":
                env[a.arg] = MODULE
            elif a.arg == "self" and self.cls:
                env[a.arg] = T("proj", self.cls)
            else:
                t = self.annotation(a.annotation)
                if t is not None:
                    env[a.arg] = t
                else:
                    env.pop(a.arg, None)
        for d in fn.decorator_list:
            self.expr(d, env)
        self.block(fn.body, env)

    def stmt(self, node, env) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.function(node, env)
        elif isinstance(node, ast.ClassDef):
            outer, self.cls = self.cls, node.name
            for b in node.bases:
                self.expr(b, env)
            info = self.c.project.setdefault(node.name, _ClassInfo())
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    t = self.annotation(item.annotation)
                    if t is not None:
                        info.attrs[item.target.id] = t
            self.block(node.body, env)
            self.cls = outer
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                if isinstance(node, ast.Import) and alias.name == "tensorrt":
                    env[name] = MODULE
                elif isinstance(node, ast.Import):
                    self.foreign.add(name)
                    env.pop(name, None)
                else:
                    env.pop(name, None)
        elif isinstance(node, ast.Assign):
            value = self.expr(node.value, env)
            for target in node.targets:
                self.assign(target, value, node.value, env)
        elif isinstance(node, ast.AnnAssign):
            value = self.expr(node.value, env) if node.value is not None else None
            t = self.annotation(node.annotation) or value
            self.assign(node.target, t, node.value, env)
        elif isinstance(node, ast.AugAssign):
            self.expr(node.value, env)
            self.expr(node.target, env)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            it = self.expr(node.iter, env)
            item = it.item if isinstance(it, T) and it.kind == "list" else None
            self.assign(node.target, item, None, env)
            self.block(node.body, env)
            self.block(node.orelse, env)
        elif isinstance(node, (ast.If, ast.While)):
            self.expr(node.test, env)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                return  # annotation-only imports
            self.block(node.body, env)
            self.block(node.orelse, env)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                v = self.expr(item.context_expr, env)
                if item.optional_vars is not None:
                    self.assign(item.optional_vars, v, None, env)
            self.block(node.body, env)
        elif isinstance(node, ast.Try):
            self.block(node.body, env)
            for h in node.handlers:
                if h.type is not None:
                    self.expr(h.type, env)
                self.block(h.body, env)
            self.block(node.orelse, env)
            self.block(node.finalbody, env)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child, env)
                elif isinstance(child, ast.stmt):
                    self.stmt(child, env)

    def assign(self, target, value, value_node, env) -> None:
        if isinstance(target, ast.Name):
            if value is None:
                env.pop(target.id, None)
            else:
                env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = value_node.elts if isinstance(value_node, (ast.Tuple, ast.List)) and \
                len(value_node.elts) == len(target.elts) else [None] * len(target.elts)
            for t, v in zip(target.elts, values):
                self.assign(t, self.expr(v, env) if v is not None else None, v, env)
        elif isinstance(target, ast.Attribute):
            owner = self.expr(target.value, env)
            if isinstance(owner, T) and owner.kind == "proj":
                info = self.c.project.setdefault(owner.name, _ClassInfo())
                if value is not None and target.attr not in info.attrs:
                    info.attrs[target.attr] = value
                elif isinstance(value, T) and value.kind == "list" and value.item is None:
                    pass
            elif isinstance(owner, T) and owner.kind == "inst":
                m, found = self.c.member(owner.name, target.attr)
                if m is None:
                    self.err(target, f"{owner.name} has no attribute {target.attr!r}")
                elif m["kind"] != "property" or not m.get("settable"):
                    self.err(target, f"{found}.{target.attr} cannot be assigned (read-only or not a property)")
                else:
                    self.c.checked += 1
            elif owner is None and self.uses_trt and target.attr in self.c.trt_only:
                self.err(target, f"cannot tell which TensorRT object {ast.unparse(target.value)!r} is "
                                 f"(assigning {target.attr!r}); annotate it")
        elif isinstance(target, ast.Subscript):
            self.expr(target.value, env)
            self.expr(target.slice, env)
        elif isinstance(target, ast.Starred):
            self.assign(target.value, None, None, env)

    # -- expressions ---------------------------------------------------------------------------------------------
    def attr_type(self, node, owner, attr: str):
        """Type of ``owner.attr``; reports a missing name."""
        if owner == MODULE:
            m = self.c.api["module"].get(attr)
            if m is None:
                self.err(node, f"module tensorrt has no {attr!r}")
                return None
            self.c.checked += 1
            if m["kind"] == "class":
                return T("cls", m["type"])
            if m["kind"] == "function":
                return T("func", attr, owner="<module>")
            return None
        if not isinstance(owner, T):
            return None
        if owner.kind in ("cls", "inst"):
            m, found = self.c.member(owner.name, attr)
            if m is None:
                what = "class" if owner.kind == "cls" else "object"
                self.err(node, f"{owner.name} {what} has no attribute {attr!r}")
                return None
            self.c.checked += 1
            if m["kind"] == "class":
                return T("cls", m["type"])
            if m["kind"] in ("method", "static"):
                return T("method", attr, owner=found)
            if m["kind"] == "property":
                return self.c.type_of_name(m["type"]) if owner.kind == "inst" else None
            if m["kind"] == "value":
                return T("inst", m["type"]) if m["type"] in self.c.api["classes"] else None
        if owner.kind == "proj":
            info = self.c.project.get(owner.name)
            if info is not None:
                return info.attrs.get(attr)
        return None

    def expr(self, node, env):
        if node is None:
            return None
        if isinstance(node, ast.Name):
            if node.id == "trt":
                return env.get("trt", MODULE)
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.expr(node.value, env)
            if owner is None and self.uses_trt and node.attr in self.c.trt_only and not (
                    isinstance(node.value, ast.Name) and node.value.id in self.foreign):
                self.err(node, f"cannot tell which TensorRT object {ast.unparse(node.value)!r} is (uses "
                               f"{node.attr!r}); annotate it")
            return self.attr_type(node, owner, node.attr)
        if isinstance(node, ast.Call):
            return self.call(node, env)
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value, env)
            self.expr(node.slice, env)
            if isinstance(base, T) and base.kind == "list":
                return base.item
            return None
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.expr(e, env) for e in node.elts]
            known = {i for i in items if isinstance(i, T)}
            return T("list", "list", known.pop()) if len(known) == 1 else None
        if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                it = self.expr(gen.iter, inner)
                self.assign(gen.target, it.item if isinstance(it, T) and it.kind == "list" else None, None, inner)
                for cond in gen.ifs:
                    self.expr(cond, inner)
            if isinstance(node, ast.DictComp):
                self.expr(node.key, inner)
                self.expr(node.value, inner)
                return None
            elt = self.expr(node.elt, inner)
            return T("list", "list", elt) if isinstance(elt, T) else None
        if isinstance(node, ast.Lambda):
            inner = dict(env)
            for a in node.args.args:
                inner.pop(a.arg, None)
            self.expr(node.body, inner)
            return None
        if isinstance(node, ast.NamedExpr):
            v = self.expr(node.value, env)
            self.assign(node.target, v, node.value, env)
            return v
        if isinstance(node, ast.IfExp):
            self.expr(node.test, env)
            a, b = self.expr(node.body, env), self.expr(node.orelse, env)
            return a if a == b else (a or b)
        if isinstance(node, ast.BoolOp):
            vals = [self.expr(v, env) for v in node.values]
            known = [v for v in vals if v is not None]
            return known[0] if known else None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, env)
            elif isinstance(child, ast.comprehension):
                self.expr(child.iter, env)
        return None

    def call(self, node: ast.Call, env):
        args = [self.expr(a, env) for a in node.args]
        for kw in node.keywords:
            self.expr(kw.value, env)
        if isinstance(node.func, ast.Name) and node.func.id == "import_tensorrt":
            return MODULE
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr") and node.args:
            owner = args[0]
            if owner == MODULE or isinstance(owner, T) and owner.kind in ("cls", "inst"):
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    if node.func.id == "hasattr":
                        return None  # a feature probe: both outcomes are handled by the caller
                    if len(node.args) > 2 and node.func.id == "getattr":
                        return None  # getattr with a default: a feature probe
                    return self.attr_type(node, owner, name.value)
                self.err(node, f"{node.func.id}() on a TensorRT object with a computed name cannot be checked; "
                               "name the attribute")
            return None
        func = self.expr(node.func, env)
        if not isinstance(func, T):
            if isinstance(node.func, ast.Name) and node.func.id in self.c.project:
                return T("proj", node.func.id)
            return None
        n_pos = len(node.args)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return None  # *args / **kwargs: not checkable by count
        keywords = [k.arg for k in node.keywords]
        if func.kind == "cls":
            m, _ = self.c.member(func.name, "__init__")
            sigs = m.get("sigs", []) if m else []
            label, skip, ret = f"{func.name}()", True, T("inst", func.name)
        elif func.kind == "func":
            sigs = self.c.api["module"][func.name].get("sigs", [])
            label, skip, ret = f"tensorrt.{func.name}()", False, None
        elif func.kind == "method":
            m, _ = self.c.member(func.owner, func.name)
            sigs = m.get("sigs", [])
            label, skip = f"{func.owner}.{func.name}()", m["kind"] == "method"
            ret = None
        else:
            return None
        if not sigs:
            return ret
        why = []
        for sig in sigs:
            problem = _bind(sig, n_pos, keywords, skip)
            if problem is None:
                problem = self.check_arg_types(sig, args, node, skip)
            if problem is None:
                self.c.checked += 1
                if func.kind != "cls":
                    ret = self.c.type_of_name(sig["ret"])
                return ret
            why.append(f"{_sig_text(sig, skip)}: {problem}")
        self.err(node, f"{label} called with {n_pos} positional and keywords {keywords}; no signature fits: "
                       + "; ".join(why))
        return ret

    def check_arg_types(self, sig: dict, args, node: ast.Call, skip: bool) -> str | None:
        params = sig["params"][1:] if skip and sig["params"] and sig["params"][0]["name"] in ("self", "arg0") \
            else sig["params"]
        pairs = list(zip(params, args))
        by_name = {p["name"]: p for p in params}
        for kw in node.keywords:
            if kw.arg in by_name:
                pairs.append((by_name[kw.arg], self.expr(kw.value, {})))  # names only: type from literal envs
        for p, a in pairs:
            want = self.c.type_of_name(p["type"])
            if want is None or not isinstance(a, T) or a.kind != "inst":
                continue
            if not self.c.is_a(a.name, want.name):
                return f"argument {p['name']} is a {a.name}, the parameter takes {want.name}"
        return None


def engine_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "engines").glob("*.py"))


def check_engines(version: str, root: Path = ROOT) -> tuple[list[Finding], int]:
    checker = ApiChecker(load_api(version))
    findings = checker.check_files(engine_files(root), root)
    return findings, checker.checked


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--dump"]:
        print(json.dumps(_dump(argv[1], argv[2])))
        return 0
    status = 0
    for version in argv or list(VERSIONS):
        findings, checked = check_engines(version)
        print(f"TensorRT {version}: {checked} names/calls checked, {len(findings)} findings")
        for f in findings:
            print(f"  {f}")
        status |= bool(findings)
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
