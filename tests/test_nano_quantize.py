"""Quantizing illume-nano: calibration in nano's grammar (training scenes only), the per-attribute prompt scorer, and
the prompt gate (no attribute may lose more than accuracy.MAX_PROMPT_ACCURACY_DROP against FP32).

The measured figures of every precision are in nano/weights/quantized_eval.json (python -m
illume_rt.nano.quantized_eval); here the plumbing and the gates, on the nano bundle, in about three minutes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import TEST_THREADS

from illume_rt.calibration import accuracy, datasets
from illume_rt.nano import data, heldout

FP32 = {"background": 0.90, "position": 0.80, "colour": 0.80, "shape": 0.50, "size": 0.50, "answers": 0.85}


def _manifest_model(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["model"]


def _held_out_captions() -> set[str]:
    return {c for s in data.split()[1] for c in (s.caption, s.short_caption)}


@pytest.mark.runtime
def test_gate_fails_on_one_attribute_while_the_mean_holds():
    # colour loses 5 points, every other figure gains 2: the mean does not drop, the gate must still fail
    quantized = {k: v + 0.02 for k, v in FP32.items()}
    quantized["colour"] = FP32["colour"] - 0.05
    assert np.mean(list(quantized.values())) >= np.mean(list(FP32.values()))
    fails = accuracy.prompt_gate("nano", FP32, quantized)
    assert len(fails) == 1 and "colour" in fails[0], fails
    # exactly the allowed drop passes (0.90 - 0.87 is 0.030000000000000027 in binary), a little more does not
    at_limit = {k: v - accuracy.MAX_PROMPT_ACCURACY_DROP for k, v in FP32.items()}
    assert accuracy.prompt_gate("nano", FP32, at_limit) == []
    over = dict(at_limit, size=FP32["size"] - accuracy.MAX_PROMPT_ACCURACY_DROP - 0.01)
    assert ["size" in f for f in accuracy.prompt_gate("nano", FP32, over)] == [True]
    # a figure the quantized run lacks fails; an informational one ("all") is not gated
    assert "answers" in accuracy.prompt_gate("nano", FP32, {k: v for k, v in FP32.items() if k != "answers"})[0]
    assert accuracy.prompt_gate("nano", {**FP32, "all": 0.3}, {**FP32, "all": 0.1}, ("all",)) == []
    # the old one-float scorers still work, as one figure
    assert accuracy.score_prompts(lambda pipe: 0.5, None) == {"accuracy": 0.5}


@pytest.mark.runtime
def test_nano_bundle_calibrates_in_its_grammar_on_training_scenes_only(nano_bundle):
    model = _manifest_model(nano_bundle)
    held = _held_out_captions()
    scored = {p for p, _ in heldout.eval_prompts()}  # what the prompt scorer asks
    pool = datasets.nano_scenes("nano-train")  # every scene calibration may draw from
    assert pool and not {c for sc in pool for c in (sc.caption, sc.short_caption)} & held
    cal = datasets.plan_for(model, "calibration")
    assert cal.images == "nano-train" and cal.generate and cal.understand
    # the UNet is calibrated on every caption's refinement and every timestep a user runs (the official 20 steps);
    # the end-to-end check refines held-out captions that are neither calibrated on nor measured by the graph gates
    from illume_rt.runtime.refine import OFFICIAL_REFINE

    evaluation = ev = datasets.plan_for(model, "evaluation")  # the graph figures: held-out scenes
    assert cal.refine == list(range(len(cal.generate))) and evaluation.refine == [0]
    assert cal.refine_steps == evaluation.refine_steps == OFFICIAL_REFINE.steps
    checked = {p for p, _, _ in evaluation.refine_checks}
    assert len(checked) == datasets.NANO_REFINE_CHECKS and checked <= held
    assert not checked & {p for p, _, _ in evaluation.generate}
    for prompt, resolution, _ in cal.generate:
        assert data.attributes_of_caption(prompt) is not None, prompt  # nano's grammar, not the generic prompts
        assert prompt not in held and prompt not in scored, prompt
        assert list(resolution) in model["trained_resolutions"]
    # every (shape colour, background) pair is drawn: a VAE's latent range depends on it (blue on gray: 3x the others)
    asked = [data.attributes_of_caption(prompt) for prompt, _, _ in cal.generate]
    every_pair = {(c, b) for c in data.COLOURS for b in data.BACKGROUNDS if c != b}
    assert {(a["colour"], a["background"]) for a in asked} == every_pair
    for attribute in ("shape", "position"):
        assert {a[attribute] for a in asked} == set(getattr(data, attribute.upper() + "S")), attribute
    assert {a["size"] for a in asked if "size" in a} == set(data.SIZES)
    # the VAE decoder's extra latents: with the full captions above, every (colour, background, size) once, drawn
    # from training scenes in the full form (the size sets the latent's range as much as the pair: session 36)
    full = [data.scene_from_caption(p) for p, _, _ in cal.generate if "size" in data.attributes_of_caption(p)]
    extra = [data.scene_from_caption(p) for p, _, _ in cal.vae_only_refine]
    assert extra and None not in extra and not {s.caption for s in extra} & held
    keys = [(s.colour, s.background, s.size) for s in full + extra]
    assert sorted(set(keys)) == sorted((c, b, z) for c, b in every_pair for z in data.SIZES)
    assert len({(s.colour, s.background, s.size) for s in extra}) == len(extra)  # none drawn twice
    assert all(list(r) in model["trained_resolutions"] for _, r, _ in cal.vae_only_refine)
    assert not {seed for *_, seed in cal.vae_only_refine} & {seed for *_, seed in cal.generate}
    assert ev.vae_only_refine == []  # calibration only
    pictures = datasets.plan_images(cal)
    assert len(pictures) >= len(cal.understand)
    for name in pictures:  # "nano-train/<size>/<caption>": renders of training scenes
        caption = name.split("/", 2)[2]
        assert data.scene_from_caption(caption) is not None and caption not in held, name
    assert set(data.QUESTIONS) >= {q for _, q in cal.understand}
    assert ev.images == "nano-held" and all(p in held for p, _, _ in ev.generate)


@pytest.mark.runtime
def test_other_bundles_keep_the_generic_plan_and_no_model_scorer():
    for model in ({"preset": "tiny", "random_weights": True}, {"preset": "3b"}, {}):
        assert datasets.plan_for(model, "calibration") == datasets.default_plan("calibration")
        assert datasets.plan_for(model, "evaluation") == datasets.default_plan("evaluation")
        assert accuracy.model_scorers(model) == {}
    assert list(accuracy.model_scorers({"preset": "nano"})) == ["nano"]


class _Bundle:
    def __init__(self, path):
        self.path = path


class _Drawer:
    """A stand-in pipeline that draws each prompt's scene, with the colour of the object replaced by ``colour``
    (None: the asked one), and answers every question right."""

    def __init__(self, path, colour=None):
        self.bundle, self.colour = _Bundle(path), colour

    def default_sampling(self, task):
        from illume_rt.runtime.options import OFFICIAL_SAMPLING

        return OFFICIAL_SAMPLING[task]

    def generate(self, prompt, resolution, seed, sampling):
        from types import SimpleNamespace

        assert sampling.greedy  # the scorer draws greedy, at the model's own guidance
        asked = data.attributes_of_caption(prompt)
        scene = data.Scene(asked["shape"], self.colour or asked["colour"], asked.get("size", "large"),
                           asked["position"], asked["background"])
        return SimpleNamespace(image=data.render(scene), tokens=SimpleNamespace(semantic=None, pixel=None))

    def understand(self, image, question, max_new_tokens):
        from types import SimpleNamespace

        scene = next(s for s in data.split()[1] if np.array_equal(np.asarray(image), data.render(s)))
        return SimpleNamespace(text=dict(scene.qa())[question])


@pytest.mark.runtime
def test_nano_scorer_reads_each_attribute_from_the_pictures(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    scorer = heldout.PromptScorer(prompt_limit=6, question_limit=5)
    right = scorer(_Drawer(tmp_path))
    assert set(right) == {*heldout.SCORED, "all"} and all(v == 1.0 for v in right.values()), right
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    red = scorer(_Drawer(other, colour="red"))  # every object red: only colour (and so 'all') can be wrong
    wanted_red = np.mean([w["colour"] == "red" for _, w in heldout.eval_prompts(6)])
    assert red["colour"] == pytest.approx(wanted_red) and red["colour"] < 1.0
    assert all(red[k] == 1.0 for k in ("background", "position", "shape", "size", "answers"))


@pytest.mark.runtime
def test_the_nano_gate_scores_every_scene_of_the_grammar_and_the_held_out_questions(tmp_path):
    """quantize's scorer for a nano bundle draws the full caption of all 450 scenes (a loss, not generalisation,
    is measured there, and 45 held-out pictures are too few: nano/heldout.py GATE_SPLIT) and asks the held-out
    questions; what it reads from the pictures is the scene each caption names."""
    gate = accuracy.model_scorers({"preset": "nano"})["nano"]
    described = gate.describe()
    assert described["split"] == "grammar" and described["question_split"] == "held"
    assert described["prompts"] == len(data.all_scenes()) == 450
    assert described["questions"] == len(heldout.eval_questions()) == 225
    prompts = heldout.eval_prompts(which="grammar")
    assert [p for p, _ in prompts] == [s.caption for s in data.all_scenes()]
    assert all(set(wanted) == set(data.ATTRIBUTES) for _, wanted in prompts)
    (tmp_path / "manifest.json").write_text("{}")
    few = heldout.PromptScorer(prompt_limit=8, question_limit=3, which="grammar")
    assert few(_Drawer(tmp_path)) == {**{k: 1.0 for k in heldout.SCORED}, "all": 1.0}


def test_refinement_is_scored_with_the_tokenizer_the_bundle_was_exported_from(nano_bundle, tmp_path):
    from illume_rt.files import sha256_file
    from illume_rt.nano.checkpoint import COMMITTED
    from illume_rt.nano.decoder import bundle_tokenizer

    assert bundle_tokenizer(nano_bundle) == COMMITTED.dualvitok
    manifest = json.loads((nano_bundle / "manifest.json").read_text())
    source = manifest["model"]["source"]["dualvitok"]
    # retrained weights, exported elsewhere: the manifest names their file and its hash, not the committed one's
    retrained = tmp_path / "retrained" / COMMITTED.dualvitok.name
    retrained.parent.mkdir()
    retrained.write_bytes(COMMITTED.dualvitok.read_bytes() + b"another training run")
    source["path"] = str(retrained)
    source["files"][COMMITTED.dualvitok.name]["sha256"] = sha256_file(retrained)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert bundle_tokenizer(bundle) == retrained
    retrained.write_bytes(b"changed since the export")  # the committed file is not a stand-in: other hash
    assert bundle_tokenizer(bundle) is None


@pytest.mark.runtime
def test_nano_prompt_scoring_imports_without_torch():
    code = ("import sys; from illume_rt.calibration import accuracy, datasets; "
            "accuracy.model_scorers({'preset': 'nano'}); datasets.plan_images(datasets.nano_plan()); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_quantize_gates_each_attribute_of_a_nano_bundle(nano_bundle, tmp_path):
    """quantize_bundle on the nano bundle with its own plans (nano's grammar), one small graph quantized, and a
    scorer whose quantized figures lose 5 points of colour while the mean rises: the bundle fails on colour alone."""
    pytest.importorskip("modelopt.onnx.quantization", reason="quantization needs the quant extra (nvidia-modelopt)")
    from illume_rt.calibration.quantize import quantize_bundle

    def scorer(pipe):
        if "quantization" not in pipe.bundle.manifest:
            return dict(FP32)
        return {**{k: v + 0.02 for k, v in FP32.items()}, "colour": FP32["colour"] - 0.05}

    # the target does not matter to the prompt gate (either runs after the other: calibration/ort_state.py)
    manifest = quantize_bundle(nano_bundle, tmp_path / "q", "int8", "tensorrt", keep_failed=True,
                               threads=TEST_THREADS, components=["semantic_encoder"], log=lambda m: None,
                               prompt_scorers={"fake": scorer})
    q = manifest["quantization"]
    assert q["calibration"]["plan"]["images"] == "nano-train"
    # no diffusion graph asked for: calibration skips the plan's refinements (8 x 20 UNet steps)
    assert "diffusion_unet" not in q["calibration"]["samples"] and q["refinement"] is None
    assert all(data.attributes_of_caption(g[0]) for g in q["calibration"]["plan"]["generate"])
    assert q["status"] == "failed" and len(q["failures"]) == 1 and "colour" in q["failures"][0], q["failures"]
    assert q["prompt_accuracy"]["fake"]["quantized"]["colour"] == pytest.approx(0.75)
    written = json.loads((tmp_path / "q" / "manifest.json").read_text())["quantization"]
    assert written["status"] == "failed" and written["prompt_accuracy"]["fake"]["failures"] == q["failures"]


def test_an_int8_unet_that_passes_its_graph_gate_but_spoils_refined_pictures_is_refused(nano_bundle, tmp_path):
    """The case the end-to-end refinement gate exists for: nano's INT8 onnxruntime CPU UNet calibrated on one
    picture's refinement instead of all of nano's plan passes its own gate (every call within the cosine limit of
    FP32, at all 20 timesteps) while the refined pictures of other scenes fall far from FP32's. The committed
    decoder (session 48's run) calibrated on the plan's second picture alone (a red circle at the top right on white):
    worst cosine 0.991, refined pictures worst 23.0 dB, mean 45.3 dB against FP32; on its first, third or fourth the
    graph gate itself fails (0.987-0.990). Session 45's decoder passed on the first (and session 32's, on the
    eight-caption plan before session 33: cosine 0.998, worst 35.5 dB against 41.0 calibrated on all eight). The
    limits are set here, not taken from the recipe, so that neither gate decides on its last thousandth: cosine
    0.985 (the recipe's 0.99 passes this UNet by 0.001), refinement 30 dB, between this UNet's worst picture and the
    worst of the UNet calibrated on nano's whole plan (35.5 dB, nano/weights/quantized_eval.json; the recipe's limit,
    24 dB, is for gross spoiling and would refuse this one by 1 dB). The graph gate alone would pass this bundle; the
    refinement gate refuses it and blames the UNet."""
    pytest.importorskip("modelopt.onnx.quantization", reason="quantization needs the quant extra (nvidia-modelopt)")
    from dataclasses import replace

    from illume_rt.calibration import recipes
    from illume_rt.calibration.quantize import quantize_bundle

    one_picture = replace(datasets.plan_for(_manifest_model(nano_bundle), "calibration"), refine=[1])
    limits = {**recipes.thresholds_for("nano", "int8", random_weights=False), "cosine": 0.985, "refine_psnr_db": 30.0}
    manifest = quantize_bundle(nano_bundle, tmp_path / "q", "int8", "ort-cpu", keep_failed=True,
                               threads=TEST_THREADS, components=["diffusion_unet"], log=lambda m: None,
                               prompt_scorers={}, calibration=one_picture, thresholds=limits)
    q = manifest["quantization"]
    unet = manifest["components"]["diffusion_unet"]["quantization"]
    assert unet["passed"] and unet["accuracy"]["worst_cosine"] >= q["thresholds"]["cosine"]  # its own gate: passed
    refinement = q["refinement"]
    assert refinement["steps"] == datasets.NANO_REFINE_STEPS
    assert refinement["pictures"] == 3 + datasets.NANO_REFINE_CHECKS
    assert refinement["limit_psnr_db"] == 30.0
    assert refinement["worst_psnr_db"] < refinement["limit_psnr_db"] < refinement["mean_psnr_db"], refinement
    assert q["status"] == "failed" and q["failures"] == refinement["failures"] and unet["blamed_for_refinement"]


def test_the_int8_unet_of_the_builtin_model_passes_its_gates(nano_bundle, tmp_path):
    """illume-nano's INT8 onnxruntime CPU UNet on nano's own calibration plan passes its graph gate and the
    refinement gate. With its first and last convolutions quantized it missed the graph gate (worst cosine 0.944 <
    0.99, session 32's decoder), and ``illume-rt quantize int8`` refused the built-in model."""
    pytest.importorskip("modelopt.onnx.quantization", reason="quantization needs the quant extra (nvidia-modelopt)")
    import onnx

    from illume_rt.calibration import recipes
    from illume_rt.calibration.quantize import quantize_bundle

    manifest = quantize_bundle(nano_bundle, tmp_path / "q", "int8", "ort-cpu", keep_failed=True,
                               threads=TEST_THREADS, components=["diffusion_unet"], log=lambda m: None,
                               prompt_scorers={})
    q = manifest["quantization"]
    unet = manifest["components"]["diffusion_unet"]["quantization"]
    source = onnx.load(str(nano_bundle / "diffusion_unet.onnx"), load_external_data=False)
    boundary = recipes.boundary_convs(source)
    assert len(boundary) == 2 and unet["details"]["keep_boundary_convs"]  # conv_in, conv_out
    assert set(boundary) <= set(unet["graph"]["kept_fp32_nodes"])
    assert unet["accuracy"]["worst_cosine"] >= q["thresholds"]["cosine"], unet["accuracy"]
    assert q["refinement"]["worst_psnr_db"] >= q["refinement"]["limit_psnr_db"], q["refinement"]
    assert q["status"] == "passed", q["failures"]
    assert "vae_only_refine" not in q["calibration"]  # the VAE decoder's own refinements: only when it is quantized


def test_the_int8_llm_of_the_builtin_model_passes_its_own_gate(nano_bundle, tmp_path):
    """illume-nano's INT8 LLM (onnxruntime CPU flavour) against its graph gate: cosine of every output, teacher-forced
    top-1 and KL on held-out runs. Nano's recipe has no SmoothQuant (recipes.SMOOTHQUANT_ALPHA): at the default 0.5
    its worst hidden-state cosine was 0.959 on these weights, and ``illume-rt quantize`` refused the built-in model."""
    pytest.importorskip("modelopt.onnx.quantization", reason="quantization needs the quant extra (nvidia-modelopt)")
    from illume_rt.calibration import recipes
    from illume_rt.calibration.quantize import quantize_bundle

    assert recipes.recipe_for("llm", "int8", "ort-cpu", preset="tiny").smoothquant_alpha == 0.5  # tests keep it
    manifest = quantize_bundle(nano_bundle, tmp_path / "q", "int8", "ort-cpu", keep_failed=True,
                               threads=TEST_THREADS, components=["llm"], log=lambda m: None, prompt_scorers={})
    llm = manifest["components"]["llm"]["quantization"]
    assert llm["details"]["smoothquant_alpha"] is None
    assert manifest["quantization"]["status"] == "passed", manifest["quantization"]["failures"]
    assert llm["accuracy"]["worst_cosine"] >= manifest["quantization"]["thresholds"]["cosine"]
