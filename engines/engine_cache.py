"""The engine cache: where built TensorRT engines live in a bundle, what they are keyed by, and the refusal of an
engine built for another GPU or TensorRT version. Pure Python, tested without TensorRT.

Layout (inside the bundle; the manifest is not touched, so the bundle's hashes stay valid)::

    bundle/engines/
      index.json                              every engine built here, with its key fields
      <component>.<precision>.<key16>.plan    serialized engine
      timing.cache                            TensorRT timing cache shared by the builds of this bundle

A key is the sha256 of: the graph's sha256 (from the manifest), precision, quantization recipe, the build
recipe (optimization level, profiles, workspace, builder flags: weight streaming, refit, editable timing cache),
TensorRT major.minor version (``11.4``; the full build version is recorded in the index entry as
``tensorrt_build``), GPU name and compute capability. Any change to one of them is a different engine file, so a stale engine is never picked up.
Every file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from illume_rt.errors import IllumeError

ENGINE_DIR = "engines"
INDEX = "index.json"
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


class EngineCacheError(IllumeError, RuntimeError):
    """No usable engine; the message names the command that builds one."""


def major_minor(version: str) -> str:
    """``11.4.0.106`` -> ``11.4``: what the engine cache key holds."""
    parts = str(version).split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"not a TensorRT version: {version!r}")
    return ".".join(parts[:2])


@dataclass(frozen=True)
class DeviceInfo:
    tensorrt_version: str  # major.minor (see major_minor)
    gpu_name: str
    compute_capability: str  # "9.0"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (sm_{self.compute_capability.replace('.', '')})"


@dataclass(frozen=True)
class EngineKey:
    component: str
    graph_sha256: str
    precision: str
    recipe: str  # quantization recipe of the graph ("none" for float graphs)
    build: dict = field(default_factory=dict)  # optimization level, profiles, strongly typed, workspace
    device: DeviceInfo | None = None

    def digest(self) -> str:
        payload = {"component": self.component, "graph_sha256": self.graph_sha256, "precision": self.precision,
                   "recipe": self.recipe, "build": self.build,
                   "device": asdict(self.device) if self.device else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def filename(self) -> str:
        return f"{self.component}.{self.precision}.{self.digest()[:16]}.plan"

    def to_dict(self) -> dict:
        return {"component": self.component, "graph_sha256": self.graph_sha256, "precision": self.precision,
                "recipe": self.recipe, "build": self.build, "device": asdict(self.device) if self.device else None,
                "key": self.digest(), "file": self.filename()}


def rebuild_command(bundle_path: Path | str, precision: str | None = None, opt_level: int | None = None) -> str:
    """The command that builds a bundle's engines. Their precision is the bundle's (strongly typed), so
    ``precision`` is only named when it is not the bundle's own (then the bundle must be re-made first)."""
    cmd = f"illume-rt build-engines {bundle_path}"
    return cmd + (f" --opt-level {opt_level}" if opt_level is not None else "")


def engine_dir(bundle_path: Path | str) -> Path:
    return Path(bundle_path) / ENGINE_DIR


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, fsync, rename onto ``path``: readers see the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_index(bundle_path: Path | str) -> dict:
    path = engine_dir(bundle_path) / INDEX
    if not path.is_file():
        return {"engines": []}
    return json.loads(path.read_text())


def record_engine(bundle_path: Path | str, key: EngineKey, extra: dict | None = None) -> None:
    """Add (or replace) the index entry of ``key``'s engine. The engine file must already be in place."""
    index = read_index(bundle_path)
    entries = [e for e in index["engines"] if e["key"] != key.digest()
               and not (e["component"] == key.component and e["precision"] == key.precision
                        and e.get("device") == (asdict(key.device) if key.device else None))]
    entry = key.to_dict()
    entry.update(extra or {})
    entries.append(entry)
    index["engines"] = sorted(entries, key=lambda e: (e["component"], e["precision"]))
    write_atomic(engine_dir(bundle_path) / INDEX, json.dumps(index, indent=1).encode())


def find_engine(bundle_path: Path | str, component: str, graph_sha256: str, device: DeviceInfo,
                precision: str | None = None) -> dict:
    """The index entry of an engine for ``component`` usable on ``device``, or an EngineCacheError that says why
    not (none built; built for another GPU / TensorRT version; built from another graph) and names the command."""
    entries = [e for e in read_index(bundle_path)["engines"] if e["component"] == component
               and (precision is None or e["precision"] == precision)]
    rebuild = rebuild_command(bundle_path)
    if not entries:
        raise EngineCacheError(f"no TensorRT engine for {component}"
                               f"{' at ' + precision if precision else ''} in {engine_dir(bundle_path)}; "
                               f"build them with `{rebuild}`")
    here = asdict(device)
    for entry in entries:
        if entry.get("device") == here and entry["graph_sha256"] == graph_sha256:
            path = engine_dir(bundle_path) / entry["file"]
            if not path.is_file():
                raise EngineCacheError(f"engine file {path} listed in the index is missing; rebuild with "
                                       f"`{rebuild}`")
            return entry
    entry = entries[0]
    if entry["graph_sha256"] != graph_sha256:
        raise EngineCacheError(f"the {component} engine was built from another graph (sha256 "
                               f"{entry['graph_sha256'][:12]}, bundle has {graph_sha256[:12]}); rebuild with "
                               f"`{rebuild}`")
    built = DeviceInfo(**entry["device"])
    raise EngineCacheError(f"the {component} engine was built for {built.describe()}; this machine has "
                           f"{device.describe()}. TensorRT engines only run on the GPU model and TensorRT version "
                           f"they were built for: rebuild with `{rebuild}`")
