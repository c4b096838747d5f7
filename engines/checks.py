"""Checks that run without TensorRT: can TensorRT's ONNX parser take every graph of a bundle, and are the Q/DQ
graphs placed the way TensorRT's explicit quantization needs?

``check_graph_ops`` walks every node: the op must be in the operator table of the targeted TensorRT version
(``engines/data/tensorrt_ops_<version>.json``, from onnx-tensorrt's ``docs/operators.md``) and marked supported; the
element type of its type-carrying tensor must be in the op's supported types; and the restrictions of the document
that our exporter can hit are checked structurally (Resize modes, constant ``axes``, zero Q/DQ zero points,
TopK's K).

``check_qdq`` applies TensorRT's rules for explicitly quantized (Q/DQ) graphs, which are built as strongly typed
networks:

1. Quantized types (INT8, FP8, INT4) exist only between a QuantizeLinear and a DequantizeLinear: a Q output feeds
   only DQ nodes; a DQ input is a Q output or a quantized constant (weights).
2. Zero points are zero (symmetric quantization); scales are positive constants.
3. Activations are quantized per tensor (scalar scale); weights per tensor or per channel along the output-channel
   axis (axis 0 for Conv weights, the last axis for MatMul/Gemm weights [K, N]); INT4 is weights only. A quantizer
   is a *weight* quantizer when its input is constant-foldable: an initializer or Constant, or computed only from
   constants (Cast/Transpose/Reshape of a weight, a QuantizeLinear of a weight: ModelOpt writes weights as
   ``W (float) -> Q -> DQ``, TensorRT folds the Q at build time); anything that depends on a graph input is an
   *activation* quantizer.
4. FP8 means E4M3FN (TensorRT has no E5M2 Q/DQ); an ``int8`` graph holds no FP8 tensors and an ``fp8`` graph no
   INT8 activations; a graph labelled int8/fp8 that holds no Q/DQ at all would silently build in float: an error.
5. A Conv/ConvTranspose/MatMul/Gemm runs quantized only when both its data and weight inputs come from DQ nodes;
   one DQ input only is reported as a warning (it runs in float, usually a placement mistake).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from illume_rt.engines.trt_ops import ONNX_TYPE_NAMES, OpTable, load_op_table

QUANTIZED = {"INT8", "FP8", "INT4"}
CONSTANT_SCALAR_TYPES = {"value_int": 7, "value_ints": 7, "value_float": 1, "value_floats": 1}  # onnx INT64, FLOAT
FP8_E4M3FN = 17  # TensorProto.FLOAT8E4M3FN
FLOAT_TYPES = {"FP32", "FP16", "BF16"}
HEAVY_OPS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1)}
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}

# Which tensor carries the type the document's "Supported Types" column constrains (default: input 0).
TYPE_FROM_OUTPUT = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"}
TYPE_FROM_INPUT = {"Where": 1}
# Ops whose document entry says `axes` (or `axis`) must be an initializer: index of that input (opset 13+).
CONSTANT_INPUTS = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1,
                   **{f"Reduce{r}": 1 for r in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod",
                                                "Sum", "SumSquare")}}
RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@dataclass
class CheckReport:
    graph: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"graph": self.graph, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "ops": self.ops}


class _Graph:
    """Type and constant lookups over one ONNX model (shape inference fills the intermediate types)."""

    def __init__(self, model) -> None:
        import onnx

        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # inference is a help, not a requirement
            pass
        self.model, self.graph = model, model.graph
        self.types: dict[str, int] = {}
        for value in (*self.graph.input, *self.graph.output, *self.graph.value_info):
            if value.type.HasField("tensor_type"):
                self.types[value.name] = value.type.tensor_type.elem_type
        self.constants: dict[str, np.ndarray] = {}
        for init in self.graph.initializer:
            self.types[init.name] = init.data_type
            self.constants[init.name] = init
        self.shapes: dict[str, int] = {}  # tensor -> rank, where shape inference knows it
        for value in (*self.graph.input, *self.graph.output, *self.graph.value_info):
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                self.shapes[value.name] = len(value.type.tensor_type.shape.dim)
        self._foldable: dict[str, bool] = {}
        self.producer: dict[str, object] = {}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant":  # TensorRT's parser takes every form of Constant as weights
                for attr in node.attribute:
                    if attr.name == "value":
                        self.types[node.output[0]] = attr.t.data_type
                        self.constants[node.output[0]] = attr.t
                    elif attr.name in CONSTANT_SCALAR_TYPES:  # value_int(s), value_float(s) (exporter's axes)
                        self.types[node.output[0]] = CONSTANT_SCALAR_TYPES[attr.name]
                        self.constants[node.output[0]] = attr

    def type_name(self, tensor: str) -> str | None:
        code = self.types.get(tensor)
        return ONNX_TYPE_NAMES.get(code, f"onnx-type-{code}") if code else None

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def is_weight(self, tensor: str) -> bool:
        """Constant-foldable: a constant, or computed only from constants (no graph input upstream)."""
        if tensor in self._foldable:
            return self._foldable[tensor]
        self._foldable[tensor] = False  # cycles (none in a valid graph) end here
        if tensor in self.constants:
            result = True
        else:
            node = self.producer.get(tensor)
            result = node is not None and node.op_type not in RANDOM_OPS and \
                all(self.is_weight(i) for i in node.input if i)
        self._foldable[tensor] = result
        return result

    def rank(self, tensor: str) -> int | None:
        """Rank of a tensor: from its constant value, shape inference, or (through Q/Cast/Identity) its source."""
        value = self.constant(tensor)
        if value is not None:
            return value.ndim
        if tensor in self.shapes:
            return self.shapes[tensor]
        node = self.producer.get(tensor)
        if node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity"):
            return self.rank(node.input[0])
        return None

    def constant(self, tensor: str) -> np.ndarray | None:
        import onnx
        from onnx import numpy_helper

        proto = self.constants.get(tensor)
        if proto is None:
            return None
        if isinstance(proto, onnx.AttributeProto):  # a Constant's value_int(s) / value_float(s)
            import onnx.helper

            return np.asarray(onnx.helper.get_attribute_value(proto))
        try:
            return numpy_helper.to_array(proto)
        except Exception:  # FP8/INT4 arrays need ml_dtypes on some onnx versions: treat as unknown values
            return None


def _attr(node, name: str, default=None):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path)), Path(model_or_path).name
    return model_or_path, model_or_path.graph.name or "graph"


def check_graph_ops(model_or_path, table: OpTable | None = None) -> CheckReport:
    """Every node of one graph against TensorRT's operator table (see module docstring)."""
    model, label = _load(model_or_path)
    table = table or load_op_table()
    report = CheckReport(label)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if not table.opset_min <= opset.version <= table.opset_max:
                report.errors.append(f"opset {opset.version} is outside TensorRT {table.tensorrt_version}'s "
                                     f"range {table.opset_min}..{table.opset_max}")
        else:
            report.errors.append(f"custom op domain {opset.domain!r} needs a TensorRT plugin")
    g = _Graph(model)
    for value in (*model.graph.input, *model.graph.output):
        name = g.type_name(value.name)
        if name and name not in table.network_types:
            report.errors.append(f"graph tensor {value.name} has type {name}, not a TensorRT type")
    for node in model.graph.node:
        report.ops[node.op_type] = report.ops.get(node.op_type, 0) + 1
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            report.errors.append(f"{where}: domain {node.domain!r} is not an ONNX op TensorRT parses")
            continue
        entry = table.get(node.op_type)
        if entry is None or not entry.supported:
            report.errors.append(f"{where}: not supported by TensorRT {table.tensorrt_version}'s ONNX parser")
            continue
        if node.op_type in TYPE_FROM_OUTPUT:
            typed = [node.output[0]]
        elif node.op_type in ("Cast", "CastLike"):
            typed = [node.input[0], node.output[0]]
        else:
            index = TYPE_FROM_INPUT.get(node.op_type, 0)
            typed = [node.input[index]] if len(node.input) > index and node.input[index] else []
        for tensor in typed:
            type_name = g.type_name(tensor)
            if type_name is None:
                report.warnings.append(f"{where}: type of {tensor} unknown (shape inference did not reach it)")
            elif type_name == "DOUBLE":
                report.warnings.append(f"{where}: DOUBLE {tensor} is cast to FP32 by TensorRT (limited support)")
            elif type_name not in entry.types:
                report.errors.append(f"{where}: {tensor} is {type_name}; TensorRT {table.tensorrt_version} takes "
                                     f"{', '.join(entry.types)}")
        _check_restrictions(node, where, g, table, report)
    return report


def _check_restrictions(node, where: str, g: _Graph, table: OpTable, report: CheckReport) -> None:
    op = node.op_type
    if op in CONSTANT_INPUTS:
        index = CONSTANT_INPUTS[op]
        if len(node.input) > index and node.input[index] and not g.is_constant(node.input[index]):
            report.errors.append(f"{where}: input {index} ({node.input[index]}) must be a constant for TensorRT")
    elif op == "Resize":
        modes = table.errata.get("Resize", {}).get("modes", ["nearest", "linear"])
        mode = _attr(node, "mode", "nearest")
        if mode not in modes:
            report.errors.append(f"{where}: mode {mode!r} unsupported (TensorRT takes {', '.join(modes)})")
        if _attr(node, "antialias", 0):
            report.errors.append(f"{where}: antialiasing is not supported by TensorRT")
        coords = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if coords not in RESIZE_COORDS:
            report.errors.append(f"{where}: coordinate_transformation_mode {coords!r} unsupported")
        if mode == "nearest" and _attr(node, "nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST:
            report.errors.append(f"{where}: nearest_mode {_attr(node, 'nearest_mode')!r} unsupported")
        if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            report.errors.append(f"{where}: keep_aspect_ratio_policy must be 'stretch'")
    elif op == "TopK":
        k = g.constant(node.input[1]) if len(node.input) > 1 else None
        if k is None:
            report.warnings.append(f"{where}: K is not a constant; TensorRT needs K < 3840 at run time")
        elif int(np.max(k)) >= 3840:
            report.errors.append(f"{where}: K = {int(np.max(k))}; TensorRT's TopK needs K < 3840")
        if _attr(node, "sorted", 1) != 1:
            report.errors.append(f"{where}: TensorRT's TopK needs sorted = 1")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        if len(node.input) > 2 and node.input[2]:
            zp = g.constant(node.input[2])
            if zp is None and not g.is_constant(node.input[2]):
                report.errors.append(f"{where}: zero point must be a constant zero")
            elif zp is not None and np.any(zp.astype(np.float64) != 0):
                report.errors.append(f"{where}: zero point must be zero (TensorRT quantization is symmetric)")
    elif op == "LayerNormalization":
        if sum(1 for out in node.output[1:] if out and g.consumers.get(out)) > 0:
            report.errors.append(f"{where}: only output Y is supported (Mean/InvStdDev are used)")


def check_qdq(model_or_path, precision: str) -> CheckReport:
    """TensorRT's placement rules for explicitly quantized graphs (see module docstring)."""
    model, label = _load(model_or_path)
    report = CheckReport(label)
    g = _Graph(model)
    nodes = list(model.graph.node)
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in nodes if n.op_type == "DequantizeLinear"]
    if precision in ("int8", "fp8") and not dqs:
        report.errors.append(f"graph is labelled {precision} but holds no Q/DQ nodes: it would build in float")
        return report
    if precision not in ("int8", "fp8", "int4") and (qs or dqs):
        report.warnings.append(f"graph labelled {precision} holds Q/DQ nodes; build it strongly typed")
    for q in qs:
        where = f"QuantizeLinear {q.name or q.output[0]!r}"
        in_type = g.type_name(q.input[0])
        if in_type and in_type not in FLOAT_TYPES:
            report.errors.append(f"{where}: input is {in_type}; TensorRT quantizes FP32/FP16/BF16 only")
        for consumer in g.consumers.get(q.output[0], []):
            if consumer.op_type != "DequantizeLinear":
                report.errors.append(f"{where}: output feeds {consumer.op_type} {consumer.name!r}; a quantized "
                                     "tensor may only feed DequantizeLinear")
        if q.output[0] in {o.name for o in model.graph.output}:
            report.errors.append(f"{where}: a quantized tensor is a graph output")
        _check_scale(q, where, g, report, weights=g.is_weight(q.input[0]))
        _check_quant_type(q, q.output[0], where, g, precision, report)
    for dq in dqs:
        where = f"DequantizeLinear {dq.name or dq.output[0]!r}"
        source = dq.input[0]
        weights = g.is_weight(source)  # a quantized constant, or the output of a weight quantizer
        producer = g.producer.get(source)
        if not weights and (producer is None or producer.op_type != "QuantizeLinear"):
            what = producer.op_type if producer is not None else "a graph input"
            report.errors.append(f"{where}: input comes from {what}; it must come from QuantizeLinear or be "
                                 "quantized constant weights")
        _check_scale(dq, where, g, report, weights=weights)
        _check_quant_type(dq, source, where, g, precision, report)
        if g.type_name(source) == "INT4" and not weights:
            report.errors.append(f"{where}: INT4 is for weights only in TensorRT")
    for node in nodes:
        if node.op_type not in HEAVY_OPS:
            continue
        fed = [i for i in HEAVY_OPS[node.op_type]
               if len(node.input) > i and (p := g.producer.get(node.input[i])) is not None
               and p.op_type == "DequantizeLinear"]
        if len(fed) == 1:
            report.warnings.append(f"{node.op_type} {node.name or node.output[0]!r}: only input {fed[0]} comes "
                                   "from DequantizeLinear; it will run in float (quantize both data and weights)")
    return report


def _check_scale(node, where: str, g: _Graph, report: CheckReport, weights: bool) -> None:
    if len(node.input) > 2 and node.input[2]:
        zp = g.constant(node.input[2])
        if zp is not None and np.any(zp.astype(np.float64) != 0):
            report.errors.append(f"{where}: zero point must be zero (TensorRT quantization is symmetric)")
        elif zp is None and not g.is_constant(node.input[2]):
            report.errors.append(f"{where}: zero point must be a constant zero")
    scale_name = node.input[1] if len(node.input) > 1 else ""
    if not g.is_constant(scale_name):
        report.errors.append(f"{where}: scale must be a constant (initializer or Constant)")
        return
    scale = g.constant(scale_name)
    if scale is not None and np.any(scale.astype(np.float64) <= 0):
        report.errors.append(f"{where}: scale must be positive")
    if scale is None or scale.size <= 1:
        return
    if not weights:
        report.errors.append(f"{where}: activations must be quantized per tensor (scale has {scale.size} values; "
                             "only weights, i.e. constant inputs, may be quantized per channel)")
        return
    if _attr(node, "block_size", 0):
        return  # block quantization of weights (INT4 weight-only)
    axis = _attr(node, "axis", 1)
    source = node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]
    rank = g.rank(node.input[0])
    for consumer in g.consumers.get(node.output[0], []):
        if consumer.op_type in ("Conv", "ConvTranspose") and len(consumer.input) > 1 and \
                consumer.input[1] == node.output[0]:
            want = 0 if consumer.op_type == "Conv" else 1
            if axis % (rank or 4) != want:
                report.errors.append(f"{where}: per-channel weights of {consumer.op_type} must use axis {want} "
                                     f"(output channels), not {axis}")
        elif consumer.op_type in ("MatMul", "Gemm") and len(consumer.input) > 1 and \
                consumer.input[1] == node.output[0]:
            want = (rank - 1) if rank else -1
            trans_b = consumer.op_type == "Gemm" and _attr(consumer, "transB", 0)
            if trans_b:
                want = 0
            if rank and axis % rank != want % rank:
                report.errors.append(f"{where}: per-channel weights of {consumer.op_type} must use the output "
                                     f"axis {want % rank}, not {axis}")
    del source


def _check_quant_type(node, tensor: str, where: str, g: _Graph, precision: str, report: CheckReport) -> None:
    code = g.types.get(tensor)
    if node.op_type == "QuantizeLinear" and code is None and len(node.input) > 2 and node.input[2]:
        code = g.types.get(node.input[2])  # Q's output type follows its zero point
    if code is None:
        return
    name = ONNX_TYPE_NAMES.get(code)
    if name == "FP8" and code != FP8_E4M3FN:
        report.errors.append(f"{where}: FP8 must be E4M3FN for TensorRT (got ONNX type {code})")
    if name not in QUANTIZED:
        report.errors.append(f"{where}: quantized type {name or code} is not INT8, FP8 or INT4")
    if precision == "int8" and name == "FP8":
        report.errors.append(f"{where}: FP8 tensor in a graph labelled int8")
    if precision == "fp8" and name == "INT8" and not g.is_constant(tensor):
        report.errors.append(f"{where}: INT8 activation in a graph labelled fp8")


def check_bundle(bundle, version: str | None = None) -> list[CheckReport]:
    """Op support for every graph of a bundle, plus Q/DQ rules for the quantized ones."""
    table = load_op_table(version) if version else load_op_table()
    reports = []
    for name, entry in bundle.manifest["components"].items():
        path = bundle.component_path(name)
        report = check_graph_ops(path, table)
        report.graph = name
        precision = entry.get("precision", "fp32")
        if precision in ("int8", "fp8", "int4") or report.ops.get("QuantizeLinear") or \
                report.ops.get("DequantizeLinear"):
            qdq = check_qdq(path, precision)
            report.errors += qdq.errors
            report.warnings += qdq.warnings
        reports.append(report)
    return reports
