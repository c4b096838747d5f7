"""Loading and validating a bundle (see docs/bundle-format.md). No torch here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from illume_rt.runtime.layout import VocabLayout

FORMAT_NAME = "illume-rt-bundle"
FORMAT_VERSION = 2  # 2: per-layer cache inputs of the llm graph (docs/bundle-format.md)
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used as it is; the message names the fix."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def vocab(self) -> VocabLayout:
        return VocabLayout.from_dict(self.manifest["vocab"])

    @property
    def llm(self) -> dict:
        return self.manifest["llm"]

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["model"].get("random_weights"))

    def component(self, name: str) -> dict:
        try:
            return self.manifest["components"][name]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no component {name!r} "
                              f"(has {', '.join(self.manifest['components'])}); re-export it") from None

    def component_path(self, name: str) -> Path:
        return self.path / self.component(name)["file"]

    def table(self, name: str, mmap: bool = True) -> np.ndarray:
        entry = self.manifest["tables"].get(name)
        if entry is None:
            raise BundleError(f"bundle {self.path} has no table {name!r}; re-export it")
        array = np.load(self.path / entry["file"], mmap_mode="r" if mmap else None, allow_pickle=False)
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise BundleError(f"table {name} is {array.dtype}{list(array.shape)}, manifest says "
                              f"{entry['dtype']}{entry['shape']}; re-export the bundle")
        return array


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle: format name and version, every listed file present, sizes and hashes."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not an illume-rt bundle (no {MANIFEST}); create one with `illume-rt export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); re-export the bundle") from None
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{manifest_path} is not an illume-rt manifest; re-export the bundle")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is not supported by this runtime (reads "
                          f"{FORMAT_VERSION}); re-export with `illume-rt export`")
    for kind in ("components", "tables", "files"):
        for name, entry in manifest.get(kind, {}).items():
            file = path / entry["file"]
            if not file.is_file():
                raise BundleError(f"bundle file {file} ({name}) is missing; re-export the bundle")
            if file.stat().st_size != entry["bytes"]:
                raise BundleError(f"bundle file {file} ({name}) has {file.stat().st_size} bytes, manifest says "
                                  f"{entry['bytes']}: it was altered or truncated; re-export the bundle")
            if verify and sha256_file(file) != entry["sha256"]:
                raise BundleError(f"bundle file {file} ({name}) does not match its sha256 in the manifest: "
                                  "it was altered; re-export the bundle")
    return Bundle(path, manifest)
