"""Writing a bundle: every component exported and verified, tables saved, the manifest written last.

The bundle is assembled in a temporary sibling folder and renamed into place, so a crash never leaves a
half-written bundle that a later run would trust.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from illume_rt import __version__
from illume_rt.contract import BUNDLE_FORMAT_NAME, BUNDLE_FORMAT_VERSION, MANIFEST, host_contract, supported_resolutions
from illume_rt.export.components import Component, ExportError, export_onnx
from illume_rt.export.configs import Preset
from illume_rt.export.tokenizer_files import write_text_byte_tokenizer
from illume_rt.files import check_output_dir, publish_dir, scratch_dir, sha256_file


# What a sampled check (export/sampled.py) records besides the figures: the units it sampled (LLM ``layers``, ViT
# ``blocks``, LM-head ``rows`` ranges), the stored bytes it compared, a sentence saying what was sampled; or why a
# graph was not verified (``note``).
SAMPLED_KEYS = ("layers", "blocks", "rows", "bytes_compared", "sample", "note")


@dataclass
class ReferenceModels:
    """The PyTorch reference networks of one model (random or loaded from a checkpoint)."""

    preset: Preset
    llm: object  # transformers Qwen2ForCausalLM
    dualvitok: object  # DualViTokPixel: codebooks, pixel encoder and decoder
    random_weights: bool = True
    source: dict = field(default_factory=dict)  # checkpoint paths and hashes
    # (height, width) pairs the weights were trained at, when known (illume-nano): other sizes get a notice
    trained_resolutions: list | None = None
    # {task: {sampling field: value}} the model's own sampling defaults, when it declares them (illume-nano)
    sampling_defaults: dict | None = None
    # {field: value} the model's own refinement defaults (its diffusion decoder's guidance), when declared
    refine_defaults: dict | None = None
    # Filled by the checkpoint loaders (export/checkpoints.py); None for the random-weight presets.
    vision_tower: object = None  # Qwen2VisionTransformer (the MLLM's fine-tuned semantic ViT + merger)
    projectors: object = None  # Projectors (projector_1 semantic, projector_2 pixel)
    pixel_encoder: object = None  # MoVQEncoder from the MLLM (fine-tuned; dualvitok.pixel_encoder is the tokenizer's)
    unet: object = None  # diffusers UNet2DConditionModel of the diffusion decoder
    vae: object = None  # diffusers AutoencoderKL of the diffusion decoder


def build_reference_models(preset: Preset, with_diffusion: bool = True) -> ReferenceModels:
    """Random-weight reference networks for a preset, deterministic from its seed.

    The MLLM's pixel encoder is the tokenizer's own module here (the released MLLM carries a fine-tuned copy,
    which the checkpoint loader keeps apart)."""
    from illume_rt.export.llm import build_llm
    from illume_rt.export.networks.dualvitok import build_dualvitok_pixel
    from illume_rt.export.networks.vision import build_projectors, build_vision_tower

    dualvitok = build_dualvitok_pixel(preset)
    models = ReferenceModels(preset, build_llm(preset), dualvitok, vision_tower=build_vision_tower(preset),
                             projectors=build_projectors(preset), pixel_encoder=dualvitok.pixel_encoder)
    if with_diffusion and preset.diffusion.unet:
        from illume_rt.export.networks.diffusion import build_diffusion

        models.unet, models.vae = build_diffusion(preset)
    return models


def components_for(models: ReferenceModels) -> list[Component]:
    """Every graph the models allow: generation always; understanding/editing encoders and the diffusion decoder
    when their networks are present."""
    from illume_rt.export.llm import HEAD_RANGES, head_component, llm_component
    from illume_rt.export.multimodal import pixel_embedder_component, token_map_component
    from illume_rt.export.networks.dualvitok import pixel_decoder_component

    preset = models.preset
    if models.dualvitok is None:
        raise ExportError("a bundle needs the DualViTok tokenizer (pixel decoder and codebooks); "
                          "pass --tokenizer-checkpoint")
    comps = [llm_component(preset, models.llm)]
    comps += [head_component(preset, models.llm, which) for which in HEAD_RANGES]
    comps.append(pixel_decoder_component(preset, models.dualvitok))
    if models.vision_tower is not None and models.projectors is not None:
        from illume_rt.export.networks.vision import vision_tower_component

        comps.append(vision_tower_component(preset, models.vision_tower, models.projectors))
        comps.append(pixel_embedder_component(preset, models.pixel_encoder, models.projectors.pixel_projector))
    if models.unet is not None and models.vae is not None:
        from illume_rt.export.networks.diffusion import unet_component, vae_decoder_component

        comps.append(token_map_component(preset, models.dualvitok))
        comps += [unet_component(preset, models.unet), vae_decoder_component(preset, models.vae)]
    return comps


def tables_for(models: ReferenceModels) -> Iterator[tuple[str, np.ndarray]]:
    """(name, table) one at a time, read when asked: the embedding table of a lazy (checkpoint) model is the
    largest single tensor export holds (2.3 GB in the 3B)."""
    from illume_rt.export import streaming
    from illume_rt.export.networks.dualvitok import effective_codebooks

    tables = effective_codebooks(models.dualvitok)
    yield "embed_tokens", streaming.real(models.llm.get_input_embeddings().weight).float().numpy()
    yield "semantic_codebook", tables["semantic"]
    yield "pixel_codebook", tables["pixel"]


def _file_entry(path: Path, root: Path) -> dict:
    return {"file": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _peak_rss() -> str:
    """'  peak RSS x.x GB' of this process so far (Linux reports ru_maxrss in KiB), or '' where unknown."""
    try:
        import resource

        return f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.1f} GB"
    except (ImportError, OSError):
        return ""


def write_bundle(models: ReferenceModels, out_dir: str | Path, log: Callable[[str], None] = print,
                 overwrite: bool = False, weight_dtype: str = "fp32", model_info: dict | None = None) -> Path:
    """Export every component of ``models`` into a new bundle at ``out_dir``: a missing or empty folder, or (with
    ``overwrite``) a bundle, replaced atomically; anything else is refused before any work (illume_rt/files.py).

    Every graph goes through the streaming exporter (export/streaming.py): its weights are written one tensor at a
    time, stored as ``weight_dtype`` (fp32, fp16 or bf16; 16-bit weights are cast to float32 inside the graph).
    ``model_info``: extra fields of the manifest's ``model`` entry (the built-in model's key)."""
    out_dir = check_output_dir(out_dir, overwrite)
    preset = models.preset
    tokenizer_file = models.source.get("tokenizer_file")
    needs_tokenizer_file = preset.vocab.text_vocab_size != 256
    if needs_tokenizer_file and not tokenizer_file and not models.random_weights:  # before minutes of export
        raise ExportError("this vocabulary needs a tokenizer.json; pass --checkpoint with the MLLM folder")
    work = scratch_dir(out_dir)
    try:
        manifest: dict = {
            "format": BUNDLE_FORMAT_NAME,
            "format_version": BUNDLE_FORMAT_VERSION,
            "created_by": f"illume-rt {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"preset": preset.name, "random_weights": models.random_weights, "seed": preset.seed,
                      "source": models.source, "config": preset.to_dict(),
                      "trained_resolutions": ([list(r) for r in models.trained_resolutions]
                                              if models.trained_resolutions else None),
                      **({"sampling_defaults": models.sampling_defaults} if models.sampling_defaults else {}),
                      **({"refine_defaults": models.refine_defaults} if models.refine_defaults else {}),
                      **(model_info or {})},
            "export": {"exporter": "streaming: structure traced on fake tensors, weights written one tensor at a "
                                   "time (export/streaming.py)", "weight_dtype": weight_dtype},
            "vocab": preset.vocab.to_dict(),
            "contract": host_contract(preset.vocab),  # the grammar, prompts, grids, preprocessing (format 3 on)
            "resolutions": [list(r) for r in supported_resolutions()],
            "llm": {
                "num_hidden_layers": preset.llm.num_hidden_layers,
                "num_key_value_heads": preset.llm.num_key_value_heads,
                "head_dim": preset.llm.head_dim,
                "hidden_size": preset.llm.hidden_size,
                "max_context": preset.llm.max_position_embeddings,
                "kv_dtype": "float32",
            },
            "diffusion": {"scheduler": preset.diffusion.scheduler} if models.unet is not None else None,
            "tokenizer": {"kind": "hf", "file": "tokenizer.json"} if needs_tokenizer_file else {"kind": "bytes"},
            "components": {},
            "tables": {},
            "files": {},
        }
        for comp in components_for(models):
            t0 = time.perf_counter()
            path = work / f"{comp.name}.onnx"
            report = export_onnx(comp, comp.build_module(), path, seed=preset.seed, storage=weight_dtype)
            entry = comp.manifest_entry()
            entry.update(_file_entry(path, work))
            for data in report.get("external_data", []):  # weights of a graph over 2 GiB, beside it
                entry["external_data"] = data
                manifest["files"][f"{comp.name}_external_data"] = _file_entry(work / data, work)
            entry["precision"] = "fp32"  # arithmetic, inputs and outputs
            entry["weight_dtype"] = weight_dtype  # as stored; 16-bit weights are cast to float32 in the graph
            entry["accuracy"] = {"reference": "pytorch fp32" + (f", weights rounded to {weight_dtype}"
                                                                 if weight_dtype != "fp32" else ""),
                                 **{k: report[k] for k in ("method", "worst_cosine", "worst_max_abs_err", "cases")},
                                 **{k: report[k] for k in SAMPLED_KEYS if k in report}}
            manifest["components"][comp.name] = entry
            if report["worst_cosine"] is None:
                log(f"exported {comp.name:<18} not verified ({report.get('note', '')})  "
                    f"{time.perf_counter() - t0:.1f}s{_peak_rss()}")
            else:
                sampled = "".join(f" ({k} {report[k]})" for k in ("layers", "blocks", "rows") if k in report)
                log(f"exported {comp.name:<18} cos {report['worst_cosine']:.8f}  max|err| "
                    f"{report['worst_max_abs_err']:.2e}{sampled}  {time.perf_counter() - t0:.1f}s{_peak_rss()}")
        for name, table in tables_for(models):
            path = work / f"{name}.npy"
            np.save(path, np.ascontiguousarray(table))
            manifest["tables"][name] = {**_file_entry(path, work), "dtype": str(table.dtype),
                                        "shape": list(table.shape)}
            del table
        if needs_tokenizer_file:
            if tokenizer_file:
                shutil.copyfile(tokenizer_file, work / "tokenizer.json")
            else:  # random weights with the official layout: no real tokenizer belongs to them
                write_text_byte_tokenizer(work / "tokenizer.json")
                manifest["model"]["source"] = {**manifest["model"]["source"],
                                               "tokenizer_file": "byte-level stand-in (random weights)"}
            manifest["files"]["tokenizer"] = _file_entry(work / "tokenizer.json", work)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return publish_dir(work, out_dir, overwrite)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
