"""illume-nano weights in the official checkpoint layout, and where they live in this package.

``weights/mllm/``: the MLLM as ``IllumeQwen2ForCausalLM.save_pretrained`` lays it out: ``config.json`` (``model_type``
illume_qwen2, Qwen2 fields, ``mm_hidden_size``, plus ``illume_rt_vocab``: the compact vocabulary layout, since the
nano text vocabulary is its own small BPE, not Qwen2.5's), ``model.safetensors`` (stock Qwen2 keys +
``model.vision_tower.semantic_encoder.*`` + ``model.vision_tower.pixel_encoder.*`` + ``model.mm_projector.*``) and
``tokenizer.json`` (nano's byte-level BPE, ``text_tokenizer.py``, then the ILLUME+ special tokens at the layout's
ids).

``weights/dualvitok/pytorch_model.bin``: the DualViTok state dict with official top-level names (the inference part
plus the training-only ``semantic_encoder.*`` / ``semantic_decoder.*``, which the loader ignores).

``weights/dualvitok_sdxl_decoder/``: the diffusion decoder as the official one is published (a diffusers pipeline
folder: ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``; see ``nano/decoder.py``).

All three load through ``illume_rt.export.checkpoints.load_reference_models`` like the released checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from illume_rt.nano import text_tokenizer

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
# The output sizes (height, width) the committed weights were trained to draw; the runtime prints a notice for
# any other (recorded in the bundle manifest as model.trained_resolutions).
TRAINED_RESOLUTIONS = ((256, 256),)


@dataclass(frozen=True)
class NanoWeights:
    """Where the files of one illume-nano weights folder are (the layout in the module docstring): the committed one
    (``COMMITTED``) or one that ``python -m illume_rt.nano.train --out DIR`` wrote."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))  # a str root too

    @property
    def is_committed(self) -> bool:
        return self.root.resolve() == WEIGHTS.resolve()

    @property
    def mllm(self) -> Path:
        return self.root / "mllm"

    @property
    def dualvitok(self) -> Path:
        return self.root / "dualvitok" / "pytorch_model.bin"

    @property
    def decoder(self) -> Path:
        return self.root / "dualvitok_sdxl_decoder"

    @property
    def sampling_file(self) -> Path:
        """The sampling a call gets when it passes none (manifest model.sampling_defaults; the official defaults
        otherwise), chosen on the training split by nano/choose_sampling.py, which writes this file (part of the
        weights' folder, so the built-in bundle's key covers it)."""
        return self.mllm / "illume_rt_sampling.json"

    @property
    def refine_file(self) -> Path:
        """The refinement a --refine call gets when it names none (manifest model.refine_defaults; the official
        defaults otherwise): the diffusion decoder's guidance, chosen by nano/choose_sampling.py, which writes this
        file beside the decoder it was measured on (so the built-in bundle's key covers it)."""
        return self.decoder / "illume_rt_refine.json"


COMMITTED = NanoWeights(WEIGHTS)


def decoder_digest(weights: NanoWeights = COMMITTED) -> str:
    """sha256 over the diffusion decoder's files (not the refine file): what a choice of refine defaults was
    measured on."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in weights.decoder.rglob("*") if p.is_file() and p != weights.refine_file):
        digest.update(path.relative_to(weights.decoder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def refine_defaults(weights: NanoWeights = COMMITTED) -> dict | None:
    """{field: value} from the refine file, or None (the official defaults) when it is absent, chose them, or was
    chosen for another decoder."""
    if not weights.refine_file.is_file():
        return None
    record = json.loads(weights.refine_file.read_text())
    if record.get("decoder_sha256") != decoder_digest(weights):
        return None
    return record.get("refine") or None


def weights_digest(weights: NanoWeights = COMMITTED) -> str:
    """sha256 of the MLLM weights: what a choice of sampling defaults was measured on."""
    import hashlib

    return hashlib.sha256((weights.mllm / "model.safetensors").read_bytes()).hexdigest()


def sampling_defaults(weights: NanoWeights = COMMITTED) -> dict | None:
    """{task: {field: value}} from the sampling file, or None (the official defaults) when it is absent, chose them,
    or was chosen for other weights (a retrained nano keeps the official defaults until choose_sampling reruns)."""
    if not weights.sampling_file.is_file():
        return None
    record = json.loads(weights.sampling_file.read_text())
    if record.get("weights_sha256") != weights_digest(weights):
        return None
    chosen = {task: record[task] for task in ("text_to_image", "editing") if record.get(task)}
    return chosen or None


def weight_files(weights: NanoWeights = COMMITTED) -> list[Path]:
    """Every file of the weights a built bundle depends on (the built-in bundle's key covers them)."""
    files = sorted(weights.mllm.iterdir()) + [weights.dualvitok]
    if weights.decoder.is_dir():
        files += sorted(p for p in weights.decoder.rglob("*") if p.is_file())
    return [f for f in files if f.is_file()]


def available(weights: NanoWeights = COMMITTED) -> bool:
    return (weights.mllm / "config.json").is_file() and weights.dualvitok.is_file()


def not_a_weights_folder(weights: NanoWeights) -> str:
    """The one line a command prints when ``weights`` is not ``available``."""
    return (f"{weights.root} is not an illume-nano weights folder (no mllm/config.json or dualvitok/pytorch_model.bin);"
            " pass the folder `python -m illume_rt.nano.train --out` wrote")


def load_models(weights: NanoWeights = COMMITTED):
    """An illume-nano weights folder (default: the committed one) as ``ReferenceModels``, through the
    official-checkpoint loaders."""
    from illume_rt.export.checkpoints import load_reference_models

    decoder = weights.decoder if (weights.decoder / "model_index.json").is_file() else None
    models = load_reference_models(weights.mllm, weights.dualvitok, decoder, base="nano")
    models.trained_resolutions = [list(r) for r in TRAINED_RESOLUTIONS]
    models.sampling_defaults = sampling_defaults(weights)
    models.refine_defaults = refine_defaults(weights) if decoder is not None else None
    return models


def mllm_config(preset, llm) -> dict:
    cfg = llm.config.to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "attention_dropout", "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")
    out = {k: cfg[k] for k in keep if k in cfg}
    out.update({
        "architectures": ["IllumeQwen2ForCausalLM"],
        "model_type": "illume_qwen2",
        "rope_theta": preset.llm.rope_theta,
        "torch_dtype": "float32",
        "mm_hidden_size": list(preset.projector_in_dims),
        "mm_vision_tower": {"type": "DualVisionTower"},
        "mm_projector": {"type": "MixedProjector", "projector_cfg1": {"type": "MLPProjector", "mlp_depth": 2},
                         "projector_cfg2": {"type": "MLPProjector", "mlp_depth": 2}},
        "mm_patch_merge_type": "flat",
        # Not in the released config: this checkpoint's compact vocabulary (byte text ids, then the ILLUME+
        # structure tokens and codes); see illume_rt.export.checkpoints.preset_from_mllm_config.
        "illume_rt_vocab": preset.vocab.to_dict(),
    })
    return out


def write_checkpoint(out: Path, preset, llm, projectors, semantic_encoder, semantic_decoder, pixel,
                     training: dict | None = None) -> None:
    """Write ``out/mllm/`` and ``out/dualvitok/pytorch_model.bin`` (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    from illume_rt.export.networks.vision import PROJECTOR_PREFIX, VISION_TOWER_PREFIX
    from illume_rt.export.checkpoints import PIXEL_ENCODER_PREFIX

    out = Path(out)
    (out / "mllm").mkdir(parents=True, exist_ok=True)
    (out / "dualvitok").mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in llm.state_dict().items()}
    state.update({VISION_TOWER_PREFIX + k: v for k, v in semantic_encoder.model.state_dict().items()})
    state.update({PIXEL_ENCODER_PREFIX + k: v for k, v in pixel.pixel_encoder.state_dict().items()})
    state.update({PROJECTOR_PREFIX + k: v for k, v in projectors.state_dict().items()})
    state = {k: v.detach().float().contiguous().clone() for k, v in state.items()}
    save_file(state, str(out / "mllm" / "model.safetensors"), metadata={"format": "pt"})
    (out / "mllm" / "model.safetensors").chmod(0o644)  # save_file creates it owner-only
    (out / "mllm" / "config.json").write_text(json.dumps(mllm_config(preset, llm), indent=2) + "\n")
    text_tokenizer.write(out / "mllm" / "tokenizer.json", preset.vocab)

    tok_state = {k: v.detach().float().contiguous().clone() for k, v in pixel.state_dict().items()}
    tok_state.update({"semantic_encoder." + k: v.detach().clone() for k, v in semantic_encoder.state_dict().items()})
    tok_state.update({"semantic_decoder." + k: v.detach().clone() for k, v in semantic_decoder.state_dict().items()})
    torch.save(tok_state, out / "dualvitok" / "pytorch_model.bin")
    if training is not None:
        (out / "training.json").write_text(json.dumps(training, indent=1) + "\n")


def write_decoder(out: Path, unet, vae, scaling_factor: float, scheduler_config: dict) -> None:
    """Write ``out`` as a diffusers pipeline folder in the official decoder's layout (``model_index.json``; unet, vae
    and scheduler subfolders). ``scaling_factor``: the VAE's, as training measured it (goes to vae/config.json)."""
    import diffusers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    scheduler.save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionXLDecoderPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", scheduler_config["_class_name"]]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for file in out.rglob("*"):
        if file.is_file():
            file.chmod(0o644)  # safetensors files are created owner-only
