"""Streaming export: a graph's structure is traced on fake tensors, then its weights are written one at a time.

Why: the 3B/7B LLMs are 12/28 GB in fp32. Tracing a module that holds real weights and then serialising the
``ModelProto`` held them two to three times over (the issue-16 run was OOM-killed at 24 GB). Here:

1. Reference networks may hold *lazy* tensors: ``FakeTensor`` s (shape and dtype, no storage) carrying a reader
   that returns the real tensor on demand (``lazy``; the checkpoint loaders attach readers of memory-mapped
   safetensors, ``export/checkpoints.py``). Small networks simply hold real tensors.
2. ``export_structure`` runs ``torch.onnx.export(..., dynamo=True, optimize=False)`` inside one process-wide
   ``FakeTensorMode``: real tensors are only referenced, lazy ones are never read. (``optimize=True`` fails on
   fake tensors; onnxruntime applies its own graph optimisations at session load.)
3. ``write_weights`` resolves every initializer of the traced graph to its module tensor, reads it (one at a
   time), converts it to the storage dtype and appends it to the graph's external-data file, or, for a graph whose
   weights fit in one protobuf, keeps it inline. So export holds at most one weight tensor beyond what it writes
   (the largest: the embedding table or an LM-head range) plus the traced graph.

The same path serves every graph and every preset, tiny included: there is no second exporter.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

LAZY_READER = "_illume_rt_read"  # attribute of a fake tensor: () -> the real tensor
LAZY_ROWS = "_illume_rt_read_rows"  # optional: (start, stop) -> rows [start, stop) of the real tensor
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# External data is aligned so that readers may memory-map each tensor (onnxruntime does for aligned data).
EXTERNAL_ALIGNMENT = 4096

_FAKE_MODE = None


def fake_mode():
    """The one ``FakeTensorMode`` of this process: fake tensors of two modes cannot meet in one trace.
    ``allow_non_fake_inputs`` lets a trace read real tensors (small modules, rotary tables) alongside fake ones."""
    global _FAKE_MODE
    if _FAKE_MODE is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        _FAKE_MODE = FakeTensorMode(allow_non_fake_inputs=True)
    return _FAKE_MODE


def is_fake(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def lazy(tensor: torch.Tensor, read: Callable[[], torch.Tensor],
         read_rows: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Attach ``read`` (-> the real tensor, any float dtype; converted to ``tensor``'s dtype when read) to a fake
    tensor, in place, and optionally ``read_rows`` (a row range only); returns it."""
    if not is_fake(tensor):
        raise TypeError("lazy() takes a fake tensor (made under streaming.fake_mode())")
    setattr(tensor, LAZY_READER, read)
    setattr(tensor, LAZY_ROWS, read_rows)
    return tensor


def real_rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a module tensor, reading only those where its source can (an LM-head range)."""
    read_rows = getattr(tensor, LAZY_ROWS, None) if is_fake(tensor) else None
    if read_rows is None:
        return real(tensor)[start:stop].clone()
    return read_rows(start, stop).detach().to(tensor.dtype)


def fake_empty(module: torch.nn.Module) -> torch.nn.Module:
    """A module built on the meta device -> fake tensors of the same shapes (``to_empty`` under the fake mode)."""
    with fake_mode():
        return module.to_empty(device="cpu")


def real(tensor: torch.Tensor) -> torch.Tensor:
    """The real value of a module tensor: itself, or what its reader returns (in the tensor's dtype)."""
    if not is_fake(tensor):
        return tensor.detach()
    read = getattr(tensor, LAZY_READER, None)
    if read is None:
        raise RuntimeError(f"a fake tensor {tuple(tensor.shape)} has no reader: it was derived from lazy weights "
                           "without a rule to recompute it (see streaming.lazy)")
    value = read()
    if tuple(value.shape) != tuple(tensor.shape):
        raise RuntimeError(f"a reader returned {tuple(value.shape)} for a tensor of shape {tuple(tensor.shape)}")
    return value.detach().to(tensor.dtype)


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its qualified name (shared tensors under each of their names): the names
    the exporter gives initializers."""
    named = dict(module.named_buffers(remove_duplicate=False))
    named.update(module.named_parameters(remove_duplicate=False))
    return named


def lazy_bytes(module: torch.nn.Module) -> int:
    """Bytes of the lazy (not yet read) tensors of ``module``, each counted once."""
    seen, total = set(), 0
    for t in module_tensors(module).values():
        if is_fake(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def materialized(module: torch.nn.Module, storage: torch.dtype = torch.float32) -> Iterator[torch.nn.Module]:
    """Within the block, ``module``'s lazy tensors are swapped for their real values (read now, dropped after),
    for reference runs of modules that fit in memory. With a 16-bit ``storage``, every float32 tensor is rounded
    to it, as the exported graph stores it, so the reference computes what the graph should."""
    from torch.nn.utils.stateless import _reparametrize_module

    def rounded(t):
        value = real(t)
        if storage != torch.float32 and value.dtype == torch.float32:
            value = value.to(storage).to(torch.float32)
        return value

    # A shared tensor (tied embeddings: lm_head.weight is model.embed_tokens.weight) is read once, under its first
    # name: torch refuses a value for each name of a tied pair, and tie_weights=True gives the others the same one.
    swaps, seen = {}, set()
    for name, t in module_tensors(module).items():
        if id(t) not in seen and (is_fake(t) or (storage != torch.float32 and t.dtype == torch.float32)):
            seen.add(id(t))
            swaps[name] = rounded(t)
    if not swaps:
        yield module
        return
    with _reparametrize_module(module, swaps, tie_weights=True, strict=False):
        yield module
    swaps.clear()


def export_structure(module: torch.nn.Module, inputs: tuple, input_names, output_names, dynamic_shapes):
    """The traced graph (``onnx_ir.Model``); no weight is read or copied."""
    import logging
    import warnings

    # the exporter warns about torchvision ops it cannot register; this project never uses them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    mode = fake_mode()
    with torch.no_grad(), warnings.catch_warnings(), mode:
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation noise
        fake_inputs = tuple(mode.from_tensor(x) for x in inputs)
        program = torch.onnx.export(
            module, fake_inputs, input_names=list(input_names), output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, dynamo=True, optimize=False, external_data=False, verbose=False,
        )
    fold_small_constants(program.model)
    return program.model


def fold_small_constants(model, optimize=None) -> None:
    """Fold the subgraphs that compute only from Constant nodes (axes, shapes, scalars: what the exporter's
    optimiser folds, which cannot run on fake weights). TensorRT needs e.g. a Slice's axes as a constant; the weight
    initializers, which hold no data yet, are never read (``fold_constants`` skips values without data).

    These are the passes of onnxscript's ``optimize_ir`` with one rewrite rule left out: ``SlicesSplit`` (Slices of
    one tensor -> one Split). It matches groups of nodes and took more than half of the optimiser's time, yet fired
    on none of the tiny preset's ten graphs: without it their fold is 2.25x faster, trace and fold 1.08x, and every
    graph comes out the same (bench/export_fold.py,
    bench/results/20261202-export-fold). Where this onnxscript has no such rule list, ``optimize_ir`` runs as
    it is. ``optimize``: another optimiser to run in its place, the weights held out alike (the bench's baseline)."""
    import logging

    # With the weights held out, the initializer deduplication warns once per weight that it has no value. That is
    # expected here, and it would bury the CLI's one-line errors under a page of warnings.
    dedup_log = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    saved_level = dedup_log.level
    saved = {name: value.const_value for name, value in model.graph.initializers.items()}
    try:
        dedup_log.setLevel(logging.ERROR)
        for value in model.graph.initializers.values():
            value.const_value = None  # fake tensors: never fold through a weight
        (optimize or _optimize)(model)
    finally:
        dedup_log.setLevel(saved_level)
        for name, const in saved.items():
            if name in model.graph.initializers:
                model.graph.initializers[name].const_value = const


SKIPPED_REWRITE_RULES = ("SlicesSplit",)  # see fold_small_constants


def _optimize(model) -> None:
    """``onnxscript.optimizer.optimize_ir(model)`` without the rewrite rules named in SKIPPED_REWRITE_RULES."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import rewriter
    from onnxscript.optimizer import fold_constants, optimize_ir

    default_rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if default_rules is None:
        optimize_ir(model)
        return
    rewrite = rewriter.RewritePass([r for r in default_rules if r.name not in SKIPPED_REWRITE_RULES])
    common.InlinePass()(model)
    for _ in range(2):  # as optimize_ir: a second round only where the first changed something
        changed = fold_constants(model, onnx_shape_inference=True).modified
        for step in (rewrite, common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                     common.RemoveUnusedOpsetsPass()):
            changed = step(model).modified or changed
        if not changed:
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass())(model)


def weight_bytes(model, storage: torch.dtype) -> int:
    """Bytes the initializers of ``model`` take once written (floating ones in ``storage``)."""
    total = 0
    for value in model.graph.initializers.values():
        size = 1
        for d in value.shape.dims:
            size *= int(d)
        total += size * (_storage_itemsize(value.dtype, storage))
    return total


def _storage_itemsize(ir_dtype, storage: torch.dtype) -> int:
    import onnx_ir as ir

    if ir_dtype == ir.DataType.FLOAT:
        return torch.empty((), dtype=storage).element_size()
    return ir_dtype.itemsize


def _to_ir_dtype(dtype: torch.dtype):
    import onnx_ir as ir

    return {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
            torch.bfloat16: ir.DataType.BFLOAT16}[dtype]


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_weights(model, module: torch.nn.Module, folder: Path, data_name: str | None,
                  storage: torch.dtype = torch.float32, progress: Callable[[str], None] | None = None) -> dict:
    """Give every initializer of the traced ``model`` its value from ``module``'s tensors, one tensor at a time.

    ``data_name``: the external-data file (in ``folder``) the weights are appended to; None keeps them inline (the
    graph must then fit in one protobuf). Float32 weights are stored in ``storage``; a 16-bit weight is followed
    by a Cast to float32 in the graph, so inputs, outputs and arithmetic stay float32.
    Returns {"tensors", "bytes"} written."""
    import onnx_ir as ir

    named = module_tensors(module)
    graph = model.graph
    transposed = _fold_weight_transposes(graph)
    if transposed:  # readers comparing stored weights with the module's (export/llm.py compare_stored) need it
        import json

        model.metadata_props[TRANSPOSED_WEIGHTS] = json.dumps(transposed, sort_keys=True)
    written = 0
    handle = open(folder / data_name, "wb") if data_name else None
    try:
        for name, value in list(graph.initializers.items()):
            source = named.get(name)
            if source is None:  # a constant the exporter lifted, or one folded (fold_small_constants): real data
                const_value = value.const_value
                source = getattr(const_value, "raw", None)
                if not isinstance(source, torch.Tensor) and const_value is not None:
                    source = torch.from_numpy(np.array(const_value.numpy()))
                if not isinstance(source, torch.Tensor):
                    raise RuntimeError(f"initializer {name} is neither a module tensor nor a lifted constant")
            tensor = real(source)
            if name in transposed:  # stored as the MatMul reads it (see _fold_weight_transposes)
                tensor = tensor.permute(*transposed[name]).contiguous()
            convert = tensor.dtype == torch.float32 and storage != torch.float32
            if convert:
                tensor = tensor.to(storage)
            if handle is not None and name in named:  # constants (axes, shapes) stay inline: shape inference reads them
                offset = -handle.tell() % EXTERNAL_ALIGNMENT
                handle.write(b"\0" * offset)
                start = handle.tell()
                handle.write(_raw_bytes(tensor))
                const = ir.ExternalTensor(data_name, start, handle.tell() - start, _to_ir_dtype(tensor.dtype)
                                          if tensor.is_floating_point() else value.dtype,
                                          shape=value.shape, name=name, base_dir=folder)
            else:
                const = ir.Tensor(_numpy(tensor), name=name) if tensor.dtype != torch.bfloat16 else \
                    ir.tensor(tensor, name=name)
            written += tensor.numel() * tensor.element_size()
            if convert:
                _store_as(graph, value, const, storage)
            else:
                value.const_value = const
            del tensor
            if progress is not None:
                progress(name)
    finally:
        if handle is not None:
            handle.close()
    return {"tensors": len(graph.initializers), "bytes": written}


TRANSPOSED_WEIGHTS = "illume_rt.transposed_weights"  # model metadata: {initializer: perm} of folded weights


def _fold_weight_transposes(graph) -> dict[str, list[int]]:
    """Store weights the way their MatMul reads them. Traced without the exporter's optimiser (it cannot run on fake
    tensors), a Linear layer is ``MatMul(x, Transpose(W))``; a quantizer then sees no weight initializer on the
    MatMul (INT8 weights were not made: the body stayed its FP32 size) and TensorRT would transpose at run time. Each
    Transpose whose only input is an initializer used by nothing else is removed, and that initializer takes the
    transposed shape; ``write_weights`` writes the tensor permuted (one tensor at a time, as every other).
    Returns {initializer name: perm}."""
    import onnx_ir as ir

    folded: dict[str, list[int]] = {}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        value = node.inputs[0]
        if value is None or not value.is_initializer() or value.is_graph_output() or len(value.uses()) != 1:
            continue
        perm_attr = node.attributes.get("perm")
        rank = len(value.shape) if value.shape is not None else None
        if rank is None:
            continue
        perm = list(perm_attr.value) if perm_attr is not None else list(reversed(range(rank)))
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        value.shape = ir.Shape([value.shape[i] for i in perm])
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        folded[value.name] = perm
    return folded


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().numpy()


def _store_as(graph, value, const, storage: torch.dtype) -> None:
    """Replace float32 initializer ``value`` by a ``storage``-typed one of the same name, cast back to float32
    where it is used."""
    import onnx_ir as ir

    name = value.name
    value.name = f"{name}__f32"  # the float32 value becomes the Cast's output: rename it out of the way
    graph.initializers.pop(name, None)
    graph.initializers.pop(value.name, None)
    stored = ir.Value(name=name, shape=value.shape, type=ir.TensorType(_to_ir_dtype(storage)), const_value=const)
    graph.register_initializer(stored)
    cast = ir.node("Cast", inputs=[stored], attributes={"to": ir.DataType.FLOAT}, name=f"{name}__cast")
    value.replace_all_uses_with(cast.outputs[0])
    cast.outputs[0].name = f"{name}__f32"
    cast.outputs[0].shape = value.shape
    cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.insert_before(graph[0], cast) if len(graph) else graph.append(cast)
    value.const_value = None


def serialize(model):
    """The ``ModelProto`` of a model whose external initializers stay in their files (nothing is loaded)."""
    import onnx_ir as ir

    return ir.serde.serialize_model(model)


def sync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
