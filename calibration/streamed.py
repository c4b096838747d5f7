"""INT8 (ort-cpu) quantization of graphs whose weights live in ONNX external data (the 3B/7B LLM body: 11.1 GB in
FP32 at 3B), in bounded memory.

``recipes.quantize_graph`` loads the whole model (``onnx.load``), writes copies, runs SmoothQuant and then
onnxruntime's ``quantize_static``, each step holding the weights again. Here the same recipe is reproduced on the
graph's *structure* (``onnx.load(..., load_external_data=False)``) and the weights are read one tensor at a time
from the external-data file:

1. **Plan** (structure only): the quantized MatMuls (a constant 2-D weight: an FP32 initializer, or a 16-bit one
   behind the exporter's ``Cast`` to float32, ``--dtype fp16|bf16``), the SmoothQuant groups and their folds, exactly
   as ``recipes.smoothquant`` finds them.
2. **Calibration**: one onnxruntime session of the FP32 graph with extra outputs, per-channel (last axis) min and
   max of every tensor the recipe needs (inputs and outputs of the quantized MatMuls, the SmoothQuant group inputs),
   reduced inside the graph so each run returns a few vectors. The session is made from the structure's bytes and
   reads the weights from the source bundle's data file (onnxruntime's
   ``session.model_external_initializers_file_folder_path``); nothing is written beside the source. It is closed
   before anything else is done. SmoothQuant's per-channel max|X| and the post-smoothing per-tensor ranges both
   follow from these statistics: smoothing divides channel c of a group input (or of the folded up-projection's
   output) by s_c > 0, so its min and max become min_c/s_c and max_c/s_c, without a second calibration run.
3. **Write**: per weight, read it, apply its SmoothQuant scaling (rows times s; folded columns or RMSNorm weights
   divided by s), quantize it per output channel (int8, symmetric, 7-bit ``reduce_range``: onnxruntime's own
   ``compute_scale_zp`` rules) and append it to the new graph's own data file; every other external tensor is
   copied across in chunks. The Q/DQ nodes are those ``quantize_static`` writes (QDQ format, U8S8): a
   ``DequantizeLinear`` (axis 1) per weight, and a ``QuantizeLinear``/``DequantizeLinear`` pair (uint8, per tensor,
   asymmetric, MinMax range) on each input and output of the quantized MatMuls, with onnxruntime's names.

Peak memory: the calibration session (one copy of the FP32 weights in onnxruntime) while it runs; afterwards the
largest single weight a few times over (read, scaled, quantized) and the graph structure.
tests/test_quantize_streamed.py checks the result against the in-memory recipe and the memory bound.

Reproduced: the ort-cpu INT8 recipe, and the TensorRT INT8 recipe with an FP32 remainder (``--high-precision
fp32``: modelopt's Q/DQ pattern, symmetric int8, scales amax/127, FP32 weights behind Q/DQ as modelopt leaves them).
Not reproduced: the FP16/BF16 remainder of the TensorRT flavour (AutoCast) and FP8; ``quantize_bundle`` refuses
those for graphs with external data and says what they need.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

ALIGNMENT = 4096  # as export/streaming.py writes external data
COPY_CHUNK = 64 << 20


STREAMED = ("int8 ort-cpu (onnxruntime quantize_static's QDQ)",
            "int8 tensorrt with --high-precision fp32 (modelopt's Q/DQ)")


def streamable(recipe) -> str | None:
    """Which reproduction a recipe takes ("ort-cpu", "tensorrt"), or None: FP8 and the FP16/BF16 remainder (AutoCast)
    are not reproduced, nor ranges other than each tensor's extremes (percentile ranges: recipes.percentile_ranges
    holds every value of every tensor; entropy: ModelOpt's histograms of the whole graph's activations)."""
    if recipe.precision != "int8" or recipe.calibration_method not in ("MinMax", "max"):
        return None
    if recipe.target == "ort-cpu":
        return "ort-cpu"
    return "tensorrt" if recipe.high_precision == "fp32" else None


class StreamingUnsupported(ValueError):
    """The graph has something the streamed path does not reproduce (one readable line)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading initializers of a graph loaded without its external data
# ---------------------------------------------------------------------------------------------------------------
def _np_dtype(data_type: int):
    from onnx import TensorProto, helper

    if data_type == TensorProto.BFLOAT16:
        return np.dtype(np.uint16)  # converted to float32 by ``_to_float32``
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def external_info(init) -> dict | None:
    from onnx import TensorProto

    if init.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in init.external_data}


class Weights:
    """Initializers of ``model`` (loaded with ``load_external_data=False``) whose external data lies in ``folder``;
    each read returns a new array of one tensor (file reads, not a memory map: mapped pages would count in the
    resident set)."""

    def __init__(self, model, folder: Path) -> None:
        self.folder = Path(folder)
        self.inits = {i.name: i for i in model.graph.initializer}

    def nbytes(self, name: str) -> int:
        init = self.inits[name]
        return int(np.prod(init.dims, dtype=np.int64)) * _np_dtype(init.data_type).itemsize

    def stored(self, name: str) -> np.ndarray:
        """The tensor as stored (bfloat16 as uint16 bits)."""
        from onnx import numpy_helper

        init = self.inits[name]
        info = external_info(init)
        if info is None:
            return numpy_helper.to_array(init)
        dtype = _np_dtype(init.data_type)
        count = int(np.prod(init.dims, dtype=np.int64))
        path = self.folder / info["location"]
        value = np.fromfile(path, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        if value.size != count:
            raise StreamingUnsupported(f"{path.name}: initializer {name} is cut short ({value.size} of {count} values)")
        return value.reshape(tuple(init.dims))

    def float32(self, name: str) -> np.ndarray:
        from onnx import TensorProto, numpy_helper

        init = self.inits[name]
        if external_info(init) is None:
            return numpy_helper.to_array(init).astype(np.float32)
        value = self.stored(name)
        if init.data_type == TensorProto.BFLOAT16:
            value = value.astype(np.uint16).astype(np.uint32) << 16
            return value.view(np.float32)
        return value.astype(np.float32, copy=False)

    def chunks(self, name: str):
        """The stored bytes of an external tensor, in pieces."""
        init = self.inits[name]
        info = external_info(init)
        length = int(info["length"]) if "length" in info else self.nbytes(name)
        with open(self.folder / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            left = length
            while left:
                piece = f.read(min(COPY_CHUNK, left))
                if not piece:
                    raise StreamingUnsupported(f"initializer {name}: external data ends early")
                left -= len(piece)
                yield piece


class DataWriter:
    """Appends tensors to one external-data file (aligned as the exporter does) and makes their TensorProtos."""

    def __init__(self, path: Path) -> None:
        self.path, self.location = Path(path), Path(path).name
        self.handle = open(self.path, "wb")

    def _start(self) -> int:
        self.handle.write(b"\0" * (-self.handle.tell() % ALIGNMENT))
        return self.handle.tell()

    def _proto(self, name: str, data_type: int, dims, offset: int, length: int):
        from onnx import TensorProto

        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def array(self, name: str, value: np.ndarray, data_type: int | None = None):
        from onnx import helper

        value = np.ascontiguousarray(value)
        start = self._start()
        self.handle.write(memoryview(value).cast("B"))
        dt = data_type if data_type is not None else helper.np_dtype_to_tensor_dtype(value.dtype)
        return self._proto(name, dt, value.shape, start, self.handle.tell() - start)

    def copy(self, weights: Weights, name: str):
        init = weights.inits[name]
        start = self._start()
        for piece in weights.chunks(name):
            self.handle.write(piece)
        return self._proto(name, init.data_type, init.dims, start, self.handle.tell() - start)

    def close(self) -> None:
        self.handle.close()


# ---------------------------------------------------------------------------------------------------------------
# The plan: what quantize_graph (SmoothQuant + quantize_static) would do, found on the structure
# ---------------------------------------------------------------------------------------------------------------
class Plan:
    def __init__(self, model, exclude) -> None:
        from onnx import TensorProto

        from illume_rt.calibration.recipes import WEIGHTED_OPS

        g = model.graph
        self.model = model
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.uses: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        # a 16-bit stored weight is read through the exporter's Cast to float32: treat the Cast's output as the weight
        self.cast_source: dict[str, str] = {}
        for n in g.node:
            if (n.op_type == "Cast" and n.input and n.input[0] in self.inits
                    and self.inits[n.input[0]].data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
                    and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)):
                self.cast_source[n.output[0]] = n.input[0]
        consts = set(self.inits) | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        consts |= set(self.cast_source)
        self.weighted, self.activation_only = [], []
        for node in g.node:
            if node.op_type not in WEIGHTED_OPS:
                continue
            (self.weighted if any(i in consts for i in node.input[:2]) else self.activation_only).append(node)
        self.exclude = set(exclude) | {n.name for n in self.activation_only}
        self.quantized = []
        for node in self.weighted:
            if node.name in self.exclude:
                continue
            if node.op_type != "MatMul":
                raise StreamingUnsupported(
                    f"node {node.name} ({node.op_type}) has a constant weight: the streamed quantizer (graphs with "
                    "external data) handles MatMul weights only")
            if self.weight_of(node.input[1]) is None or node.input[0] in consts:
                raise StreamingUnsupported(f"MatMul {node.name}: its constant operand is not a 2-D float weight "
                                           "in input 1 (what the streamed quantizer handles)")
            self.quantized.append(node)

    def source(self, tensor: str) -> str | None:
        """The initializer holding ``tensor``'s value: itself (float32), or the 16-bit one behind its Cast."""
        from onnx import TensorProto

        if tensor in self.inits and self.inits[tensor].data_type == TensorProto.FLOAT:
            return tensor
        src = self.cast_source.get(tensor)
        if src is not None and self.uses.get(src, 0) == 1:
            return src
        return None

    def weight_of(self, tensor: str) -> str | None:
        src = self.source(tensor)
        return src if src is not None and len(self.inits[src].dims) == 2 else None


def _range_outputs(model, tensors: list[str]) -> list[tuple[str, str]]:
    """Add to ``model`` the per-last-axis min and max of each tensor (ReduceMin/ReduceMax over every other axis,
    inside the graph); returns their output names."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    zero, one = "illume_calib.zero", "illume_calib.one"
    g.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), zero),
                          numpy_helper.from_array(np.array(1, np.int64), one)])
    names = []
    for k, t in enumerate(tensors):
        p = f"illume_calib.{k}"
        g.node.extend([
            helper.make_node("Shape", [t], [f"{p}.shape"], name=f"{p}.Shape"),
            helper.make_node("Size", [f"{p}.shape"], [f"{p}.rank"], name=f"{p}.Size"),
            helper.make_node("Sub", [f"{p}.rank", one], [f"{p}.last"], name=f"{p}.Sub"),
            helper.make_node("Range", [zero, f"{p}.last", one], [f"{p}.axes"], name=f"{p}.Range"),
            helper.make_node("ReduceMin", [t, f"{p}.axes"], [f"{p}.min"], name=f"{p}.ReduceMin", keepdims=0),
            helper.make_node("ReduceMax", [t, f"{p}.axes"], [f"{p}.max"], name=f"{p}.ReduceMax", keepdims=0),
        ])
        for suffix in ("min", "max"):
            g.output.append(helper.make_tensor_value_info(f"{p}.{suffix}", TensorProto.FLOAT, None))
        names.append((f"{p}.min", f"{p}.max"))
    return names


def channel_ranges(model, folder: Path, tensors: list[str], feeds: list[dict], threads: int | None,
                   log=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) min and max of ``tensors`` over ``feeds``: one onnxruntime session of the structure
    ``model`` with its weights read from ``folder`` (the source's data file, untouched), closed on return."""
    import copy

    import onnxruntime as ort

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 18:
        raise StreamingUnsupported(f"the graph's opset is {opset}; the streamed calibration needs 18 or newer "
                                   "(ReduceMin with axes as an input)")
    aug = copy.deepcopy(model)  # the structure only: a few MB at 3B
    del aug.graph.value_info[:]
    names = _range_outputs(aug, tensors)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    t0 = time.perf_counter()
    session = ort.InferenceSession(aug.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del aug
    if log:
        log(f"  calibration session open in {time.perf_counter() - t0:.1f}s")
    inputs = [i.name for i in session.get_inputs()]
    flat = [n for pair in names for n in pair]
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    try:
        for feed in feeds:
            values = session.run(flat, {k: feed[k] for k in inputs})
            for t, (mn, mx) in zip(tensors, zip(values[0::2], values[1::2])):
                if mn.size == 0 or not (np.all(np.isfinite(mn)) and np.all(np.isfinite(mx))):
                    continue  # an empty tensor in this call
                lo[t] = mn if t not in lo else np.minimum(lo[t], mn)
                hi[t] = mx if t not in hi else np.maximum(hi[t], mx)
    finally:
        del session
    return {t: (lo[t], hi[t]) for t in lo}


# ---------------------------------------------------------------------------------------------------------------
# Quantization parameters: onnxruntime's own rules (onnxruntime.quantization.quant_utils)
# ---------------------------------------------------------------------------------------------------------------
def activation_params(rmin: np.float32, rmax: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 asymmetric per-tensor (zero point, scale), as quantize_static computes them from a MinMax range."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.UINT8, reduce_range=False, symmetric=False)
    zero, scale = compute_scale_zp(np.array(rmin, np.float32), np.array(rmax, np.float32), qmin, qmax, False, None)
    return np.asarray(zero, np.uint8).reshape(()), np.asarray(scale, np.float32).reshape(())


def symmetric_activation_params(rmin: np.float32, rmax: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """modelopt INT8 (max calibration): int8 symmetric per-tensor, scale amax / 127, zero point 0."""
    amax = np.maximum(np.abs(np.float32(rmin)), np.abs(np.float32(rmax)))
    return np.array(0, np.int8), np.asarray(np.float32(amax) / np.float32(127), np.float32)


def symmetric_weight_scales(w: np.ndarray) -> np.ndarray:
    """modelopt INT8 weights: per output channel (axis 1) amax / 127."""
    return (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)


def weight_params(w: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel (axis 1) symmetric int8: (quantized, scale, zero point), vectorised from quantize_static's
    per-channel loop (compute_data_quant_params -> compute_scale_zp -> quantize_nparray)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=reduce_range, symmetric=True)
    full_min, full_max = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=False, symmetric=False)
    rmin = np.minimum(w.min(axis=0), np.float32(0))
    rmax = np.maximum(w.max(axis=0), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    scale64 = (absmax.astype(np.float64) - (-absmax).astype(np.float64)) / (float(qmax) - float(qmin))
    scale = scale64.astype(np.float32)
    tiny = scale64 < np.finfo(np.float32).tiny
    scale[tiny] = 1.0
    zero = np.full(w.shape[1], np.round((float(qmin) + float(qmax)) / 2.0), dtype=np.int8)
    zero[tiny] = 0
    q = (w / scale[None, :]).round() + zero[None, :].astype(np.float32)
    np.clip(q, int(full_min), int(full_max), out=q)
    return q.astype(np.int8), scale, zero


# ---------------------------------------------------------------------------------------------------------------
# The streamed recipe
# ---------------------------------------------------------------------------------------------------------------
def quantize_external(recipe, src: Path, dst: Path, feeds: list[dict], threads: int | None = None,
                      log=None, data_name: str | None = None) -> dict:
    """``recipes.quantize_graph`` for an ort-cpu INT8 ``recipe`` on a graph ``src`` with external data, in bounded
    memory: writes ``dst`` and its data file ``data_name`` beside it (default: the source's data file name).
    Returns the same information as quantize_graph, plus ``streamed`` (bytes written, seconds per step)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from illume_rt.calibration.recipes import REDUCE_RANGE, _ensure_names, kept_nodes, written_graph_report

    flavour = streamable(recipe)
    if flavour is None:
        raise StreamingUnsupported(f"the streamed quantizer reproduces {' and '.join(STREAMED)} only, not "
                                   f"{recipe.name}")
    trt = flavour == "tensorrt"
    src, dst = Path(src), Path(dst)
    say = log or (lambda m: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    _ensure_names(model)
    locations = {external_info(i)["location"] for i in model.graph.initializer if external_info(i)}
    if len(locations) > 1:
        raise StreamingUnsupported(f"{src.name}: external data in {len(locations)} files; the streamed quantizer "
                                   "expects one (as the exporter writes)")
    data_name = data_name or next(iter(locations), f"{dst.name}.data")
    weights = Weights(model, src.parent)
    kept = kept_nodes(recipe, model)
    plan = Plan(model, kept)
    g = model.graph
    planned = [n.name for n in plan.weighted if n.name not in kept]
    info: dict = {"kept_fp32_nodes": sorted(plan.exclude), "calibration_samples": len(feeds)}

    # -- SmoothQuant groups and folds (recipes.smoothquant's rules, on the structure) ---------------------------
    groups: dict[str, list] = {}
    folds: dict[str, tuple] = {}
    if recipe.smoothquant_alpha is not None:
        for n in g.node:
            if n.op_type == "MatMul" and plan.weight_of(n.input[1]) is not None:
                groups.setdefault(n.input[0], []).append(n)
        for tensor, nodes in groups.items():
            p = plan.producer.get(tensor)
            if p is None or p.op_type != "Mul":
                continue
            const = [i for i in p.input if plan.source(i) is not None and len(plan.inits[plan.source(i)].dims) == 1]
            if const:
                folds[tensor] = ("norm", p, const[0])
                continue
            for i in p.input:
                q = plan.producer.get(i)
                if (q is not None and q.op_type == "MatMul" and plan.weight_of(q.input[1]) is not None
                        and plan.uses.get(i, 0) == 1 and plan.uses.get(q.input[1], 0) == 1
                        and q.input[1] not in [n.input[1] for n in nodes]):
                    folds[tensor] = ("columns", q, i)
                    break

    # -- calibration: per-channel min/max of every tensor needed, one FP32 session -----------------------------
    activations: list[str] = []
    for node in plan.quantized:  # quantize_static: inputs and outputs; modelopt: inputs
        for t in (node.input[0],) if trt else (node.input[0], node.output[0]):
            if t not in activations:
                activations.append(t)
    needed = list(dict.fromkeys([*groups, *[f[2] for f in folds.values() if f[0] == "columns"], *activations]))
    t1 = time.perf_counter()
    stats = channel_ranges(model, src.parent, needed, feeds, threads, say)
    timings["calibration"] = round(time.perf_counter() - t1, 1)
    peak = peak_rss_bytes()
    say(f"  calibrated {len(needed)} tensors on {len(feeds)} feeds in {timings['calibration']:.1f}s"
        + (f" (peak RSS so far {peak / 1e9:.1f} GB)" if peak else ""))

    # -- SmoothQuant scales: weights read one at a time; transforms recorded, applied when the weight is written --
    ops: dict[str, list] = {}  # initializer (or new initializer) -> [(kind, s)] in order
    new_from: dict[str, str] = {}  # new initializer -> the initializer it copies (unshared norm weights)
    rewire: list[tuple] = []  # (node, old input, new input)
    divided: dict[str, np.ndarray] = {}  # tensor -> s: its channels are divided by s after smoothing
    report = ({"alpha": recipe.smoothquant_alpha, "smoothed": [], "skipped": []}
              if recipe.smoothquant_alpha is not None else None)

    def current(name: str) -> np.ndarray:
        value = weights.float32(new_from.get(name, name))
        for kind, s in ops.get(name, []):
            if kind == "rows":
                value = (value * s[:, None]).astype(np.float32)
            elif kind == "columns":
                value = (value / s[None, :]).astype(np.float32)
            else:
                value = (value / s).astype(np.float32)
        return value

    t2 = time.perf_counter()
    for tensor, nodes in groups.items():
        fold = folds.get(tensor)
        ws = [n.input[1] for n in nodes]
        if fold is None or tensor not in stats or any(plan.uses.get(w, 0) != 1 for w in ws):
            report["skipped"].append([n.name for n in nodes])
            continue
        if fold[0] == "norm":
            p, const = fold[1], fold[2]
            name = plan.source(const)
            if plan.uses.get(const, 0) > 1 or const != name:  # shared (or 16-bit behind a Cast): its own copy
                new = f"{const}.smooth.{p.name}"
                new_from[new] = name
                ops[new] = list(ops.get(name, []))
                rewire.append((p, const, new))
                plan.uses[const] -= 1
                plan.uses[new] = 1
                name = new
            target = ("norm", name)
        else:
            target = ("columns", plan.source(fold[1].input[1]))
        mn, mx = stats[tensor]
        x_max = np.maximum(np.maximum(np.abs(mn), np.abs(mx)).astype(np.float64), 1e-5)
        w_rows = [np.abs(current(plan.source(w))).max(axis=1) for w in ws]
        w_max = np.maximum(np.max(w_rows, axis=0).astype(np.float64), 1e-5)
        s = np.clip(x_max ** recipe.smoothquant_alpha / w_max ** (1 - recipe.smoothquant_alpha), 1e-2, 1e2)
        for w in ws:
            ops.setdefault(plan.source(w), []).append(("rows", s))
        ops.setdefault(target[1], []).append((target[0], s))
        divided[tensor] = s
        if fold[0] == "columns":
            divided[fold[2]] = s
        report["smoothed"].append({"matmuls": [n.name for n in nodes], "fold": fold[0],
                                   "scale_range": [float(s.min()), float(s.max())]})
    timings["smoothquant_scales"] = round(time.perf_counter() - t2, 1)
    if report is not None:
        info["smoothquant"] = report
    for node, old, new in rewire:
        node.input[list(node.input).index(old)] = new

    # -- activation Q/DQ parameters from the (smoothed) ranges ---------------------------------------------------
    act_params = {}
    for t in activations:
        if t not in stats:
            raise StreamingUnsupported(f"tensor {t} was never computed by the calibration feeds")
        mn, mx = stats[t]
        if t in divided:
            mn, mx = mn.astype(np.float64) / divided[t], mx.astype(np.float64) / divided[t]
        act_params[t] = (symmetric_activation_params if trt else activation_params)(np.float32(mn.min()),
                                                                                   np.float32(mx.max()))

    # -- nodes: the original ones rewired, weight DQs before their MatMul, activation Q/DQ after the producer -----
    quant_weights = {plan.source(n.input[1]): n.input[1] for n in plan.quantized}  # source -> MatMul input name
    dq_of_act = {t: f"{t}_DequantizeLinear_Output" for t in activations}
    renamed_out = {t: f"{t}_QuantizeLinear_Input" for t in activations if t in plan.graph_outputs}
    inline = []

    def act_nodes(t):
        zero, scale = act_params[t]
        inline.extend([numpy_helper.from_array(scale, f"{t}_scale"), numpy_helper.from_array(zero, f"{t}_zero_point")])
        q_in = renamed_out.get(t, t)
        dq_out = t if t in renamed_out else dq_of_act[t]
        return [helper.make_node("QuantizeLinear", [q_in, f"{t}_scale", f"{t}_zero_point"],
                                 [f"{t}_QuantizeLinear_Output"], f"{t}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{t}_QuantizeLinear_Output", f"{t}_scale", f"{t}_zero_point"],
                                 [dq_out], f"{t}_DequantizeLinear")]

    quantized_names = {n.name for n in plan.quantized}
    nodes = []
    for t in activations:  # graph inputs quantized: their Q/DQ come first
        if t in plan.graph_inputs:
            nodes += act_nodes(t)
    emitted = set()
    for node in g.node:
        if node.name in quantized_names:
            src_name = plan.source(node.input[1])
            if src_name not in emitted and trt:  # modelopt: the FP32 weight, Q then DQ (TensorRT folds them)
                emitted.add(src_name)
                nodes += [helper.make_node("QuantizeLinear", [src_name, f"{src_name}_scale", f"{src_name}_zero_point"],
                                           [f"{src_name}_QuantizeLinear_Output"], f"{src_name}_QuantizeLinear",
                                           axis=1),
                          helper.make_node("DequantizeLinear", [f"{src_name}_QuantizeLinear_Output",
                                                                f"{src_name}_scale", f"{src_name}_zero_point"],
                                           [f"{src_name}_DequantizeLinear_Output"], f"{src_name}_DequantizeLinear",
                                           axis=1)]
            if src_name not in emitted:  # one DQ per weight, before its first reader (a tied weight has several)
                emitted.add(src_name)
                nodes.append(helper.make_node("DequantizeLinear", [f"{src_name}_quantized", f"{src_name}_scale",
                                                                   f"{src_name}_zero_point"],
                                              [f"{src_name}_DequantizeLinear_Output"], f"{src_name}_DequantizeLinear",
                                              axis=1))
            node.input[1] = f"{src_name}_DequantizeLinear_Output"
        for k, i in enumerate(node.input):
            if i in dq_of_act and i not in renamed_out:
                node.input[k] = dq_of_act[i]
        produced = [o for o in node.output if o in dq_of_act]
        for k, o in enumerate(node.output):
            if o in renamed_out:
                node.output[k] = renamed_out[o]
        nodes.append(node)
        for o in produced:
            nodes += act_nodes(o)
    # the exporter's Casts of 16-bit weights that nothing reads any more (their weight is quantized or re-stored)
    while True:
        read = {i for n in nodes for i in n.input} | plan.graph_outputs
        dead = [n for n in nodes if n.op_type == "Cast" and n.output[0] in plan.cast_source and n.output[0] not in read]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    read = {i for n in nodes for i in n.input} | plan.graph_outputs

    # -- initializers: quantized weights and re-scaled ones written, other external ones copied, one at a time ---
    t3 = time.perf_counter()
    writer = DataWriter(dst.parent / data_name)
    new_inits = []
    try:
        for src_name in quant_weights:
            w = current(src_name)
            if trt:
                scale = symmetric_weight_scales(w)
                zero = np.zeros(w.shape[1], np.int8)
                new_inits.append(writer.array(src_name, w, TensorProto.FLOAT))  # stored FP32, as modelopt leaves it
                inline += [numpy_helper.from_array(scale, f"{src_name}_scale"),
                           numpy_helper.from_array(zero, f"{src_name}_zero_point")]
                continue
            q, scale, zero = weight_params(w, REDUCE_RANGE)
            del w
            new_inits.append(writer.array(f"{src_name}_quantized", q, TensorProto.INT8))
            inline += [numpy_helper.from_array(scale, f"{src_name}_scale"),
                       numpy_helper.from_array(zero, f"{src_name}_zero_point")]
            del q
        for name in [i.name for i in g.initializer] + list(new_from):
            if name not in read or name in quant_weights:
                continue
            source = new_from.get(name, name)
            external = external_info(plan.inits[source]) is not None
            if name in ops or name in new_from:
                value = current(name)
                if external:
                    new_inits.append(writer.array(name, value, TensorProto.FLOAT))
                else:
                    inline.append(numpy_helper.from_array(value, name))
            elif external:
                new_inits.append(writer.copy(weights, name))
            else:
                inline.append(plan.inits[name])
    finally:
        writer.close()
    timings["write_weights"] = round(time.perf_counter() - t3, 1)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(new_inits + inline)
    onnx.save(model, str(dst))
    timings["total"] = round(time.perf_counter() - t0, 1)

    info.update(written_graph_report(model, planned))
    info["streamed"] = {"external_data": data_name, "data_bytes": (dst.parent / data_name).stat().st_size,
                        "source_data_bytes": sum((src.parent / x).stat().st_size for x in locations),
                        "seconds": timings,
                        "method": "streamed (calibration/streamed.py): structure + one tensor at a time",
                        "tool": f"illume_rt.calibration.streamed (the {recipe.tool} graph, reproduced)",
                        "reproduces": ("modelopt.onnx.quantization.quantize INT8 (max), high_precision_dtype fp32"
                                       if trt else "onnxruntime.quantization.quantize_static QDQ U8S8 (MinMax, "
                                       "per-channel, reduce_range)")}
    return info


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (VmHWM) in bytes, Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
