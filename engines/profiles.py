"""Optimization profiles for engine builders, derived from the manifest's component profiles, and the logic that
picks a profile and sizes device buffers at run time. Pure Python: tested without TensorRT.

The manifest gives, per component, each symbolic dim's ``[min, opt, max]`` (from the component descriptors of
``illume_rt.export``). Most components get one profile straight from it. The LLM body gets two, because one
profile cannot be good for both phases: TensorRT picks kernels for the ``opt`` shape.

- ``prefill``: ``seq`` from 1 to the context, ``past`` from 0 up (prefill is ``past = 0``; long forced runs and
  spliced image features later in a conversation also land here), opt at a typical prompt.
- ``decode``: ``seq`` 1..DECODE_MAX_SEQ (one sampled token plus the forced structural tokens that follow it: at
  most 4 in text to image), ``past`` (the cache's whole capacity: decode steps pass all of it, masked) up to the
  context, opt at the manifest's ``past`` opt.

  A verify step of parallel decoding (a window of drafted codes and the structure tokens between them) is a decode
  call of up to DECODE_MAX_SEQ positions.

- ``batch_prefill``: the prompts of several images in one batch (up to 2 x MAX_IMAGES rows, prompts up to
  BATCH_PREFILL_MAX_SEQ positions).

Batch ranges: the manifest's (1..2: the guidance rows ride in one batch) for ``prefill``; ``decode`` and
``batch_prefill`` up to 2 x MAX_IMAGES rows (several images in one batch); the heads up to that times
DECODE_MAX_SEQ (a verify step scores every position of its window in one head call).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from illume_rt.contract import (DECODE_MAX_SEQ, GRAPH_IO, HEADS, HIDDEN, MAX_IMAGES, decode_plan, head_component,
                                image_grid)
from illume_rt.errors import IllumeError

MAX_BODY_ROWS = 2 * MAX_IMAGES  # a guided batch of the most images a request may ask for
BATCH_PREFILL_MAX_SEQ = 512  # the longest prompt (with the image prefix) of a batch of several images
HEAD_COMPONENTS = frozenset(head_component(which) for which in HEADS)
GRAPH_STEP_SEQ = 4  # fixed step width of the CUDA-graph decode path (see engines/decode_graph.py)
PREFILL_OPT_SEQ = 128

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1,
               "bool": 1, "float8_e4m3fn": 1}


class ProfileError(IllumeError, ValueError):
    """A shape no profile of an engine covers; the message names the fix."""


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict  # name -> (tuple, tuple, tuple)

    def covers(self, shapes: dict) -> bool:
        for name, shape in shapes.items():
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        return True

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(v) for v in t] for k, t in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        return cls(data["name"], {k: tuple(tuple(v) for v in t) for k, t in data["shapes"].items()})


def _resolve(shape: list, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else int(dims[d]) for d in shape)


def _profile(name: str, entry: dict, ranges: dict[str, tuple[int, int, int]]) -> Profile:
    shapes = {}
    for spec in entry["inputs"]:
        shapes[spec["name"]] = tuple(_resolve(spec["shape"], {d: r[i] for d, r in ranges.items()})
                                     for i in range(3))
    return Profile(name, shapes)


def _check_ranges(component: str, ranges: dict) -> None:
    for dim, (lo, opt, hi) in ranges.items():
        if not 0 <= lo <= opt <= hi:
            raise ProfileError(f"{component}: profile of dim {dim!r} is not min <= opt <= max: {[lo, opt, hi]}; "
                               "re-export the bundle")


def engine_profiles(name: str, entry: dict) -> list[Profile]:
    """The optimization profiles an engine of manifest component ``name`` is built with."""
    base = {d: tuple(int(x) for x in v) for d, v in entry.get("profiles", {}).items()}
    symbolic = {d for spec in entry["inputs"] for d in spec["shape"] if isinstance(d, str)}
    missing = symbolic - set(base)
    if missing:
        raise ProfileError(f"{name}: manifest gives no profile for dims {sorted(missing)}; re-export the bundle")
    _check_ranges(name, base)
    if name in HEAD_COMPONENTS and "batch" in base:
        lo, opt, hi = base["batch"]
        base["batch"] = (lo, opt, max(hi, MAX_BODY_ROWS * DECODE_MAX_SEQ))
    if name != "llm":
        return [_profile("default", entry, base)]
    ctx = base["total"][2]
    batch = base["batch"]
    wide = (batch[0], batch[1], max(batch[2], MAX_BODY_ROWS))
    past_opt = min(base["past"][1], ctx - 1)
    prefill_opt = min(PREFILL_OPT_SEQ, ctx)
    prefill = {"batch": batch, "seq": (1, prefill_opt, ctx), "past": (0, 0, ctx - 1), "total": (1, prefill_opt, ctx)}
    decode_max = min(DECODE_MAX_SEQ, ctx)
    decode = {"batch": wide, "seq": (1, 1, decode_max), "past": (0, past_opt, ctx),
              "total": (1, past_opt + 1, ctx + decode_max)}
    # several images' prompts in one prefill: wide batches of prompt-length runs only, so that the engine's
    # max-shape activations stay those of a prompt, not of 16 rows of the whole context
    prompts_max = min(BATCH_PREFILL_MAX_SEQ, ctx)
    batch_prefill = {"batch": wide, "seq": (1, min(prefill_opt, prompts_max), prompts_max),
                     "past": (0, 0, 0), "total": (1, min(prefill_opt, prompts_max), prompts_max)}
    for ranges in (prefill, decode, batch_prefill):
        _check_ranges(name, ranges)
    return [_profile("prefill", entry, prefill), _profile("decode", entry, decode),
            _profile("batch_prefill", entry, batch_prefill)]


def select_profile(profiles: list[Profile], shapes: dict, prefer: str | None = None) -> int:
    """Index of the profile covering ``shapes`` (``prefer`` first), or a ProfileError naming the fix."""
    order = sorted(range(len(profiles)), key=lambda i: profiles[i].name != prefer)
    for index in order:
        if profiles[index].covers(shapes):
            return index
    ranges = "; ".join(f"{p.name}: " + ", ".join(f"{k} {list(v[0])}..{list(v[2])}" for k, v in p.shapes.items())
                       for p in profiles)
    asked = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    raise ProfileError(f"no optimization profile covers {asked} ({ranges}); rebuild the engines with "
                       "`illume-rt build-engines BUNDLE` after widening the component's profile at export")


def max_shape(profiles: list[Profile], name: str) -> tuple[int, ...]:
    """Elementwise max over the profiles' max shapes of one input."""
    shapes = [p.shapes[name][2] for p in profiles]
    return tuple(max(s[i] for s in shapes) for i in range(len(shapes[0])))


def nbytes(shape, dtype: str) -> int:
    return int(prod(shape)) * DTYPE_BYTES[str(np.dtype(dtype)) if dtype not in DTYPE_BYTES else dtype]


def output_max_shape(entry: dict, output: str, profiles: list[Profile]) -> tuple[int, ...] | None:
    """Largest shape an output can take: its symbolic dims at the largest value any input profile gives them;
    None when an output dim is named by no input (the image size of a decoder): such buffers are sized at run time
    from the engine's output shape and grown when a larger one comes."""
    spec = next(o for o in entry["outputs"] if o["name"] == output)
    biggest: dict[str, int] = {}
    for spec_in in entry["inputs"]:
        top = max_shape(profiles, spec_in["name"])
        for dim, value in zip(spec_in["shape"], top):
            if isinstance(dim, str):
                biggest[dim] = max(biggest.get(dim, 0), value)
    unknown = [d for d in spec["shape"] if isinstance(d, str) and d not in biggest]
    if unknown:
        return None
    return _resolve(spec["shape"], biggest)


def io_buffer_bytes(entry: dict, profiles: list[Profile],
                    caps: dict[str, int] | None = None) -> dict[str, int | None]:
    """Bytes to allocate once per input/output so that every covered shape fits. ``caps`` bounds symbolic dims
    (e.g. the runtime's real context need), since the LLM's ``max`` can be far larger than a request needs."""
    caps = caps or {}
    sizes = {}
    for spec in entry["inputs"]:
        shape = list(max_shape(profiles, spec["name"]))
        for i, d in enumerate(spec["shape"]):
            if isinstance(d, str) and d in caps:
                shape[i] = min(shape[i], caps[d])
        sizes[spec["name"]] = nbytes(shape, spec["dtype"])
    for spec in entry["outputs"]:
        top = output_max_shape(entry, spec["name"], profiles)
        if top is None:
            sizes[spec["name"]] = None
            continue
        shape = list(top)
        for i, d in enumerate(spec["shape"]):
            if isinstance(d, str) and d in caps:
                shape[i] = min(shape[i], caps[d])
        sizes[spec["name"]] = nbytes(shape, spec["dtype"])
    return sizes


def kv_cache_bytes(capacity: int, llm: dict, batch: int) -> int:
    """Device bytes of one KV cache [layers, 2, batch, kv_heads, capacity, head_dim]."""
    shape = (llm["num_hidden_layers"], 2, batch, llm["num_key_value_heads"], capacity, llm["head_dim"])
    return nbytes(shape, llm.get("kv_dtype", "float32"))


def llm_shapes(entry: dict, batch: int, seq: int, past: int) -> dict[str, tuple[int, ...]]:
    """Input shapes of one LLM call."""
    dims = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    return {spec["name"]: _resolve(spec["shape"], dims) for spec in entry["inputs"]}


def runtime_requests(manifest: dict, prompt_lengths: list[int], guidance: tuple[bool, ...] = (True, False)):
    """Every (component, input shapes) the text-to-image loop asks for, over all supported resolutions and the given
    prompt lengths (the longer of the cond/uncond rows), read off ``contract.decode_plan`` as the loop walks it: one
    prefill of prompt + forced prefix, then per code a body call over the cache's whole capacity that feeds the
    previous code and the forced tokens since (none before the first code), then the pixel decoder once; and the
    widest verify step of parallel decoding, for one image and for MAX_IMAGES in one batch."""
    comps = manifest["components"]
    for height, width in manifest["resolutions"]:
        grid = image_grid(height, width)
        plan = decode_plan(grid)
        for prompt in prompt_lengths:
            for guided in guidance:
                batch = 2 if guided else 1
                capacity = prompt + grid.num_tokens
                yield "llm", "prefill", llm_shapes(comps["llm"], batch, prompt + len(plan.prefix), 0)
                for index, step in enumerate(plan.steps):
                    width_fed = (1 if index else 0) + len(step.forced)
                    if width_fed:
                        yield "llm", "decode", llm_shapes(comps["llm"], batch, width_fed, capacity)
                    for head in (head_component("semantic"), head_component("pixel")):
                        if head in comps:
                            yield head, None, {HIDDEN: (batch, manifest["llm"]["hidden_size"])}
                # several images in one batch: their prompts in one prefill
                yield "llm", "prefill", llm_shapes(comps["llm"], batch * MAX_IMAGES, prompt + len(plan.prefix), 0)
                # the widest calls: a verify step of parallel decoding, for one image and for the largest batch
                for rows in (batch, batch * MAX_IMAGES):
                    yield "llm", "decode", llm_shapes(comps["llm"], rows, DECODE_MAX_SEQ, capacity)
                    for head in (head_component("semantic"), head_component("pixel")):
                        if head in comps:
                            yield head, None, {HIDDEN: (rows * DECODE_MAX_SEQ, manifest["llm"]["hidden_size"])}
        if "pixel_decoder" in comps:
            dim = comps["pixel_decoder"]["inputs"][0]["shape"][1]
            semantic_embed, pixel_embed = GRAPH_IO["pixel_decoder"][0]
            yield "pixel_decoder", None, {
                semantic_embed: (1, dim, grid.semantic_rows, grid.semantic_cols),
                pixel_embed: (1, dim, grid.pixel_rows, grid.pixel_cols)}


def uncovered_requests(manifest: dict, prompt_lengths: list[int]) -> list[str]:
    """Requests of ``runtime_requests`` that no engine profile covers (empty when all are)."""
    profiles = {name: engine_profiles(name, entry) for name, entry in manifest["components"].items()}
    missing, seen = [], set()
    for comp, phase, shapes in runtime_requests(manifest, prompt_lengths):
        key = (comp, tuple(sorted(shapes.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            select_profile(profiles[comp], shapes, prefer=phase)
        except ProfileError:
            missing.append(f"{comp} ({phase or 'default'}): {shapes}")
    return missing
