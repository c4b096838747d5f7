"""Loading and validating a bundle (see docs/bundle-format.md). No torch here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from illume_rt.errors import IllumeError
from illume_rt.contract import BUNDLE_FORMAT_NAME as FORMAT_NAME
from illume_rt.contract import BUNDLE_FORMAT_VERSION as FORMAT_VERSION
from illume_rt.contract import MANIFEST, LayoutError, VocabLayout, component_io, host_contract
from illume_rt.files import sha256_file
from illume_rt.runtime.options import model_sampling_defaults
from illume_rt.runtime.refine import model_refine_defaults


class BundleError(IllumeError, RuntimeError):
    """A bundle that cannot be used as it is; the message names the fix."""


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
        try:
            array = RowTable(path) if on_demand else np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise BundleError(f"table {name} ({entry['file']}) is not a readable .npy file ({exc}); "
                              "re-export the bundle") from None
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
            if step < 0:  # backwards: row by row (a forward read would start past the end)
                return self[np.arange(start, stop, step)]
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


# -- manifest schema -----------------------------------------------------------------------------------------

MAX_DIM = 1 << 31  # any size field above this is corrupt, not a model
LLM_INT_FIELDS = ("num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size", "max_context")
KV_DTYPES = ("float32", "float16")
FILE_SECTIONS = ("components", "tables", "files")


def _field(container: dict, key: str, kinds, where: str, optional: bool = False):
    """``container[key]`` if it has one of ``kinds``; otherwise a BundleError naming the field."""
    if key not in container:
        if optional:
            return None
        raise BundleError(f"manifest field {where}{key} is missing; re-export the bundle")
    value = container[key]
    if optional and value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BundleError(f"manifest field {where}{key} must be {_kind_names(kinds)}, not a boolean; "
                          "re-export the bundle")
    if not isinstance(value, kinds):
        raise BundleError(f"manifest field {where}{key} must be {_kind_names(kinds)}, not "
                          f"{type(value).__name__}; re-export the bundle")
    return value


def _kind_names(kinds) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a boolean",
             float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def _positive_int(container: dict, key: str, where: str, optional: bool = False) -> int | None:
    value = _field(container, key, int, where, optional)
    if value is not None and not 0 < value < MAX_DIM:
        raise BundleError(f"manifest field {where}{key} = {value} is out of range; re-export the bundle")
    return value


def member_path(root: Path, name, where: str) -> Path:
    """The file a manifest names, which must lie inside the bundle folder: a relative path with no '..', and no
    symlink on the way that leads out. Checked before the file is opened."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"manifest field {where} must name a file of the bundle; re-export the bundle")
    pure = Path(name)
    if pure.is_absolute() or any(part in ("..", "") for part in name.split("/")) or "\\" in name:
        raise BundleError(f"manifest field {where} = {name!r} points outside the bundle (absolute path or '..'); "
                          "a bundle may only name its own files. Re-export it")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(root / pure))
    if real != real_root and real_root not in real.parents:
        raise BundleError(f"manifest field {where} = {name!r} leads outside the bundle (through a symlink); "
                          "a bundle may only name its own files. Re-export it")
    return root / pure


def validate_manifest(manifest, root: Path) -> None:
    """Types, required keys, paths inside the bundle and table shapes against file sizes, before any use."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{root / MANIFEST} must hold a JSON object, not {type(manifest).__name__}; "
                          "re-export the bundle")
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{root / MANIFEST} is not an illume-rt manifest; re-export the bundle")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
        preset = model.get("preset") if isinstance(model.get("preset"), str) else "PRESET"
        how = ("--checkpoint MLLM_DIR --tokenizer-checkpoint dualvitok.bin" if model.get("random_weights") is False
               and preset not in ("nano",) else f"--preset {preset}")
        raise BundleError(f"bundle format {version!r} is not supported by this runtime (reads format "
                          f"{FORMAT_VERSION}); re-export it: `illume-rt export {how} -o NEW_BUNDLE`")
    model = _field(manifest, "model", dict, "")
    _field(model, "preset", str, "model.")
    _field(model, "random_weights", bool, "model.", optional=True)
    for i, res in enumerate(_field(model, "trained_resolutions", list, "model.", optional=True) or []):
        if not (isinstance(res, list) and len(res) == 2 and all(type(v) is int and 0 < v < MAX_DIM for v in res)):
            raise BundleError(f"manifest field model.trained_resolutions[{i}] must be [height, width]; "
                              "re-export the bundle")
    try:
        model_sampling_defaults(_field(model, "sampling_defaults", dict, "model.", optional=True))
        model_refine_defaults(_field(model, "refine_defaults", dict, "model.", optional=True))
    except LayoutError as exc:
        raise BundleError(f"manifest field model.{exc}; re-export the bundle") from None
    vocab = _field(manifest, "vocab", dict, "")
    try:
        layout = VocabLayout.from_dict(vocab)
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"manifest field vocab is not a valid vocabulary layout ({exc}); re-export the bundle") \
            from None
    for key, value in vocab.items():
        if type(value) is not int or not 0 <= value < MAX_DIM:
            raise BundleError(f"manifest field vocab.{key} must be a non-negative integer; re-export the bundle")
    llm = _field(manifest, "llm", dict, "")
    for key in LLM_INT_FIELDS:
        _positive_int(llm, key, "llm.")
    if llm.get("kv_dtype", "float32") not in KV_DTYPES:
        raise BundleError(f"manifest field llm.kv_dtype must be one of {', '.join(KV_DTYPES)}; re-export the bundle")
    diffusion = _field(manifest, "diffusion", dict, "", optional=True)
    if diffusion is not None:
        _field(diffusion, "scheduler", dict, "diffusion.")
    tokenizer = _field(manifest, "tokenizer", dict, "")
    kind = _field(tokenizer, "kind", str, "tokenizer.")
    if kind not in ("bytes", "hf"):
        raise BundleError(f"manifest field tokenizer.kind {kind!r} is not bytes or hf; re-export the bundle")
    if kind == "hf":
        member_path(root, _field(tokenizer, "file", str, "tokenizer."), "tokenizer.file")
    for section in FILE_SECTIONS:
        for name, entry in _field(manifest, section, dict, "").items():
            where = f"{section}.{name}."
            if not isinstance(entry, dict):
                raise BundleError(f"manifest field {section}.{name} must be an object; re-export the bundle")
            member_path(root, _field(entry, "file", str, where), where + "file")
            if _field(entry, "bytes", int, where) < 0:
                raise BundleError(f"manifest field {where}bytes is negative; re-export the bundle")
            digest = _field(entry, "sha256", str, where)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise BundleError(f"manifest field {where}sha256 is not a sha256 hex digest; re-export the bundle")
            if "external_data" in entry:
                member_path(root, _field(entry, "external_data", str, where), where + "external_data")
            if section == "tables":
                _check_table_entry(entry, where)
    _check_contract(manifest, layout, llm["num_hidden_layers"])
    tables = manifest["tables"]
    embed = tables.get("embed_tokens")
    if embed is not None and embed["shape"] != [layout.vocab_rows, llm["hidden_size"]]:
        raise BundleError(f"manifest field tables.embed_tokens.shape {embed['shape']} does not match vocab.vocab_rows "
                          f"{layout.vocab_rows} x llm.hidden_size {llm['hidden_size']}; re-export the bundle")


def _check_contract(manifest: dict, layout: VocabLayout, layers: int) -> None:
    """The bundle was made for this runtime's grammar, prompts and graph interfaces (illume_rt/contract.py)."""
    written = _field(manifest, "contract", dict, "")
    expected = json.loads(json.dumps(host_contract(layout)))  # as JSON reads it back (tuples become lists)
    for key in sorted(set(written) | set(expected)):
        if written.get(key) != expected.get(key):
            raise BundleError(f"manifest field contract.{key} differs from what this runtime implements; the bundle "
                              "was made by another illume-rt version: re-export it with this one")
    for name, entry in manifest["components"].items():
        io = component_io(name, layers)
        if io is None:
            continue  # a graph this runtime does not run (kept for tools)
        specs = [entry.get("inputs"), entry.get("outputs")]
        if not all(isinstance(x, list) and all(isinstance(t, dict) for t in x) for x in specs):
            raise BundleError(f"manifest field components.{name} must list its inputs and outputs; re-export the bundle")
        have = ([t.get("name") for t in specs[0]], [t.get("name") for t in specs[1]])
        if have != (list(io[0]), list(io[1])):
            raise BundleError(f"component {name} has inputs {have[0]} and outputs {have[1]}; this runtime expects "
                              f"{list(io[0])} -> {list(io[1])} (illume_rt/contract.py): re-export the bundle")


def _check_table_entry(entry: dict, where: str) -> None:
    dtype_name = _field(entry, "dtype", str, where)
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "fiu":
        raise BundleError(f"manifest field {where}dtype {dtype_name!r} is not a numeric dtype; re-export the bundle")
    shape = _field(entry, "shape", list, where)
    if len(shape) != 2 or any(type(v) is not int or not 0 < v < MAX_DIM for v in shape):
        raise BundleError(f"manifest field {where}shape must be [rows, columns]; re-export the bundle")
    if shape[0] * shape[1] * dtype.itemsize > entry["bytes"]:
        raise BundleError(f"manifest field {where}shape {shape} needs more bytes than the file has "
                          f"({entry['bytes']}); re-export the bundle")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle: the manifest against its schema (every named path inside the folder), then every
    listed file present, sizes and hashes."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not an illume-rt bundle (no {MANIFEST}); create one with `illume-rt export`")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({str(exc)[:120]}); re-export the bundle") from None
    except OSError as exc:
        raise BundleError(f"cannot read {manifest_path} ({exc.strerror}); check its permissions") from None
    validate_manifest(manifest, path)
    for kind in FILE_SECTIONS:
        for name, entry in manifest[kind].items():
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
