"""Quantization recipes per component, the SmoothQuant graph transform, the two Q/DQ flavours, the FP16/BF16
conversion (ModelOpt AutoCast), and the gates.

TensorRT 11 builds strongly typed networks only: every layer runs in the type the ONNX graph gives it, so a
bundle's precision must already be in its graphs.

Flavours (``target``):

- ``tensorrt``: symmetric signed Q/DQ (INT8 S8S8, zero points 0) or FP8 E4M3 Q/DQ as standard ONNX
  ``QuantizeLinear``/``DequantizeLinear`` with ``float8e4m3fn`` (opset 19), made by **nvidia-modelopt**
  (``modelopt.onnx.quantization.quantize``, CPU calibration) with **FP16 high precision** by default (``bf16`` or
  ``fp32`` on request): the layers that are not quantized run in FP16, not FP32. Made in two steps: Q/DQ at FP32,
  then AutoCast on the Q/DQ graph with the calibration feeds as reference data (``quantize_graph``).
  ``fp16``/``bf16`` (no Q/DQ): **ModelOpt AutoCast** (``modelopt.onnx.autocast.convert_to_mixed_precision``,
  ``keep_io_types=True``) converts the graph to mixed precision, keeping in FP32 what accuracy needs: the norms
  (``AUTOCAST_KEEP_FP32_OPS``: the RMSNorm/LayerNorm/GroupNorm/InstanceNorm reductions), softmax, the logits (the
  LM head slices stay FP32 whole, ``KEEP_FP32``), and any node AutoCast's own rules keep (values or initializers
  out of the low-precision range), and every angle fed to Cos/Sin (``angle_nodes``: the rotary positions, the
  timestep embedding). Graph inputs and outputs stay FP32.
- ``ort-cpu``: the INT8 flavour onnxruntime's CPU kernels are fast with, unsigned asymmetric activations and signed
  per-channel weights (U8S8), made by **onnxruntime.quantization.quantize_static** (modelopt only writes signed
  activations). FP8 has no fast CPU kernel: ``--precision fp8 --target ort-cpu`` writes the same modelopt FP8 graph
  (onnxruntime runs it emulated, ``session.disable_quant_qdq=1``).

Only MatMul/Gemm/Conv nodes with a constant weight are quantized (the linear layers): the attention products
(activation x activation), norms, softmax and the rest stay FP32. INT8 for the LLM is SmoothQuant-style W8A8: before
Q/DQ insertion, per-input-channel scales s = max|X|^a / max|W|^(1-a) migrate activation outliers into the weights,
folded into the preceding RMSNorm weight (q/k/v, gate/up) or into up_proj's output columns (down_proj); weights are
per-channel, activations per-tensor static.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .ort_state import ort_quantization_state_kept

# Graphs quantized, and those kept in FP32 with the reason (stored in the manifest).
QUANTIZED = ("llm", "pixel_decoder", "semantic_encoder", "pixel_embedder", "diffusion_unet", "vae_decoder")
KEEP_FP32 = {
    "lm_head_text": "LM head slice: decides every token (argmax/top-k); small next to the body; kept FP32",
    "lm_head_semantic": "LM head slice: decides every token; kept FP32",
    "lm_head_pixel": "LM head slice: decides every token; kept FP32",
    "token_map": "no weights (codebook upsample + concat): nothing to quantize",
}
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# ort-cpu INT8: weights use 7 bits (onnxruntime's reduce_range). U8S8 kernels on x86 CPUs without VNNI (AVX2 only,
# e.g. the AMD EPYC these tests run on) multiply-add pairs of u8 x s8 into 16 bits, which saturates with full-range
# weights: measured here (tiny, small plans), pixel_embedder worst cosine 0.708 and pixel_decoder 0.954 with 8-bit
# weights, 0.982 and 0.996 with reduce_range. A bundle may run on other machines than the one that made it, so
# always.
REDUCE_RANGE = True
QDQ_PRECISIONS = ("int8", "fp8")
FLOAT_PRECISIONS = ("fp16", "bf16")  # AutoCast, TensorRT target only
PRECISIONS = QDQ_PRECISIONS + FLOAT_PRECISIONS
HIGH_PRECISIONS = ("fp16", "bf16", "fp32")
# Kept in FP32 by the FP16/BF16 conversion: norm reductions (x^2, mean, sqrt, 1/x), softmax, and exp/log.
AUTOCAST_KEEP_FP32_OPS = ("Softmax", "LogSoftmax", "Pow", "ReduceMean", "ReduceSumSquare", "Sqrt", "Reciprocal",
                          "Div", "LayerNormalization", "RMSNormalization", "GroupNormalization",
                          "InstanceNormalization", "Exp", "Log")


@dataclass(frozen=True)
class Recipe:
    component: str
    precision: str  # int8 | fp8 | fp16 | bf16
    target: str  # tensorrt | ort-cpu
    tool: str  # nvidia-modelopt | nvidia-modelopt autocast | onnxruntime.quantization
    calibration_method: str
    smoothquant_alpha: float | None = None
    activations: str = ""
    weights: str = ""
    exclude: tuple[str, ...] = field(default_factory=tuple)  # node names kept in high precision
    keep_boundary_convs: bool = False  # the graph's first and last convolutions stay high precision (boundary_convs)
    high_precision: str = "fp32"  # the type of what is not quantized (Q/DQ recipes)
    keep_fp32_ops: tuple[str, ...] = field(default_factory=tuple)  # AutoCast: op types kept in FP32
    percentile: float | None = None  # calibration_method "Percentile": the two-sided percentile of each range

    @property
    def name(self) -> str:
        if self.precision in FLOAT_PRECISIONS:
            return f"{self.precision}-autocast-{self.target}"
        sq = f"-smoothquant{self.smoothquant_alpha:g}" if self.smoothquant_alpha is not None else ""
        hp = f"-{self.high_precision}" if self.high_precision != "fp32" else ""
        method = self.calibration_method + (f"{self.percentile:g}" if self.percentile is not None else "")
        return f"{self.precision}{sq}-{method}{hp}-{self.target}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        d["exclude"] = list(self.exclude)
        d["keep_fp32_ops"] = list(self.keep_fp32_ops)
        return d


# Graphs whose first and last convolutions stay in high precision in the Q/DQ recipes (boundary_convs). The diffusion
# UNet's first conv reads the noisy latent concatenated with the token map, channels of very different ranges under
# one per-tensor activation scale, and its last conv writes the prediction the sampler steps on, with no later layer
# to absorb the error, at every one of the 20 steps. Measured on illume-nano's decoder trained with offset noise
# (session 32, onnxruntime CPU INT8, nano's calibration plan): worst graph cosine 0.944 with them quantized (gate
# 0.99), 0.9989 with them kept in FP32: 2 of its 69 weighted nodes (bench/results/20261203-nano-edit-steps-2700).
KEEP_BOUNDARY_CONVS = ("diffusion_unet",)


# SmoothQuant's alpha for the INT8 LLM, by preset (absent: "default"). 0.5 is the SmoothQuant paper's choice for
# LLMs whose activations carry outlier channels, which it moves into the weights. illume-nano's have none to move,
# and at 0.5 its INT8 LLM missed its own cosine gate (the alphas measured: docs/quantization.md). The released 3B/7B
# keep 0.5 (never quantized here); tiny keeps it too, so the tests go on exercising the transform.
SMOOTHQUANT_ALPHA: dict[str, float | None] = {"default": 0.5, "nano": None}


# How the INT8 ort-cpu LLM's activation ranges are calibrated, by preset (absent: "default"). MinMax takes each
# tensor's extremes over every calibration feed, so one rare value sets the step of all the others, and the more
# feeds the wider the range: illume-nano's LLM went from worst held-out cosine 0.9903 to 0.9872 (gate 0.99) when its
# feeds went from 117 to 217 (its down-projection inputs reach -40, their 99.999th percentiles -16). "Percentile"
# takes the two-sided CALIBRATION_PERCENTILE of each tensor's values instead (onnxruntime's Percentile default,
# computed here by percentile_ranges, since onnxruntime's histogram calibrators stack every feed and fail on the
# varied shapes captured here): 0.9941 and 0.9951 on the same feeds (bench/results/20261204-nano-int8-llm-percentile).
# The default keeps MinMax: the 3B/7B LLM bodies are quantized streamed (calibration/streamed.py), which reduces
# each tensor to its extremes inside the graph, and were never quantized here.
LLM_ORT_CPU_CALIBRATION: dict[str, str] = {"default": "MinMax", "nano": "Percentile"}
CALIBRATION_PERCENTILE = 99.999

# How the INT8 tensorrt LLM's activation ranges are calibrated by ModelOpt, by preset (absent: "default"). "max"
# takes each tensor's extremes, as MinMax does for ort-cpu, and for the same reason failed illume-nano's LLM: on the
# weights `edit` trains at twice its learning rate its worst held-out cosine was 0.9895 (gate 0.99) while every other
# graph passed (session 54). "entropy" picks each range from a histogram of the values (the one minimising the
# KL divergence between the clipped and the original distribution, TensorRT's own INT8 calibration), and gave 0.9962
# there, and 0.9946 against max's 0.9930 on the committed weights, nano's LLM calibrating in the same 20 s either way
# (bench/results/20261206-nano-int8-tensorrt-llm-entropy). The default keeps max: the 3B/7B LLM bodies are quantized
# streamed (calibration/streamed.py), which reproduces max ranges only, and were never quantized here.
LLM_TENSORRT_CALIBRATION: dict[str, str] = {"default": "max", "nano": "entropy"}


def recipe_for(component: str, precision: str, target: str, high_precision: str | None = None,
               preset: str = "default") -> Recipe:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if target not in ("tensorrt", "ort-cpu"):
        raise ValueError(f"unknown target {target!r}; use tensorrt or ort-cpu")
    if high_precision is not None and high_precision not in HIGH_PRECISIONS:
        raise ValueError(f"unknown high precision {high_precision!r}; use fp16, bf16 or fp32")
    if precision in FLOAT_PRECISIONS:
        if target != "tensorrt":
            raise ValueError(f"--precision {precision} makes a TensorRT bundle; use --target tensorrt (onnxruntime "
                             "CPU has no fast fp16/bf16 kernels: use --precision int8 --target ort-cpu there)")
        if high_precision not in (None, "fp32"):
            raise ValueError(f"--high-precision applies to int8/fp8 only (an {precision} bundle keeps FP32 where "
                             "it needs it)")
        return Recipe(component, precision, target, "nvidia-modelopt autocast", "none", None,
                      f"{precision} (AutoCast; IO, norms, softmax FP32)", precision,
                      keep_fp32_ops=AUTOCAST_KEEP_FP32_OPS)
    hp = high_precision or ("fp16" if target == "tensorrt" else "fp32")
    if target != "tensorrt" and hp != "fp32":
        raise ValueError("--high-precision fp16/bf16 is for --target tensorrt (onnxruntime CPU runs FP32)")
    boundary = component in KEEP_BOUNDARY_CONVS
    alpha = (SMOOTHQUANT_ALPHA.get(preset, SMOOTHQUANT_ALPHA["default"])
             if (component == "llm" and precision == "int8") else None)
    keep = AUTOCAST_KEEP_FP32_OPS if hp != "fp32" else ()  # norms and softmax stay FP32 in the FP16/BF16 remainder
    if precision == "fp8":
        return Recipe(component, precision, target, "nvidia-modelopt", "max", None,
                      "fp8 e4m3fn per-tensor static (max)", "fp8 e4m3fn per-tensor", high_precision=hp,
                      keep_fp32_ops=keep, keep_boundary_convs=boundary)
    if target == "tensorrt":
        # max, not entropy, but for the LLM of some presets (LLM_TENSORRT_CALIBRATION): entropy's histograms took 78 s
        # on the tiny pixel decoder alone (2 cores) for 0.0002 cosine
        method = (LLM_TENSORRT_CALIBRATION.get(preset, LLM_TENSORRT_CALIBRATION["default"]) if component == "llm"
                  else "max")
        return Recipe(component, precision, target, "nvidia-modelopt", method, alpha,
                      "int8 symmetric per-tensor static", "int8 symmetric per-channel", high_precision=hp,
                      keep_fp32_ops=keep, keep_boundary_convs=boundary)
    # MinMax: onnxruntime's histogram calibrators stack every feed and fail on the varied shapes captured here;
    # the LLM of some presets takes percentile ranges computed by percentile_ranges (LLM_ORT_CPU_CALIBRATION)
    method = (LLM_ORT_CPU_CALIBRATION.get(preset, LLM_ORT_CPU_CALIBRATION["default"]) if component == "llm"
              else "MinMax")
    return Recipe(component, precision, target, "onnxruntime.quantization", method, alpha,
                  "uint8 asymmetric per-tensor static",
                  "int8 symmetric per-channel" + (", 7-bit range (reduce_range)" if REDUCE_RANGE else ""),
                  keep_boundary_convs=boundary,
                  percentile=CALIBRATION_PERCENTILE if method == "Percentile" else None)


# ---------------------------------------------------------------------------------------------------------------
# Gates. Figures compare the quantized graph with the FP32 graph of the source bundle on held-out inputs.
# ---------------------------------------------------------------------------------------------------------------
# Real models (3b/7b, and any checkpoint-backed preset): what a shippable quantization keeps.
#   llm_top1: teacher-forced agreement of the guided argmax (images) / greedy argmax (answers) with FP32;
#   llm_kl: mean KL(FP32 || quantized) of the softmax over the active level's rows, nats;
#   cosine: every output of every quantized graph; psnr_db: decoded images (pixel decoder, VAE) vs FP32.
THRESHOLDS = {
    "default": {
        "int8": {"llm_top1": 0.90, "llm_kl": 0.10, "cosine": 0.99, "psnr_db": 30.0},
        "fp8": {"llm_top1": 0.93, "llm_kl": 0.05, "cosine": 0.995, "psnr_db": 33.0},
    },
    # Random weights (tiny, bench): near-flat logits over few rows flip argmax on tiny perturbations, and
    # activations have no learned outlier structure, so these only catch a broken graph (wrong scale, wrong
    # axis, a missing fold), not a quality regression. Measured figures are in docs/quantization.md.
    "tiny": {
        "int8": {"llm_top1": 0.60, "llm_kl": 0.10, "cosine": 0.97, "psnr_db": 22.0},
        "fp8": {"llm_top1": 0.60, "llm_kl": 0.10, "cosine": 0.97, "psnr_db": 22.0},
    },
}
THRESHOLDS["bench"] = THRESHOLDS["tiny"]


# FP16/BF16 (AutoCast): near-lossless conversions, so tight gates. FP16 keeps 10 mantissa bits (relative rounding
# 2^-11 ~ 5e-4 per value), BF16 7 (2^-8 ~ 4e-3): a BF16 graph output of a deep net drifts ~1e-2 relative, so its
# gates are looser. The same gates for random-weight presets (no outliers: only rounding is measured).
for _table in (THRESHOLDS["default"], THRESHOLDS["tiny"]):
    _table["fp16"] = {"llm_top1": 0.98, "llm_kl": 0.005, "cosine": 0.9995, "psnr_db": 45.0}
    _table["bf16"] = {"llm_top1": 0.95, "llm_kl": 0.02, "cosine": 0.998, "psnr_db": 35.0}
# Except BF16 on random weights: measured on the tiny preset with the tests' synthetic images only (no photos), the
# LLM's worst held-out cosine was 0.927 and its answer top-1 0.833, against 0.99999 / 1.000 with the example photos:
# near-flat random logits flip on BF16 rounding and a low-norm call's cosine is ill-conditioned. So tiny's BF16
# gates only catch a broken graph, like its INT8/FP8 ones; trained models keep the tight gates above.
THRESHOLDS["tiny"]["bf16"] = {"llm_top1": 0.60, "llm_kl": 0.10, "cosine": 0.90, "psnr_db": 30.0}


# The diffusion refinement end to end (accuracy.refinement_figures: the worst picture, quantized chain vs FP32 from
# the same codes and noise) may be 6 dB below a single decoded image's gate: twice the error amplitude, for an error
# carried along the steps of the schedule. Measured on illume-nano (12 held-out pictures, 20 steps;
# nano/weights/quantized_eval.json, session 18): FP16 74.0 dB, BF16 53.3, FP8 41.0, INT8 TensorRT 29.1, INT8
# onnxruntime CPU 25.7; the INT8 onnxruntime CPU UNet calibrated on one picture instead of eight (session 11): 6.7.
REFINE_CHAIN_ALLOWANCE_DB = 6.0


def refine_psnr_limit(limits: dict) -> float:
    """The refinement chain's gate for a table of limits (given explicitly, or the decoded image's less the
    allowance)."""
    return limits.get("refine_psnr_db", limits["psnr_db"] - REFINE_CHAIN_ALLOWANCE_DB)


def thresholds_for(preset: str, precision: str, random_weights: bool) -> dict:
    table = THRESHOLDS.get(preset) or (THRESHOLDS["tiny"] if random_weights else THRESHOLDS["default"])
    limits = dict(table[precision])
    limits["refine_psnr_db"] = refine_psnr_limit(limits)
    return limits


# ---------------------------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------------------------
def weighted_nodes(model) -> tuple[list[str], list[str]]:
    """(names of weighted MatMul/Gemm/Conv nodes, names of MatMuls whose operands are both activations)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    weighted, activation_only = [], []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        if any(i in consts for i in node.input[:2]):
            weighted.append(node.name)
        else:
            activation_only.append(node.name)
    return weighted, activation_only


def boundary_convs(model) -> list[str]:
    """Names of the weighted Conv/ConvTranspose nodes at the graph's ends: those with no weighted node between a
    graph input and them (the first), and those with no weighted node between them and a graph output (the last).
    Found from the structure, so a re-export that renames nodes finds the same ones."""
    weighted = set(weighted_nodes(model)[0])
    nodes = list(model.graph.node)  # ONNX graphs are stored topologically sorted
    after_weighted: set[str] = set()  # tensors computed from some weighted node's output
    first = []
    for node in nodes:
        upstream = any(i in after_weighted for i in node.input)
        if node.name in weighted and not upstream and node.op_type in ("Conv", "ConvTranspose"):
            first.append(node.name)
        if upstream or node.name in weighted:
            after_weighted.update(node.output)
    before_weighted: set[str] = set()  # tensors feeding some weighted node
    last = []
    for node in reversed(nodes):
        downstream = any(o in before_weighted for o in node.output)
        if node.name in weighted and not downstream and node.op_type in ("Conv", "ConvTranspose"):
            last.append(node.name)
        if downstream or node.name in weighted:
            before_weighted.update(node.input)
    return sorted(set(first) | set(last))


def nodes_reading_dequantized(model) -> set[str]:
    """Names of the MatMul/Gemm/Conv nodes of a Q/DQ graph that read a DequantizeLinear output, directly or through
    the Cast AutoCast puts after it: the nodes that run quantized. Counted from the graph written, so a report
    cannot claim nodes the quantizer left in high precision."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in model.graph.node:  # topologically sorted, so a Cast comes after the DQ it reads
        if node.op_type == "Cast" and node.input[0] in dequantized:
            dequantized.update(node.output)
    return {n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and set(n.input) & dequantized}


def exact_name_patterns(names) -> list[str]:
    """``names`` as ModelOpt's ``nodes_to_exclude`` must receive them. ModelOpt (quantize and AutoCast) reads each
    entry as a regular expression matched at the start of a node name, so a bare "node_conv2d" also matches
    node_conv2d_1, node_conv2d_2, ...: it once kept every convolution of nano's UNet in FP16 (docs/quantization.md)."""
    return [f"^{re.escape(n)}$" for n in names]


def written_graph_report(model, planned: list[str]) -> dict:
    """What a quantizer wrote, read from the graph ``model``: how many weighted nodes run quantized, the ``planned``
    ones it left in high precision (reported, never claimed), its Q/DQ counts, opset and custom domains."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    runs_quantized = nodes_reading_dequantized(model)
    report: dict = {"quantized_nodes": len(runs_quantized)}
    left = sorted(set(planned) - runs_quantized)
    if left:
        report["planned_but_left_high_precision"] = left
    report.update({"qdq_nodes": counts,
                   "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                   "custom_domains": sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})})
    return report


def kept_nodes(recipe: Recipe, model) -> set[str]:
    """The weighted nodes ``recipe`` keeps in high precision in ``model``: its named ones, and the boundary
    convolutions where the recipe asks for them."""
    return set(recipe.exclude) | (set(boundary_convs(model)) if recipe.keep_boundary_convs else set())


def _ensure_names(model) -> None:
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _tensor_values(model_path: Path, tensors: list[str], feeds: list[dict], threads: int | None):
    """For each feed, the values of ``tensors`` (graph outputs added, run on onnxruntime CPU), in that order."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=t))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield session.run(tensors, {k: v for k, v in feed.items() if k in inputs})


def channel_max(model_path: Path, tensors: list[str], feeds: list[dict], threads: int | None) -> dict[str, np.ndarray]:
    """Per-last-axis max |x| of ``tensors`` over ``feeds``."""
    out: dict[str, np.ndarray] = {}
    for values in _tensor_values(model_path, tensors, feeds, threads):
        for name, v in zip(tensors, values):
            m = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0) if v.size else None
            if m is not None:
                out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def calibrated_tensors(model, exclude: set[str]) -> list[str]:
    """The activations onnxruntime's quantize_static calibrates for the quantized nodes: the inputs and outputs of
    every weighted node not in ``exclude`` that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and node.name not in exclude:
            for t in (*node.input, *node.output):
                if t and t not in inits:
                    out[t] = None
    return list(out)


def percentile_ranges(model_path: Path, tensors: list[str], feeds: list[dict], percentile: float,
                      threads: int | None) -> dict[str, tuple[float, float]]:
    """The range of each tensor over ``feeds``: its (100 - percentile)th and percentile-th percentiles over every
    value of every feed, widened to include 0 (asymmetric uint8 needs 0 exact). Holds each tensor's values until
    the end, as onnxruntime's own calibrators do: a graph held in memory (the streamed path does not take it)."""
    values: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for run in _tensor_values(model_path, tensors, feeds, threads):
        for name, v in zip(tensors, run):
            values[name].append(np.asarray(v, np.float32).ravel())
    ranges = {}
    for name, chunks in values.items():
        flat = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if not flat.size:
            continue
        lo, hi = np.percentile(flat, [100.0 - percentile, percentile])
        ranges[name] = (min(float(lo), 0.0), max(float(hi), 0.0))
        values[name] = []  # release as we go
    return ranges


def smoothquant(model_path: Path, out_path: Path, feeds: list[dict], alpha: float, threads: int | None) -> dict:
    """SmoothQuant on an ONNX graph: fold per-channel scales into the producer of each weighted MatMul group.

    Groups are MatMuls sharing one input tensor. Foldable producers: ``Mul(x, const)`` (the RMSNorm weight: the
    constant is divided by s) and ``Mul(a, b)`` with ``a`` the sole use of a weighted MatMul's output (its weight
    columns are divided by s: the SwiGLU up-projection feeding down_proj). Weights rows are multiplied by s.
    Returns a report (groups smoothed, skipped)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    groups: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            groups.setdefault(n.input[0], []).append(n)
    stats = channel_max(model_path, list(groups), feeds, threads)
    report = {"alpha": alpha, "smoothed": [], "skipped": []}
    new_arrays: dict[str, np.ndarray] = {}

    def arr(name):
        return new_arrays[name] if name in new_arrays else numpy_helper.to_array(inits[name]).copy()

    for tensor, nodes in groups.items():
        p = producer.get(tensor)
        fold = None
        if p is not None and p.op_type == "Mul":
            const = [i for i in p.input if i in inits and len(inits[i].dims) == 1]
            if const:
                name = const[0]
                if uses.get(name, 0) > 1:  # the exporter shares identical constants (e.g. all-ones norms): unshare
                    name = f"{const[0]}.smooth.{p.name}"
                    inits[name] = numpy_helper.from_array(arr(const[0]), name)
                    model.graph.initializer.append(inits[name])
                    inits[name] = model.graph.initializer[-1]  # protobuf appends a copy
                    p.input[list(p.input).index(const[0])] = name
                    uses[const[0]] -= 1
                    uses[name] = 1
                fold = ("norm", name)
            else:
                for i in p.input:
                    q = producer.get(i)
                    if (q is not None and q.op_type == "MatMul" and q.input[1] in inits and uses.get(i, 0) == 1
                            and uses.get(q.input[1], 0) == 1 and q.input[1] not in [n.input[1] for n in nodes]):
                        fold = ("columns", q.input[1])
                        break
        weights = [n.input[1] for n in nodes]
        if fold is None or tensor not in stats or any(uses.get(w, 0) != 1 for w in weights):
            report["skipped"].append([n.name for n in nodes])
            continue
        x_max = np.maximum(stats[tensor].astype(np.float64), 1e-5)
        w_max = np.maximum(np.max([np.abs(arr(w)).max(axis=1) for w in weights], axis=0).astype(np.float64), 1e-5)
        s = np.clip(x_max ** alpha / w_max ** (1 - alpha), 1e-2, 1e2)
        for w in weights:
            new_arrays[w] = (arr(w) * s[:, None]).astype(np.float32)
        if fold[0] == "norm":
            new_arrays[fold[1]] = (arr(fold[1]) / s).astype(np.float32)
        else:
            new_arrays[fold[1]] = (arr(fold[1]) / s[None, :]).astype(np.float32)
        report["smoothed"].append({"matmuls": [n.name for n in nodes], "fold": fold[0],
                                   "scale_range": [float(s.min()), float(s.max())]})
    for name, value in new_arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    onnx.save(model, str(out_path))
    return report


AUTOCAST_REFERENCE_FEEDS = 8  # calibration feeds AutoCast's reference run sees (its range checks)


def angle_nodes(model) -> list[str]:
    """Names of every Cos and Sin node and of every node they are computed from: the rotary embedding's angle
    (position x inverse frequency), the UNet's timestep embedding. AutoCast must keep them FP32 whatever its
    reference run saw. At position p the angle is about p radians, and BF16 spaces values 2 apart between 256 and
    512 (FP16: 0.25), so every query and key rotated past position ~256 is garbage. AutoCast keeps a node FP32 only
    where its reference run saw a value above ``data_max`` (512), i.e. only when the calibration prompts were that
    long: nano's byte-level prompts were and its BF16 LLM passed (worst cosine 0.99992); its BPE prompts are shorter,
    and the same recipe gave a worst cosine of 0.259 in BF16, 0.99916 in FP16 (session 29)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names, todo = set(), [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    while todo:
        node = todo.pop()
        if node.name in names:
            continue
        names.add(node.name)
        todo += [producer[i] for i in node.input if i in producer]
    return sorted(names)


def convert_float(recipe: Recipe, src: Path, dst: Path, feeds: list[dict], work: Path) -> dict:
    """FP16/BF16 by ModelOpt AutoCast; ``feeds`` (a few real inputs) drive its reference run. Returns what was
    done."""
    import logging

    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    for name in ("modelopt", "modelopt.onnx.autocast", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    graph = onnx.load(str(src), load_external_data=False)
    names = [i.name for i in graph.graph.input]
    reference = work / f"{recipe.component}.autocast-inputs"
    reference.mkdir(parents=True, exist_ok=True)
    step = max(1, len(feeds) // AUTOCAST_REFERENCE_FEEDS)
    used = feeds[::step][:AUTOCAST_REFERENCE_FEEDS]
    for i, feed in enumerate(used):
        np.savez(reference / f"{i:03d}.npz", **{k: np.asarray(feed[k]) for k in names})
    angles = angle_nodes(graph)
    with ort_quantization_state_kept():  # a ModelOpt call: see calibration/ort_state.py
        model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type=recipe.precision,
                                           keep_io_types=True, op_types_to_exclude=list(recipe.keep_fp32_ops),
                                           nodes_to_exclude=exact_name_patterns(angles),
                                           providers=["cpu"], calibration_data=str(reference) if used else None)
    del model.graph.value_info[:]
    onnx.save(model, str(dst))
    want = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[recipe.precision]
    low = {n.name for n in model.graph.node if n.op_type == "Cast"
           and any(a.name == "to" and a.i == want for a in n.attribute)}
    weights_low = sum(1 for i in model.graph.initializer if i.data_type == want)
    kept = sorted({n.op_type for n in model.graph.node if n.op_type in recipe.keep_fp32_ops})
    return {"tool": "modelopt.onnx.autocast.convert_to_mixed_precision", "low_precision_type": recipe.precision,
            "keep_io_types": True, "op_types_kept_fp32": kept, "casts_to_low_precision": len(low),
            "low_precision_initializers": weights_low, "nodes": len(model.graph.node), "qdq_nodes": {},
            "angle_nodes_kept_fp32": len(angles), "reference_feeds": len(used),
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "custom_domains": sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})}


def emulate_bf16(src: Path, dst: Path) -> Path:
    """A FP32 copy of a BF16 graph that onnxruntime CPU can run (it has no BF16 kernels), for the gates: every BF16
    tensor (node outputs, casts, initializers) is rounded to BF16 and carried as FP32 (a Cast to BF16 then back),
    and every op computes in FP32. So storage precision is exact; compute is FP32 (as TensorRT's BF16 GEMMs
    accumulate in FP32; elementwise ops round to BF16 on their output, as here)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bf16, fp32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}

    def up(tensor):
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)

    for init in g.initializer:
        if init.data_type == bf16:
            init.CopyFrom(up(init))
    nodes = []
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == bf16:
                attr.t.CopyFrom(up(attr.t))
        is_cast = node.op_type == "Cast" and any(a.name == "to" and a.i == bf16 for a in node.attribute)
        rounded = [i for i, o in enumerate(node.output) if o and (types.get(o) == bf16 or is_cast)]
        for i in rounded:
            node.output[i] = node.output[i] + ".bf16raw"
        nodes.append(node)
        for i in rounded:
            raw = node.output[i]
            out = raw.removesuffix(".bf16raw")
            if not is_cast:
                nodes.append(helper.make_node("Cast", [raw], [out + ".bf16"], to=bf16, name=out + ".round"))
                raw = out + ".bf16"
            nodes.append(helper.make_node("Cast", [raw], [out], to=fp32, name=out + ".up"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    for value in (*g.input, *g.output):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = fp32
    onnx.save(model, str(dst))
    return dst


class FeedReader:
    """An onnxruntime CalibrationDataReader over a list of feeds, with the extra methods modelopt uses."""

    def __init__(self, feeds: list[dict], input_names: list[str]) -> None:
        self.feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def get_first(self):
        return self.feeds[0]

    def rewind(self):
        self._it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def quantize_graph(recipe: Recipe, src: Path, dst: Path, feeds: list[dict], threads: int | None = None,
                   work: Path | None = None) -> dict:
    """Quantize one graph file ``src`` into ``dst`` following ``recipe``; returns what was done."""
    import logging
    import tempfile

    import onnx

    work = Path(work or tempfile.mkdtemp(prefix="illume-quant-"))
    if recipe.precision in FLOAT_PRECISIONS:
        return convert_float(recipe, src, dst, feeds, work)
    model = onnx.load(str(src))
    _ensure_names(model)
    named = work / f"{recipe.component}.named.onnx"
    onnx.save(model, str(named))
    input_names = [i.name for i in model.graph.input]
    weighted, activation_only = weighted_nodes(model)
    kept = kept_nodes(recipe, model)
    planned = [w for w in weighted if w not in kept]
    info: dict = {"kept_fp32_nodes": sorted(set(activation_only) | kept),
                  "calibration_samples": len(feeds)}
    graph = named
    if recipe.smoothquant_alpha is not None:
        graph = work / f"{recipe.component}.smooth.onnx"
        info["smoothquant"] = smoothquant(named, graph, feeds, recipe.smoothquant_alpha, threads)
    exclude = sorted(set(activation_only) | kept)
    if recipe.tool == "nvidia-modelopt":
        from modelopt.onnx.quantization import quantize as mo_quantize

        for name in ("modelopt", "root"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Q/DQ with FP32 high precision first; then the FP16/BF16 remainder by AutoCast with the calibration feeds
        # as its reference data (keeps norms, softmax and out-of-range nodes FP32; DQ nodes still feed their
        # MatMul/Conv directly, in the low precision). Measured on illume-nano INT8: modelopt's own
        # high_precision_dtype="fp16" conversion (no reference data) gave the LLM worst cosine 0.979 and answer
        # top-1 0.80 (gates missed); this two-step 0.992 and 1.00 (FP32 remainder: 0.992 and 1.00).
        fp32_qdq = work / f"{recipe.component}.qdq-fp32.onnx" if recipe.high_precision != "fp32" else dst
        # ModelOpt patches onnxruntime.quantization process-wide on each call; put it back after, so a later
        # ort-cpu quantize_static in this process gets onnxruntime's own (calibration/ort_state.py)
        with ort_quantization_state_kept():
            mo_quantize(str(graph), quantize_mode=recipe.precision,
                        calibration_data_reader=FeedReader(feeds, input_names),
                        calibration_method=recipe.calibration_method, calibration_eps=["cpu"],
                        op_types_to_quantize=[o for o in WEIGHTED_OPS
                                              if recipe.precision != "fp8" or o != "ConvTranspose"],
                        nodes_to_exclude=exact_name_patterns(exclude) or None, disable_mha_qdq=True,
                        high_precision_dtype="fp32", output_path=str(fp32_qdq), log_level="ERROR")
        if recipe.high_precision != "fp32":
            info["high_precision_conversion"] = convert_float(
                replace(recipe, precision=recipe.high_precision), fp32_qdq, dst, feeds, work)
    else:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        extra = {"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "CalibMovingAverage": False}
        if recipe.calibration_method == "Percentile":
            # our ranges replace the ones quantize_static's MinMax calibration computes (TensorQuantOverrides)
            tensors = calibrated_tensors(onnx.load(str(graph), load_external_data=False), set(exclude))
            ranges = percentile_ranges(graph, tensors, feeds, recipe.percentile, threads)
            extra["TensorQuantOverrides"] = {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                             for t, (lo, hi) in ranges.items()}
            info["percentile_ranges"] = len(ranges)
        quantize_static(str(graph), str(dst), FeedReader(feeds, input_names), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(WEIGHTED_OPS), nodes_to_exclude=exclude, per_channel=True,
                        reduce_range=REDUCE_RANGE,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    info.update(written_graph_report(onnx.load(str(dst), load_external_data=False), planned))
    return info
