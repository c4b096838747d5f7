"""Verification at size: the helpers the sampled checks of large graphs share (export/components.py ``_verify``).

A graph whose weights exceed the full-verification budget (``components.FULL_VERIFY_BYTES``) is not compared whole
with PyTorch: the reference and the onnxruntime session would each hold its weights. Its component's
``verify_at_size`` checks a stated sample instead: the repeated unit of the network (an LLM layer, a ViT block) at
its first, middle and last index, each exported as a small graph by the same code and streaming path from the same
checkpoint tensors and compared with PyTorch at two sizes per dim, plus those tensors as the big graph stores them,
compared byte for byte. What this proves and what it does not: docs/bundle-format.md, "Export at size".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from illume_rt.export import streaming


def sample_indices(count: int) -> list[int]:
    """The units checked when the whole graph is too large to compare with PyTorch: first, middle and last."""
    return sorted({0, count // 2, count - 1})


def storage_name(storage: torch.dtype) -> str:
    """``STORAGE_DTYPES`` key of a storage torch dtype (fp32, fp16, bf16)."""
    return next(k for k, v in streaming.STORAGE_DTYPES.items() if v == storage)


def real_copy(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Fill ``target`` (built on the meta device) with real copies of ``source``'s tensors (lazy ones read now)."""
    state = {name: streaming.real(t).clone() for name, t in source.state_dict(keep_vars=True).items()}
    target.load_state_dict(state, assign=True)


def check_filled(module: torch.nn.Module, what: str) -> None:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_meta:
            raise RuntimeError(f"{what}: {name} was not filled")


def _initializers(path: Path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return {i.name: i for i in model.graph.initializer}, json.loads(props.get(streaming.TRANSPOSED_WEIGHTS, "{}"))


class _Stored:
    """Reads the data of one initializer as stored (external data or inline), by byte range."""

    def __init__(self, path: Path, init) -> None:
        import onnx
        from onnx import numpy_helper

        self._file, self._raw = None, None
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            self._base, self.length = int(info.get("offset", 0)), int(info["length"])
            self._file = open(path.parent / info["location"], "rb")
        else:
            self._raw = init.raw_data or numpy_helper.to_array(init).tobytes()
            self.length = len(self._raw)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        length = self.length - offset if length is None else length
        if self._file is None:
            return self._raw[offset:offset + length]
        self._file.seek(self._base + offset)
        return self._file.read(length)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


def _as_stored(value: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    if value.dtype == torch.float32 and storage != torch.float32:
        return value.to(storage)
    return value


def compare_stored(path, tensors: dict, storage) -> int:
    """Compare initializers of the graph at ``path`` (external data or inline) with ``tensors`` byte for byte, as
    stored (float32 tensors in ``storage``). Returns the bytes compared; raises ExportError on a difference."""
    from illume_rt.export.components import ExportError

    path = Path(path)
    inits, transposed = _initializers(path)
    compared = 0
    for name, tensor in tensors.items():
        init = inits.get(name)
        if init is None:
            raise ExportError(f"{path.name}: no initializer {name}")
        value = streaming.real(tensor)
        if name in transposed:  # stored as its MatMul reads it (streaming._fold_weight_transposes)
            value = value.permute(*transposed[name]).contiguous()
        want = bytes(streaming._raw_bytes(_as_stored(value, storage)))
        with _Stored(path, init) as stored:
            same = stored.read() == want
        if not same:
            raise ExportError(f"{path.name}: initializer {name} does not hold the checkpoint's tensor")
        compared += len(want)
    return compared


def compare_stored_rows(path, name: str, rows: torch.Tensor, start: int, storage) -> int:
    """Compare rows [start, start + len(rows)) of the 2-D initializer ``name`` (a weight [rows, cols] as the module
    holds it; stored as is or transposed, streaming._fold_weight_transposes) with ``rows``, byte for byte, reading
    only those rows (or columns) from the file. Returns the bytes compared; raises ExportError on a difference."""
    from illume_rt.export.components import ExportError

    path = Path(path)
    inits, transposed = _initializers(path)
    init = inits.get(name)
    if init is None:
        raise ExportError(f"{path.name}: no initializer {name}")
    value = _as_stored(streaming.real(rows), storage).contiguous()
    count, cols = value.shape
    item = value.element_size()
    if name in transposed and transposed[name] != [1, 0]:
        raise ExportError(f"{path.name}: {name} is stored with permutation {transposed[name]}, not a transpose")
    with _Stored(path, init) as stored:
        if name not in transposed:  # [rows, cols]: one contiguous run
            ok = stored.read(start * cols * item, count * cols * item) == bytes(streaming._raw_bytes(value))
        else:  # [cols, rows]: a run of ``count`` per stored row
            total_rows = int(init.dims[1])
            want = value.t().contiguous()
            ok = all(stored.read((c * total_rows + start) * item, count * item) == bytes(streaming._raw_bytes(want[c]))
                     for c in range(cols))
    if not ok:
        raise ExportError(f"{path.name}: rows {start}..{start + count - 1} of initializer {name} do not hold the "
                          "checkpoint's tensor")
    return count * cols * item
