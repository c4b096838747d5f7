"""Loading and validating a bundle (see docs/bundle-format.md). No torch here."""

from __future__ import annotations

import hashlib
import json
import os
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

    def table(self, name: str, on_demand: bool = True):
        """A table of the bundle. ``on_demand``: a ``RowTable`` that reads the rows asked for from the file (the
        embedding table: a step needs a few rows of a table as large as the LLM body); otherwise an array."""
        entry = self.manifest["tables"].get(name)
        if entry is None:
            raise BundleError(f"bundle {self.path} has no table {name!r}; re-export it")
        path = self.path / entry["file"]
        array = RowTable(path) if on_demand else np.load(path, allow_pickle=False)
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise BundleError(f"table {name} is {array.dtype}{list(array.shape)}, manifest says "
                              f"{entry['dtype']}{entry['shape']}; re-export the bundle")
        return array


class RowTable:
    """Rows of a 2-D ``.npy`` table read with ``os.pread`` when indexed (ids, an id array or a slice of rows).

    Not memory-mapped on purpose: pages of a mapped file count as the process's resident memory, and the kernel
    maps whole runs of cached pages around each row touched (fault-around): a 512x512 image left 0.4-0.5 GB of a
    1 GB embedding table resident while reading a few thousand rows. Here only the copies handed out are held."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(fh))
            self._offset = fh.tell()
        if fortran or len(shape) != 2 or dtype.hasobject:
            raise BundleError(f"{path}: expected a C-order 2-D numeric table; re-export the bundle")
        self.path, self.shape, self.dtype, self.ndim = Path(path), tuple(shape), dtype, 2
        self._row_bytes = shape[1] * dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, start: int, count: int) -> np.ndarray:
        data = os.pread(self._fd, count * self._row_bytes, self._offset + start * self._row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(count, self.shape[1])

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            rows = self._rows(start, max(0, stop - start))
            return rows[::step] if step != 1 else rows
        ids = np.asarray(index)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"RowTable takes integer row ids or a slice, not {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -self.shape[0] or flat.max() >= self.shape[0]):
            raise IndexError(f"row id out of range for a table of {self.shape[0]} rows")
        flat = np.where(flat < 0, flat + self.shape[0], flat)
        out = np.empty((flat.size, self.shape[1]), dtype=self.dtype)
        for i, row in enumerate(flat.tolist()):
            out[i] = self._rows(row, 1)[0]
        return out.reshape(*ids.shape, self.shape[1])

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


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
