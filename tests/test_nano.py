"""illume-nano: data generator, scorers, the committed checkpoint through the official loaders, and the runtime's
prompt accuracy on held-out prompts (a quality gate: it fails when the built-in model stops drawing what it is
asked)."""

from __future__ import annotations

import contextlib
import json
import types

import numpy as np
import pytest

from illume_rt.nano import data, score
from illume_rt.nano.checkpoint import WEIGHTS, available

needs_weights = pytest.mark.skipif(not available(), reason="nano/weights/ not present (illume-nano not trained)")

# Gates for the runtime on the first prompts of each split (greedy at the model's own guidance, 1.5) and on
# held-out questions; the figures the committed weights reach over the whole sets are in nano/weights/eval.json.
RUNTIME_PROMPTS = 12
# Greedy generation has learned background, position and colour (held-out over all 90 prompts: 100% / 99% / 99%),
# each gated on its own at 0.9 (one miss in 12 passes). At the official guidance 2.0 session 7's weights fell under it
# (these 12: held-out position 0.83, training colour 0.83 and position 0.67), so a model default that loses its
# guidance fails here. Size follows the size word (held-out 98% of the 45 full captions), gated at 10 of 12: session
# 7's weights, which mostly drew the context's trained size (62% held out), draw 9 of these 12 held out and fail it.
# Shape since nano's text tokenizer (session 28): held-out 86-87% (session 28's weights on these 12: 11 held out, 12
# in training), gated at 9 of 12: the byte-level weights before them drew 5 of these 12 held out (42%; 61% over all
# 90). Chance: 0.25 background and colour, 0.2 position, 0.33 shape, 0.5 size.
GATED_ATTRIBUTES = ("background", "position", "colour")
MIN_ATTRIBUTE_ACCURACY = 0.9
MIN_SIZE_ACCURACY = 0.8
MIN_SHAPE_ACCURACY = 0.75
# Editing (stage ``edit``): over all 225 held-out edits, greedy at the model's editing guidance (1.0), the attribute
# asked for is right in 87%, the whole edit (asked attribute changed, the other four kept) in 52% (session 28's
# weights, edit 1500 and polish 400 steps: 76% / 25%; session 18's byte-level weights: 63% / 19%, and on these first
# 20, four pictures of every kind: 70% / 35%). Chance for the asked attribute ~0.3; the weights before stage ``edit``
# made 0% of edits right. On these first 20 (four pictures of every kind) the committed weights get 95% / 55%; the
# gates leave 4 edits of margin, and weights that edit as session 18's did fail the asked gate.
RUNTIME_EDITS = 20
MIN_EDIT_ASKED = 0.75
MIN_EDIT_RIGHT = 0.35
# Refinement (stages ``vae`` and ``decoder``): PSNR of the diffusion decoder's 2x picture (the model's declared
# refinement defaults) against the scene rendered at 2x, from the codes of the first held-out pictures, and the
# issue's target: above Lanczos upscaling of the pixel decoder's picture. These weights over all 45: 29.44 vs 27.24
# dB (nano/weights/eval.json "refinement"), on these eight 30.23 vs 28.31; session 45's decoder: 29.21 over the 45,
# 29.72 on these eight; session 32's over the 45: 28.24; session 28's on these eight: 29.09 vs 28.43; the decoder
# before that was retrained longer: 25.6 dB on the first four vs 28.0; an untrained one about 12.5 dB.
RUNTIME_REFINES = 8
MIN_REFINED_PSNR_DB = 27.5
# Refined pictures that read as the scene the pixel decoder drew from the same codes (every attribute), greedy, seed
# 0, the first eight training prompts: these weights 7 of 8, session 45's decoder 6 (seeds 0 and 1: 15 and 13 of
# 16); what fails is a circle's blocky outline read as a square. Eight, not four: on the first four these weights
# miss one and session 45's none, so four pictures leave a pass no margin.
REFINED_PROMPTS = 8
MIN_REFINE_SAME = 0.75
FIRST_STEP_SCENES, FIRST_STEP_SEEDS = 4, 4
# levels of 255; the committed decoder: <= 1.0 (session 45's: <= 0.7; session 32's: <= 0.6); session 19's: 52
MAX_FIRST_STEP_SPREAD = 8.0
RUNTIME_QUESTIONS = 15  # the five questions about each of the first three held-out pictures
MIN_ANSWER_ACCURACY = 0.85  # measured 1.0 over all 225 held-out questions; chance ~0.31


@pytest.mark.runtime
def test_data_is_deterministic_and_split():
    s = data.Scene("circle", "red", "large", "top left", "blue")
    assert np.array_equal(data.render(s), data.render(s))
    a = data.render(s, np.random.default_rng(7))
    assert np.array_equal(a, data.render(s, np.random.default_rng(7)))
    assert not np.array_equal(a, data.render(s, np.random.default_rng(8)))
    train, held = data.split()
    assert (len(train), len(held)) == (405, 45) and not set(train) & set(held)
    for attr, values in data.CHOICES.items():  # every value is seen in training and asked about in evaluation
        assert {getattr(x, attr) for x in train} == set(values)
        assert {getattr(x, attr) for x in held} == set(values)
    assert {(x.colour, x.background) for x in train} == {(c, b) for c in data.COLOURS for b in data.BACKGROUNDS
                                                          if c != b}
    assert all(data.scene_from_caption(x.caption) == x for x in held)
    assert data.attributes_of_caption("a red circle at the top left on a blue background") == {
        "shape": "circle", "colour": "red", "position": "top left", "background": "blue"}
    assert s in train  # the README's prompt is a training combination (either size)


@pytest.mark.runtime
def test_edits_cover_every_kind_of_every_scene_in_both_splits():
    """The editing figures of both splits, and the editing guidance chosen on the training one, rest on every kind
    of edit of each of the 45 scenes: the edited scene differs from its source in exactly the kind asked."""
    from collections import Counter

    from illume_rt.nano.heldout import edit_kind, eval_edits, eval_scenes

    for which in ("held", "train"):
        edits = eval_edits(which=which)
        assert [s for s, _, _ in edits[::len(data.EDIT_INSTRUCTIONS)]] == eval_scenes(which)
        assert Counter(edit_kind(s, t) for s, _, t in edits) == {k: 45 for k in data.EDIT_INSTRUCTIONS}
        for source, _, target in edits:
            assert sum(getattr(source, a) != getattr(target, a) for a in data.ATTRIBUTES) == 1


@pytest.mark.runtime
def test_reconstruction_score_tells_a_left_right_mirrored_picture_from_a_kept_one():
    """score_reconstructions on a stand-in pipeline that gives each picture back mirrored left to right: every
    corner picture counts as mirrored and its position as lost, the centred ones as kept, and the other four
    attributes as kept; given back as it is, nothing counts as mirrored."""
    from illume_rt.nano.heldout import eval_scenes, mirrored_position, score_reconstructions

    class GivesBack:
        def __init__(self, mirror: bool, instruction: str | None = None):
            self.mirror, self.instruction = mirror, instruction

        def default_sampling(self, mode):
            from illume_rt.runtime.options import SamplingConfig

            return SamplingConfig()

        def edit(self, image, instruction, seed, sampling):
            assert instruction == self.instruction  # None: the reconstruct prompt
            picture = np.asarray(image)
            return types.SimpleNamespace(image=picture[:, ::-1].copy() if self.mirror else picture)

    assert [mirrored_position(p) for p in ("top left", "bottom right", "center")] == \
        ["top right", "bottom left", "center"]
    scenes = eval_scenes("held")[:12]
    corners = np.mean([s.position != "center" for s in scenes])
    assert 0 < corners < 1
    mirrored = score_reconstructions(GivesBack(True), scenes)
    assert mirrored["position_mirrored"] == pytest.approx(corners)
    assert mirrored["position"] == pytest.approx(1 - corners)
    assert all(mirrored[a] == 1.0 for a in ("background", "colour", "shape", "size"))
    kept = score_reconstructions(GivesBack(False), scenes)
    assert kept["position_mirrored"] == 0.0 and kept["all"] == 1.0
    asked = score_reconstructions(GivesBack(True, "keep it as is"), scenes, instruction="keep it as is")
    assert asked == mirrored  # an instruction asking for no change is scored as the reconstruct prompt is


@pytest.mark.runtime
def test_edit_scores_name_the_attribute_an_edit_loses():
    """score_edits on a stand-in pipeline that draws each edited scene with its shape swapped, unless the edit asks
    for the shape: every attribute asked for comes out right, shape is kept by none of the edits that do not ask
    for it and every other attribute by all, so only the shape edits are right; one that swaps the shape only when
    it moves the object loses it in the position edits alone (kept_by_kind)."""
    from illume_rt.nano.heldout import eval_edits, score_edits

    edits = eval_edits(25)
    by_request = {(data.render(source).tobytes(), instruction): (source, target)
                  for source, instruction, target in edits}  # the stand-in is handed the picture and instruction
    other_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}

    class SwapsShape:
        def default_sampling(self, mode):
            from illume_rt.runtime.options import SamplingConfig

            return SamplingConfig()

        def edit(self, image, instruction, seed, sampling):
            source, target = by_request[(np.asarray(image).tobytes(), instruction)]
            drawn = target if target.shape != source.shape else target.with_("shape", other_shape[target.shape])
            return types.SimpleNamespace(image=data.render(drawn))

    figures = score_edits(SwapsShape(), edits)
    assert figures["asked"] == 1.0
    assert figures["kept_by_attribute"] == {"shape": 0.0, "colour": 1.0, "size": 1.0, "position": 1.0,
                                            "background": 1.0}
    assert figures["right_by_kind"] == {"colour": 0.0, "position": 0.0, "shape": 1.0, "background": 0.0,
                                        "size": 0.0}
    assert figures["right"] == pytest.approx(0.2) and figures["kept"] == pytest.approx(0.2)
    assert figures["kept_by_kind"]["position"] == {"shape": 0.0, "colour": 1.0, "size": 1.0, "background": 1.0}

    class SwapsShapeWhenMoving(SwapsShape):  # loses the shape in position edits only
        def edit(self, image, instruction, seed, sampling):
            source, target = by_request[(np.asarray(image).tobytes(), instruction)]
            moved = target.position != source.position
            return types.SimpleNamespace(image=data.render(target.with_("shape", other_shape[target.shape])
                                                           if moved else target))

    by_kind = score_edits(SwapsShapeWhenMoving(), edits)["kept_by_kind"]
    assert by_kind["position"]["shape"] == 0.0 and by_kind["position"]["colour"] == 1.0
    assert all(kept == 1.0 for kind, kept_by in by_kind.items() if kind != "position" for kept in kept_by.values())
    assert set(by_kind) == {"colour", "position", "shape", "background", "size"}


@pytest.mark.runtime
def test_nano_text_tokenizer_makes_each_word_of_the_grammar_one_id_and_still_encodes_any_text(tmp_path):
    """nano's byte-level BPE (text_tokenizer.py): its size is the preset's, each grammar word in a caption is one id
    (so the LLM reads "triangle" at one position), any other text still round-trips byte by byte, and the
    tokenizer.json the checkpoint ships (what the runtime loads) gives training's ids with the special tokens at the
    layout's ids."""
    from illume_rt.export.configs import NANO_TEXT_VOCAB_SIZE, get_preset
    from illume_rt.nano import text_tokenizer
    from illume_rt.runtime.tokenizer import HFTokenizer

    vocab = get_preset("nano").vocab
    tok = text_tokenizer.NanoTokenizer(vocab)
    assert vocab.text_vocab_size == NANO_TEXT_VOCAB_SIZE == text_tokenizer.text_vocab_size() > 256
    scene = data.Scene("triangle", "yellow", "large", "bottom right", "gray")
    words = scene.caption.split(" ")
    assert len(tok.encode(scene.caption)) == len(words)  # one id per word
    for word in [*data.SHAPES, *data.COLOURS, *data.BACKGROUNDS, *data.SIZES]:
        assert len(tok.encode(" " + word)) == 1, word
    odd = "größer {x} \u2603 \t\n?"
    assert tok.decode(tok.encode(odd)) == odd
    assert tok.encode("\x7f") == [0x7F]  # a byte no merge touches keeps its byte id
    assert max(i for text in text_tokenizer.corpus() for i in tok.encode(text)) < vocab.text_vocab_size
    text_tokenizer.write(tmp_path / "tokenizer.json", vocab)
    shipped = HFTokenizer(tmp_path / "tokenizer.json", vocab)
    for text in text_tokenizer.corpus()[:200] + [odd]:
        assert shipped.encode(text) == tok.encode(text)
    assert shipped._tok.token_to_id("<|im_end|>") == vocab.im_end_id
    assert shipped._tok.token_to_id("<|image_level1_0|>") == vocab.pixel_code_offset


def test_scorer_reads_ground_truth_and_not_noise():
    marks = []
    for i, s in enumerate(data.all_scenes()[::3]):
        for rng in (None, np.random.default_rng(i)):
            marks.append(score.score_picture(data.render(s, rng), {a: getattr(s, a) for a in data.ATTRIBUTES}))
    assert score.summarize(marks)["all"] == 1.0
    rng = np.random.default_rng(0)
    noise = [score.score_picture(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                                 {a: getattr(s, a) for a in data.ATTRIBUTES}) for s in data.all_scenes()[::7]]
    summary = score.summarize(noise)
    assert summary["all"] < 0.05
    for attr, chance in score.CHANCE.items():
        assert summary[attr] < chance + 0.25, (attr, summary)
    flat = np.full((256, 256, 3), data.BACKGROUNDS["white"], np.uint8)
    assert score.read_scene(flat)["shape"] is None  # nothing drawn: nothing read


@needs_weights
def test_committed_checkpoint_loads_through_the_official_loaders():
    from illume_rt.export.checkpoints import load_mllm, preset_from_mllm_config
    from illume_rt.export.configs import get_preset
    from illume_rt.nano.checkpoint import COMMITTED, load_models

    config = json.loads((COMMITTED.mllm / "config.json").read_text())
    preset = preset_from_mllm_config(config, "nano")
    assert preset.name == "nano" and preset.vocab == get_preset("nano").vocab  # trained with nano's text tokenizer
    models = load_models()
    assert models.random_weights is False and models.dualvitok is not None
    assert models.source["dualvitok"]["ignored_training_only"] > 0  # semantic encoder/decoder kept, ignored
    assert load_mllm(COMMITTED.mllm, "nano").preset.llm == models.preset.llm
    assert models.unet is not None and models.vae is not None  # the diffusion decoder, from its diffusers folder
    assert models.source["diffusion"]["path"].endswith("dualvitok_sdxl_decoder")
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size < 30 * 2 ** 20


@needs_weights
def test_every_stage_of_the_committed_weights_is_logged_at_the_recipes_seed_on_the_cpu():
    """The committed weights are what ``python -m illume_rt.nano.train`` writes at its defaults: every training stage
    logged once in ``training.json``, at the recipe's seed, on the CPU, none seeded from other weights (the weights
    committed in sessions 45-48 put session 32's tokenizer and MLLM, trained before a stage logged its seed, beside
    a decoder trained by another run, ``--seed-from``)."""
    from illume_rt.nano import train

    log = json.loads((WEIGHTS / "training.json").read_text())
    assert sorted(log) == sorted(train.BUILT_ON)
    assert {name: log[name].get("seed") for name in log} == {name: train.RECIPE_SEED for name in train.BUILT_ON}
    assert not any("device" in entry or "seeded_from" in entry for entry in log.values())


@pytest.fixture(scope="module")
def nano_pipe(nano_bundle):
    from illume_rt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(nano_bundle, threads=2)


@pytest.mark.runtime
@needs_weights
@pytest.mark.parametrize("which", ["train", "held"])
def test_runtime_draws_what_it_is_asked(nano_pipe, which):
    from illume_rt.nano.heldout import eval_prompts, runtime_generate

    marks = []
    for prompt, wanted in eval_prompts(RUNTIME_PROMPTS, which):
        img, _, _ = runtime_generate(nano_pipe, prompt)
        marks.append(score.score_picture(img, wanted))
    summary = score.summarize(marks)
    assert all(summary[a] >= MIN_ATTRIBUTE_ACCURACY for a in GATED_ATTRIBUTES), summary
    assert summary["size"] >= MIN_SIZE_ACCURACY, summary
    assert summary["shape"] >= MIN_SHAPE_ACCURACY, summary


@pytest.mark.runtime
@needs_weights
def test_runtime_answers_held_out_pictures(nano_pipe):
    from illume_rt.nano.heldout import eval_questions, runtime_answer

    items = eval_questions(RUNTIME_QUESTIONS)
    right = [score.answer_correct(runtime_answer(nano_pipe, s, q), a) for s, q, a in items]
    assert np.mean(right) >= MIN_ANSWER_ACCURACY, right


@pytest.mark.runtime
@needs_weights
def test_runtime_edits_held_out_pictures(nano_pipe):
    """Editing in nano's grammar (stage ``edit``): the attribute asked for comes out right far above chance, and
    edits that also keep every other attribute exist; the whole-set figures are in nano/weights/eval.json."""
    from illume_rt.nano.heldout import eval_edits, score_edits

    figures = score_edits(nano_pipe, eval_edits(RUNTIME_EDITS))
    assert figures["asked"] >= MIN_EDIT_ASKED and figures["right"] >= MIN_EDIT_RIGHT, figures


@needs_weights
def test_diagnosis_edits_code_for_code_as_the_runtime_does(nano_pipe):
    """Part 9 of diagnose.py (which level loses what an edit keeps) decodes nano's edits in PyTorch: its free run
    must be the runtime's greedy edit code for code, or its figures would not be the evaluation's; with the
    semantic level given it keeps those codes, and its cached pixel codes are the argmax a whole forward of the
    finished sequence gives at each pixel code's place."""
    from dataclasses import replace

    import torch
    from PIL import Image

    from illume_rt.nano import diagnose, train
    from illume_rt.nano.heldout import eval_edits

    enc, pixel = diagnose.tokenizer_modules()
    models = diagnose.reference_models(None)
    preset, tok = models.preset, train.nano_tokenizer(models.preset)
    greedy = replace(nano_pipe.default_sampling("editing"), greedy=True)
    for scene, instruction, target in eval_edits(2):
        x = torch.from_numpy(data.to_model_input(data.render(scene)))
        with torch.no_grad():
            vit, features = enc.features(x)[0], pixel.pixel_encoder(x).flatten(2).transpose(1, 2)[0]
        sem, pix = diagnose.greedy_edit_codes(models.llm, models.projectors, preset, tok, instruction, vit, features)
        runtime = nano_pipe.edit(Image.fromarray(data.render(scene)), instruction, seed=0, sampling=greedy).tokens
        assert sem.tolist() == runtime.semantic.reshape(-1).tolist()
        assert pix.tolist() == runtime.pixel.reshape(-1).tolist()
        given, _ = diagnose.encode(enc, pixel, [target])
        sem, pix = diagnose.greedy_edit_codes(models.llm, models.projectors, preset, tok, instruction, vit, features,
                                              given[0])
        assert sem.tolist() == given[0].tolist()
        ids, labels = train.edit_example(preset, tok, instruction, sem.reshape(diagnose.SEMANTIC_GRID),
                                         pix.reshape(diagnose.PIXEL_GRID))
        with torch.no_grad():
            logits = models.llm(inputs_embeds=train.embed_with_features(
                models.llm.get_input_embeddings(), models.projectors, torch.tensor([ids]), vit[None],
                features[None])).logits[0, :-1]
        v = preset.vocab
        at = [k for k in range(len(ids) - 1) if labels[k + 1] != -100
              and v.pixel_code_offset <= ids[k + 1] < v.pixel_code_offset + v.pixel_codebook_size]
        whole = logits[at, v.pixel_code_offset:v.pixel_code_offset + v.pixel_codebook_size].argmax(-1)
        assert whole.tolist() == pix.tolist()


@needs_weights
def test_diagnosis_draws_code_for_code_as_the_runtime_does(nano_pipe):
    """Part 10 of diagnose.py (which level loses what a drawing gets wrong) draws in PyTorch at nano's guidance: its
    free run must be the runtime's greedy drawing code for code (both rows, guided), or its figures would not be the
    evaluation's; with the semantic level given it keeps those codes and draws pixel codes of its own."""

    from illume_rt.nano import diagnose, train
    from illume_rt.nano.heldout import eval_prompts, greedy_sampling

    models = diagnose.reference_models(None)
    preset, tok = models.preset, train.nano_tokenizer(models.preset)
    greedy = greedy_sampling(nano_pipe)
    assert greedy.guidance_scale != 1.0, "nano's text-to-image guidance is 1.0: the unconditional row goes untested"
    for prompt, _ in eval_prompts(2):
        sem, pix = diagnose.greedy_draw_codes(models.llm, preset, tok, prompt, greedy.guidance_scale)
        runtime = nano_pipe.generate(prompt, resolution=(256, 256), seed=0, sampling=greedy).tokens
        assert sem.tolist() == runtime.semantic.reshape(-1).tolist()
        assert pix.tolist() == runtime.pixel.reshape(-1).tolist()
        given = sem.flip(0)  # the object's codes in the opposite corner, so that feeding them shows
        given_sem, given_pix = diagnose.greedy_draw_codes(models.llm, preset, tok, prompt, greedy.guidance_scale, given)
        assert given_sem.tolist() == given.tolist()
        assert given_pix.tolist() != pix.tolist()


@needs_weights
def test_refine_works_out_of_the_box_on_the_built_in_model(nano_pipe):
    """``--refine`` on the built-in model: its bundle carries nano's diffusion decoder, and the 2x picture it draws
    from a held-out picture's codes is closer to the scene rendered at 2x (PSNR) than the pixel decoder's picture
    upscaled with Lanczos (see RUNTIME_REFINES)."""
    from illume_rt.nano import decoder
    from illume_rt.nano.checkpoint import COMMITTED
    from illume_rt.nano.heldout import eval_scenes

    assert nano_pipe.bundle.manifest.get("diffusion"), "the built-in bundle has no diffusion decoder"
    figures = decoder.refinement_scores(nano_pipe, eval_scenes("held")[:RUNTIME_REFINES],
                                        *decoder.tokenizer_from_weights(COMMITTED.dualvitok))
    assert figures["refined_psnr_db"] >= MIN_REFINED_PSNR_DB, figures
    assert figures["refined_psnr_db"] > figures["lanczos_psnr_db"], figures


@pytest.mark.runtime
@needs_weights
def test_a_refined_picture_shows_what_the_pixel_decoder_drew(nano_pipe):
    """``generate --refine`` on the built-in model, where the runtime is installed without torch: the 512x512
    picture the diffusion decoder draws from generated codes shows the scene the pixel decoder's 256x256 picture
    of the same codes shows (read back by the same scorer)."""
    from illume_rt.nano.heldout import eval_prompts, greedy_sampling
    from illume_rt.runtime.pipeline import to_uint8

    same = []
    for prompt, _ in eval_prompts(REFINED_PROMPTS, "train"):
        result = nano_pipe.generate(prompt, (256, 256), seed=0, refine=nano_pipe.default_refine(),
                                    sampling=greedy_sampling(nano_pipe))
        assert result.refined and result.image.shape == (512, 512, 3)
        drawn = to_uint8(nano_pipe.decode_image(result.tokens.semantic, result.tokens.pixel))
        wanted = score.read_scene(drawn)
        same.append(score.read_scene(result.image) == wanted)
    assert np.mean(same) >= MIN_REFINE_SAME, same


@needs_weights
def test_the_diffusion_decoder_draws_from_the_token_map_not_from_the_starting_noise():
    """At the sampler's first step the committed UNet predicts the same picture from every seed's noise. A decoder
    that learned to read the background from the noisy latent's mean does not: a from-scratch
    one predicted a gray background as gray, bluish or blue by seed (mean difference from the seeds' median picture
    up to 52 levels of 255), and 4 of 6 of its refined pictures of that scene came out blue."""
    import torch

    from illume_rt.nano import decoder, train
    from illume_rt.nano.checkpoint import COMMITTED, load_models

    models = load_models()
    encoder, pixel = decoder.tokenizer_from_weights(COMMITTED.dualvitok)
    for scene in data.split()[1][:FIRST_STEP_SCENES]:
        token_map = decoder.token_maps(encoder, pixel, torch.from_numpy(data.to_model_input(data.render(scene))))
        pictures = decoder.first_step_pictures(train.nano_preset(), models.unet, models.vae, token_map,
                                               range(FIRST_STEP_SEEDS)).astype(np.float32)
        off = np.abs(pictures - np.median(pictures, axis=0)).mean(axis=(1, 2, 3))
        assert off.max() <= MAX_FIRST_STEP_SPREAD, (scene.caption, off.round(1))


@pytest.mark.parametrize("average_decay", [None, 0.9])
def test_training_stage_resumes_exactly_from_a_weights_only_checkpoint(tmp_path, average_decay):
    """An interrupted stage resumes from its partial state, which loads with torch.load(weights_only=True), and
    ends where an uninterrupted run ends (parameters, optimizer, both random generators and, for a stage that ends
    on its weights' average (stage ``vae``), the average restored)."""
    import torch

    from illume_rt.nano import train

    def run(work, steps, stop_after=None):
        work.mkdir(exist_ok=True)
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 2)
        stage = train.Stage(work, "toy")

        def step_fn(step, rng):
            if stop_after is not None and step == stop_after:
                raise KeyboardInterrupt  # the interruption: the partial state of step `stop_after` is on disk
            x = torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)) + torch.randn(3, 4)
            return net(x).pow(2).mean(), ""

        try:
            train._train_loop(stage, {"net": net}, list(net.parameters()), steps, 1e-2, step_fn, every=2,
                              average_decay=average_decay)
        except KeyboardInterrupt:
            pass
        return net, stage

    straight, _ = run(tmp_path / "a", 6)
    _, stage = run(tmp_path / "b", 6, stop_after=4)
    partial = torch.load(stage.partial, weights_only=True)  # raises if anything but plain data was pickled
    assert partial["step"] == 4
    stage.release()  # what the interrupted process's exit does
    resumed, _ = run(tmp_path / "b", 6)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_partial_state_without_the_average_is_refused_with_the_fix(tmp_path):
    """A partial state written before its stage kept an average (stage ``vae`` until session 45) cannot end as an
    uninterrupted run would: one line naming ``--redo``, and the state is left as it was."""
    import torch

    from illume_rt.nano import train

    net = torch.nn.Linear(2, 1)
    stage = train.Stage(tmp_path, "vae")
    opt = torch.optim.AdamW(net.parameters())
    stage.save_partial({"step": 2, "rng": np.random.default_rng(0).bit_generator.state, "opt": opt.state_dict(),
                        "modules": {"vae": net.state_dict()}})
    before = stage.partial.read_bytes()
    with pytest.raises(SystemExit) as stop:
        train._train_loop(stage, {"vae": net}, list(net.parameters()), 4, 1e-2,
                          lambda step, rng: (net(torch.ones(1, 2)).sum(), ""), average_decay=0.9)
    assert "--redo vae" in str(stop.value) and "\n" not in str(stop.value)
    assert stage.partial.read_bytes() == before


def test_a_stage_with_an_average_ends_on_the_average_of_its_weights_not_on_the_last_step(tmp_path):
    """``average_decay``: the modules end holding the exponential moving average of the weights after each step
    (the decay capped by (1 + step) / (10 + step)), computed here from the weights the steps saw."""
    import torch

    from illume_rt.nano import train

    torch.manual_seed(0)
    net, steps, decay = torch.nn.Linear(3, 1), 30, 0.8
    seen = []  # the weights after 0, 1, ... steps, as each step begins

    def step_fn(step, rng):
        seen.append(net.weight.detach().clone())
        return net(torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32))).pow(2).mean(), ""

    stage = train.Stage(tmp_path, "toy")
    train._train_loop(stage, {"net": net}, list(net.parameters()), steps, 1e-1, step_fn, every=5,
                      average_decay=decay)
    last = torch.load(stage.partial, weights_only=True)["modules"]["net"]["weight"]  # the last step's weights
    expected = seen[0]
    for step, weights in enumerate(seen[1:] + [last]):
        d = min(decay, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * weights
    assert torch.allclose(net.weight, expected, atol=1e-6)
    assert not torch.allclose(net.weight, last, atol=1e-3)


def test_a_stage_is_trained_by_one_process_at_a_time(tmp_path):
    """A second trainer of a stage in the same work folder (the command started twice) stops at once with one line
    naming the holder, instead of writing the same checkpoint files; other stages, and the stage once the holder is
    done, are free."""
    import os

    from illume_rt.nano import train

    first = train.Stage(tmp_path, "toy")
    with pytest.raises(SystemExit, match=f"stage toy in .* is being trained by another process \\(pid {os.getpid()}\\)"):
        train.Stage(tmp_path, "toy")
    other = train.Stage(tmp_path, "other")  # another stage: no conflict
    first.finish({"modules": {}})
    train.Stage(tmp_path, "toy").release()
    other.release()


def test_a_run_does_not_go_on_from_stages_of_another_seed(tmp_path, monkeypatch):
    """``--seed`` trains another draw of the recipe: resuming a work folder whose finished or interrupted stages
    have another seed would mix two draws, so the command stops with one line naming both fixes. States written by
    ``--seed-from``, and log entries from before ``--seed`` (the recipe's seed), are taken as they are."""
    import torch

    from illume_rt.nano import train

    monkeypatch.setattr(train, "SEED", train.SEED)  # main() sets it for the process
    work = tmp_path / "work"
    work.mkdir()
    (work / "pixel.pt").touch()
    (work / "mllm.pt").touch()
    (work / "log.json").write_text(json.dumps({"pixel": {"cpu_s": 1.0, "seed": 7},
                                               "mllm": {"cpu_s": 1.0, "seeded_from": "nano/weights"}}))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match=r"stage pixel in .* was trained with seed 7, not 5: pass --seed 7 .* "
                                             r"give seed 5 a --work folder of its own"):
            train.main(["--work", str(work), "--seed", "5", "--redo", "mllm", "tokens"])
    finally:
        torch.set_num_threads(threads)  # main() sets the process's threads (--threads)
    assert (work / "mllm.pt").is_file(), "a refused run deleted what --redo names"
    train.refuse_other_seeds(work, redone=["pixel", "tokens", "mllm"])  # the stage of another seed is redone: go on
    train.SEED = 7
    train.refuse_other_seeds(work)  # its own seed, and a seeded state of another seed: no objection
    (work / "log.json").write_text(json.dumps({"pixel": {"cpu_s": 1.0}}))  # before --seed: the recipe's seed
    with pytest.raises(SystemExit, match=f"trained with seed {train.RECIPE_SEED}, not 7"):
        train.refuse_other_seeds(work)

    train.SEED = train.RECIPE_SEED
    stage = train.Stage(work, "toy")
    stage.save_partial({"step": 2})
    assert torch.load(stage.partial, weights_only=True)["seed"] == train.RECIPE_SEED
    stage.release()
    train.SEED = 5
    with pytest.raises(SystemExit, match=f"stage toy in .* was started with seed {train.RECIPE_SEED}, not 5"):
        train.Stage(work, "toy").resume()


def test_the_side_chain_process_ends_with_the_command(tmp_path):
    """The side chain's process (``start_side_chain``, here training ``vae`` into an empty folder) does not outlive
    the command even when the command is killed with SIGKILL, where no cleanup of its own runs: an orphan would go
    on training into the work folder the next run trains into."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", (
        "import argparse, sys, time\n"
        "from illume_rt.nano.train import start_side_chain\n"
        "child = start_side_chain(argparse.Namespace(work=sys.argv[1], threads=1), ['vae'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(120)\n"), str(tmp_path / "work")], stdout=subprocess.PIPE, text=True)
    try:
        child = next(int(line.split()[1]) for line in parent.stdout if line.startswith("child "))
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended (not yet reaped)
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the side chain's process outlived the command"
    finally:
        parent.kill()
        with contextlib.suppress(ProcessLookupError, NameError, ValueError):
            os.kill(child, signal.SIGKILL)


def test_training_edits_are_the_runtime_editing_prompt_with_the_edited_scene_as_labels():
    """Stage ``edit`` trains on exactly what ``Pipeline.edit`` feeds at 256x256: the official editing prompt
    (the reconstruct prompt for the unconditional row) with the picture's block where the runtime splices it, and
    the edited scene's codes as the only labels."""
    import torch

    from illume_rt.contract import image_grid
    from illume_rt.nano import train
    from illume_rt.runtime.multimodal import image_block_length
    from illume_rt.runtime.prompts import IMAGE_PLACEHOLDER, editing_ids

    preset = train.nano_preset()
    v, tok = preset.vocab, train.nano_tokenizer(preset)
    sem, pix = (torch.arange(81) % 7).reshape(9, 9), (torch.arange(256) % 5).reshape(16, 16)
    image = v.image_token_ids(image_grid(256, 256), sem.tolist(), pix.tolist()) + [v.im_end_id]
    for instruction, template in (("make it a square", 0), (None, 1)):
        ids, labels = train.edit_example(preset, tok, instruction, sem, pix)
        prompt = editing_ids(tok, v, instruction or "unused", 256, 256)[template]
        at = prompt.index(IMAGE_PLACEHOLDER)
        block = ids[at:at + image_block_length(256, 256)]
        assert (block.count(train.SEM_SLOT), block.count(train.PIX_SLOT)) == (81, 256)
        assert ids[:at] == prompt[:at] and ids[at + len(block):] == prompt[at + 1:] + image
        assert labels == [-100] * (len(ids) - len(image)) + image
    assert "Reconstruct" in tok.decode([i for i in ids if 0 <= i < v.text_vocab_size])

    scenes = data.split()[0]
    pairs = train.edit_pairs(scenes)
    src, instruction, dst = pairs[0]
    assert (instruction, scenes[dst]) in data.edits(scenes[src]) and scenes[dst] != scenes[src]
    held = set(data.split()[1])
    assert not any(scenes[a] in held or scenes[b] in held for a, _, b in pairs)  # held-out scenes stay unseen


@needs_weights
def test_the_answers_logged_after_each_mllm_stage_are_what_greedy_decoding_answers():
    """``train.answers_right`` (teacher forced, logged at the end of every MLLM stage) counts an answer right exactly
    when the reference's greedy decoding gives it: on held-out pictures with their own features (mostly right) and
    with the next picture's features under this picture's answers (mostly wrong)."""
    import torch

    from illume_rt.nano import train
    from illume_rt.nano.checkpoint import load_models
    from illume_rt.nano.evaluate import reference_answer_text

    models = load_models()
    preset = train.nano_preset()
    scenes = data.split()[1][:6]
    with torch.no_grad():
        pictures = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in scenes]))
        vit = torch.stack([models.vision_tower(train.vit_view(p[None])) for p in pictures])
        pixel_features = models.pixel_encoder(pictures).flatten(2).transpose(1, 2)
    for shift in (0, 1):  # shift 1: picture i + 1's features, picture i's answers
        shown = [scenes[(i + shift) % len(scenes)] for i in range(len(scenes))]
        split = {"scenes": [s.__dict__ for s in scenes], "vit": vit.roll(-shift, 0),
                 "pixel_features": pixel_features.roll(-shift, 0)}
        logged = train.answers_right(models.llm, models.projectors, preset, train.nano_tokenizer(preset), split)
        greedy = {q: float(np.mean([reference_answer_text(models, image, q) == dict(s.qa())[q]
                                    for s, image in zip(scenes, shown)])) for q in data.QUESTIONS}
        assert logged == pytest.approx(greedy, abs=1e-3), shift  # logged to 4 decimals
        assert (np.mean(list(logged.values())) > 0.8) == (shift == 0)


def test_every_edit_changes_the_attribute_it_names_and_nothing_else():
    s = data.Scene("circle", "red", "small", "top left", "blue")
    edits = data.edits(s)
    assert ("make the background black", s.with_("background", "black")) in edits
    assert ("make it large", s.with_("size", "large")) in edits
    assert all(t.colour != t.background for _, t in edits)
    assert not any(t.background == "red" for _, t in edits)  # the shape is red: a red background would hide it
    for instruction, target in edits:
        changed = [a for a in data.ATTRIBUTES if getattr(target, a) != getattr(s, a)]
        assert len(changed) == 1 and getattr(target, changed[0]) in instruction


def test_sampling_defaults_are_chosen_by_the_weakest_attribute_and_bound_to_their_weights(tmp_path):
    from illume_rt.nano import checkpoint, choose_sampling

    def result(temperature, **scores):
        full = {a: 0.9 for a in data.ATTRIBUTES}
        full.update(scores)
        return {"temperature": temperature, "top_p": 1.0, "scores": {**full, "all": scores.get("all", 0.5)}}

    # the best mean (0.94) loses to the best weakest attribute (0.8 vs 0.7)
    picked = choose_sampling.choose([result(1.0, size=0.7, colour=1.0, shape=1.0), result(0.7, size=0.8)])
    assert picked["temperature"] == 0.7
    assert choose_sampling.choose([result(1.0, all=0.4), result(0.7, all=0.6)])["temperature"] == 0.7  # tie: all

    weights = checkpoint.NanoWeights(str(tmp_path))  # a weights folder (a str path too): only the MLLM file the
    # choice is bound to
    weights.mllm.mkdir()
    (weights.mllm / "model.safetensors").write_bytes(b"weights")
    assert checkpoint.sampling_defaults(weights) is None  # no file: the official defaults
    record = {"text_to_image": {"top_p": 0.8}, "weights_sha256": checkpoint.weights_digest(weights)}
    weights.sampling_file.write_text(json.dumps(record))
    assert checkpoint.sampling_defaults(weights) == {"text_to_image": {"top_p": 0.8}}
    (weights.mllm / "model.safetensors").write_bytes(b"retrained")
    assert checkpoint.sampling_defaults(weights) is None  # chosen for other weights: not used


def test_text_to_image_guidance_is_chosen_greedily_then_the_sampler_at_that_guidance(monkeypatch):
    """Stage ``sampling`` picks the guidance by greedy drawings of the training prompts (full and short captions),
    then scores the samplers at that guidance only: a sampled lead of one scene at another guidance (what picked 1.0
    for four of six weights, session 53) does not move it. Ties between guidances go to the stronger one."""
    from types import SimpleNamespace

    from illume_rt.nano import choose_sampling
    from illume_rt.nano.heldout import eval_prompts, eval_scenes

    drawn = []

    def stand_in_scores(pipe, sampling, prompts, seed=0):
        drawn.append((sampling.guidance_scale, sampling.greedy, len(prompts)))
        if sampling.greedy:  # greedy: 1.5 one prompt ahead
            shape = {2.0: 0.60, 1.5: 0.91, 1.0: 0.89}[sampling.guidance_scale]
        else:  # sampled: the best sampler at 1.0 one scene ahead of any at 1.5, and top-p 0.6 best at each
            shape = {2.0: 0.70, 1.5: 0.87, 1.0: 0.89}[sampling.guidance_scale] + (sampling.top_p == 0.6) * 0.02
        return {**{a: 1.0 for a in data.ATTRIBUTES}, "shape": shape, "all": shape}

    monkeypatch.setattr(choose_sampling, "score_candidate", stand_in_scores)
    record = choose_sampling.choose_text_to_image(SimpleNamespace(bundle=SimpleNamespace(manifest={"model": {}})),
                                                  None)
    assert record["text_to_image"]["guidance_scale"] == 1.5
    assert record["text_to_image"]["top_p"] == 0.6
    greedy = [(g, n) for g, is_greedy, n in drawn if is_greedy]
    sampled = [(g, n) for g, is_greedy, n in drawn if not is_greedy]
    assert greedy == [(g, len(eval_prompts(None, "train"))) for g in choose_sampling.GUIDANCE_CANDIDATES]
    assert sampled == [(1.5, len(eval_scenes("train")))] * len(choose_sampling.SAMPLERS)
    assert len(eval_prompts(None, "train")) == 2 * len(eval_scenes("train"))  # the short captions drawn too

    def tied(guidance):
        return {"guidance_scale": guidance, "scores": {**{a: 0.9 for a in data.ATTRIBUTES}, "all": 0.9}}

    for order in ([tied(1.0), tied(1.5)], [tied(1.5), tied(1.0)]):
        assert choose_sampling.choose(order)["guidance_scale"] == 1.5


def test_refine_defaults_are_bound_to_the_decoder_they_were_chosen_for(tmp_path):
    from illume_rt.nano import checkpoint

    weights = checkpoint.NanoWeights(tmp_path)  # a weights folder: only the decoder files the choice is bound to
    (weights.decoder / "unet").mkdir(parents=True)
    (weights.decoder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet")
    assert checkpoint.refine_defaults(weights) is None  # no file: the official defaults
    record = {"refine": {"guidance_scale": 1.0}, "decoder_sha256": checkpoint.decoder_digest(weights)}
    weights.refine_file.write_text(json.dumps(record))
    assert checkpoint.refine_defaults(weights) == {"guidance_scale": 1.0}  # the file itself is not in the digest
    (weights.decoder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"retrained unet")
    assert checkpoint.refine_defaults(weights) is None  # chosen for another decoder: not used


@needs_weights
def test_seeded_stages_export_back_to_the_committed_weights(tmp_path):
    """--seed-from, then export with nothing retrained, writes every tensor of the committed weights unchanged (the
    diffusion decoder included, and its VAE's scaling factor): what a retraining keeps is what was committed."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from illume_rt.nano import train
    from illume_rt.nano.checkpoint import COMMITTED, NanoWeights

    work, out = tmp_path / "work", tmp_path / "out"
    train.seed_from_weights(work, WEIGHTS)
    assert {p.stem for p in work.glob("*.pt")} == set(train.SEEDED_STAGES)
    log = json.loads((work / "log.json").read_text())
    assert all(log[name]["seeded_from"] == str(WEIGHTS) for name in train.SEEDED_STAGES)
    shutil.copy(work / "mllm.pt", work / "polish.pt")  # the MLLM as committed stands in for its last stage
    train.stage_export(work, out)

    def tensors(folder):
        found = {}
        for file in sorted(folder.rglob("*.safetensors")):
            found.update({f"{file.relative_to(folder)}:{k}": v for k, v in load_file(str(file)).items()})
        return found

    for committed_part, written_part in ((COMMITTED.mllm, NanoWeights(out).mllm),
                                         (COMMITTED.decoder, NanoWeights(out).decoder)):
        committed, written = tensors(committed_part), tensors(written_part)
        assert committed.keys() == written.keys() and committed
        assert all(torch.equal(committed[k], written[k]) for k in committed), written_part
    tokenizer = [torch.load(folder.dualvitok, weights_only=True) for folder in (COMMITTED, NanoWeights(out))]
    assert tokenizer[0].keys() == tokenizer[1].keys() and all(torch.equal(v, tokenizer[1][k])
                                                              for k, v in tokenizer[0].items())
    scaling = [json.loads((folder.decoder / "vae" / "config.json").read_text())["scaling_factor"]
               for folder in (COMMITTED, NanoWeights(out))]
    assert scaling[0] == scaling[1]


def test_image_code_rows_start_alike_where_the_codes_look_alike(tmp_path):
    """init_code_rows (train.CODE_ROWS_FROM_MEANING): the semantic codes whose cells the semantic decoder draws
    nearest start with rows nearer than other codes' in the embedding table and the LM head; text rows and the
    init's scale are kept, and a share of 0 leaves every row as the random init drew it."""
    import torch

    from illume_rt.nano import train

    train.seed_from_weights(tmp_path, WEIGHTS)
    preset = train.nano_preset()
    lo, hi = preset.vocab.semantic_range
    _, dec, pixel = train.load_tokenizer_state(tmp_path)
    with torch.no_grad():
        cells = dec(pixel.semantic_quantizer.lookup_table())
    cell_distance = torch.cdist(cells, cells) + torch.eye(len(cells)) * 1e9
    nearest = cell_distance.argmin(1)

    random_llm, _ = train.build_mllm(preset)
    unchanged, _ = train.build_mllm(preset)
    train.init_code_rows(unchanged, preset, tmp_path, 0.0)
    assert torch.equal(unchanged.lm_head.weight, random_llm.lm_head.weight)
    llm, _ = train.build_mllm(preset)
    train.init_code_rows(llm, preset, tmp_path, 0.8)
    for table, random_table in ((llm.model.embed_tokens.weight, random_llm.model.embed_tokens.weight),
                                (llm.lm_head.weight, random_llm.lm_head.weight)):
        assert torch.equal(table[:lo], random_table[:lo])
        rows = table[lo:hi] / table[lo:hi].norm(dim=1, keepdim=True)
        cosine = rows @ rows.T
        to_nearest = cosine[torch.arange(len(rows)), nearest].mean()
        to_others = (cosine.sum() - cosine.diagonal().sum()) / (len(rows) * (len(rows) - 1))
        assert to_nearest > to_others + 0.3, (to_nearest, to_others)
        assert abs(table[lo:hi].std().item() - 0.02) < 0.002


def test_redoing_a_stage_redoes_every_stage_built_on_it():
    from illume_rt.nano import train

    assert train.redo_stages(["focus"]) == ["focus", "edit", "polish"]
    assert train.redo_stages(["tokens", "export"]) == ["tokens", "mllm", "focus", "edit", "polish", "export"]
    assert train.redo_stages(["polish"]) == ["polish"] and train.redo_stages([]) == []
    assert train.redo_stages(["vae"]) == ["vae", "decoder"]
    assert train.redo_stages(["pixel"]) == ["pixel", "tokens", "mllm", "focus", "edit", "polish", "decoder"]
    assert set(train.BUILT_ON) == {s for s in train.STAGES if s not in ("export", "sampling")}


def test_diagnosis_flags_held_out_codes_never_seen_at_their_position_and_objects_seen_elsewhere():
    from illume_rt.nano.diagnose import object_patch, unseen_at_position

    train = np.array([[1, 2, 3], [1, 5, 3]])
    held = np.array([[1, 5, 3],  # every code seen at its position
                     [2, 1, 3],  # 2 and 1 occur in training, but not at positions 0 and 1
                     [1, 2, 9]])  # 9 never occurs
    assert unseen_at_position(train, held).tolist() == [[False, False, False], [True, True, False],
                                                        [False, False, True]]
    empty = np.zeros((4, 4), int)
    here, there = empty.copy(), empty.copy()
    here[0:2, 1:3] = [[5, 6], [7, 8]]
    there[2:4, 0:2] = [[5, 6], [7, 8]]  # the same object two cells down and one left
    assert (object_patch(here, empty) == object_patch(there, empty)).all()
    there[3, 1] = 9
    assert not (object_patch(here, empty) == object_patch(there, empty)).all()
    assert object_patch(empty, empty).size == 0


def test_diagnosis_finds_the_training_picture_nearest_a_generated_one():
    from illume_rt.nano.diagnose import nearest_picture

    training = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert nearest_picture(np.array([1, 1, 0, 1]), training) == (1, 1)
    assert nearest_picture(np.array([1, 1, 1, 0]), training) == (2, 0)  # a copy
    assert nearest_picture(np.array([0, 1, 0, 0]), training) == (0, 1)  # a tie goes to the first row


def test_every_held_out_scenes_context_is_trained_at_the_other_size_only():
    # Diagnosis item 9 rests on this: a held-out scene's short caption was trained on its size partner alone.
    train, held = data.split()
    other = {"small": "large", "large": "small"}
    assert all(data.trained_sizes(s, train) == {other[s.size]} for s in held)
    assert data.trained_sizes(held[0], held) == {held[0].size}
    both = [s for s in train if data.trained_sizes(s, train) == set(data.SIZES)]
    assert 0 < len(both) < len(train)


def test_short_captions_train_only_contexts_seen_at_both_sizes():
    from illume_rt.nano import train as recipe

    train_scenes, held = data.split()
    allowed = dict(zip(train_scenes, recipe.short_caption_allowed(train_scenes)))
    # The training partner of every held-out scene (its context at the other size) never trains its short caption;
    # every other training scene does, in its share.
    partners = {s.with_("size", "large" if s.size == "small" else "small") for s in held}
    assert {s for s, ok in allowed.items() if not ok} == partners
    draws = np.arange(1000) / 1000
    for scene, ok in [(next(iter(partners)), False), (next(s for s in train_scenes if allowed[s]), True)]:
        prompts = [recipe.t2i_prompt(scene, ok, r) for r in draws]
        short = (1 - recipe.UNCOND_P) * (1 - recipe.FULL_CAPTION_P) if ok else 0  # within a draw: float edges
        assert abs(prompts.count(None) - 1000 * recipe.UNCOND_P) <= 1
        assert abs(prompts.count(scene.short_caption) - 1000 * short) <= 1
        assert prompts.count(scene.caption) + prompts.count(scene.short_caption) + prompts.count(None) == 1000


def test_diagnosis_tells_a_size_word_read_from_a_size_recalled_from_the_context():
    from illume_rt.nano.diagnose import size_word_marks

    asked = ["small", "large", "small", "large"]
    trained = [{"large"}, {"small"}, {"large"}, {"small"}]
    reads_the_word = size_word_marks(asked, asked, ["small", "small", "large", None], trained)
    assert reads_the_word == {"scenes": 4, "full_caption_draws_the_size_asked": 4,
                              "short_caption_draws_a_trained_size": 2, "full_and_short_caption_draw_the_same_size": 1}
    recalls = size_word_marks(asked, ["large", "small", "large", None], ["large", "small", "large", "small"], trained)
    assert recalls == {"scenes": 4, "full_caption_draws_the_size_asked": 0,
                       "short_caption_draws_a_trained_size": 4, "full_and_short_caption_draw_the_same_size": 3}
    unreadable = size_word_marks(["small"], [None], [None], [{"large"}])  # two unreadable pictures agree on nothing
    assert unreadable["full_and_short_caption_draw_the_same_size"] == 0


def test_diagnosis_marks_every_copied_code_at_its_own_position():
    """Part 7 (reconstruct_codes, code_marks): one mark per code of each level, in order, object codes flagged where
    the picture differs from its empty background; logits that give back the true next token are right on every
    code, logits that give back the empty picture's codes only on the background."""
    import torch

    from illume_rt.nano import diagnose, train

    preset = train.nano_preset()
    tok = train.nano_tokenizer(preset)
    empty = (torch.full((81,), 2, dtype=torch.long), torch.full((256,), 3, dtype=torch.long))
    sem, pix = empty[0].clone(), empty[1].clone()
    sem[40], pix[100:104] = 5, 7  # the object: one semantic cell, four pixel cells
    ids, labels = train.edit_example(preset, tok, None, sem.reshape(9, 9), pix.reshape(16, 16))

    def logits_for(next_ids):
        # (the input block's feature slots are negative placeholders, never a code: any row does there)
        return torch.nn.functional.one_hot(torch.tensor(next_ids).clamp(min=0), preset.vocab.vocab_rows).float()

    perfect = diagnose.code_marks(preset, logits_for(ids[1:]), ids, labels, sem, pix, empty)
    assert [len(perfect["semantic"]), len(perfect["pixel"])] == [81, 256]
    assert [k for k, (obj, _, _) in enumerate(perfect["semantic"]) if obj] == [40]
    assert [k for k, (obj, _, _) in enumerate(perfect["pixel"]) if obj] == [100, 101, 102, 103]
    assert all(right for level in perfect.values() for _, right, _ in level)
    _, empty_ids = train.edit_example(preset, tok, None, empty[0].reshape(9, 9), empty[1].reshape(16, 16))
    background_only = diagnose.code_marks(preset, logits_for(empty_ids[1:]), ids, labels, sem, pix, empty)
    assert all(right != obj for level in background_only.values() for obj, right, _ in level)
    llm, projectors = train.build_mllm(preset)  # random weights: the real forward, for the layout only
    marks = diagnose.reconstruct_codes(llm.eval(), projectors, preset, tok, sem, pix, torch.randn(81, 64),
                                       torch.randn(256, 8), empty)
    assert [len(marks["semantic"]), len(marks["pixel"])] == [81, 256]
    # on the editing prompt (copy_probe --fillers) the output block sits further on; the marks follow it
    asked = train.edit_example(preset, tok, "keep it as is", sem.reshape(9, 9), pix.reshape(16, 16))
    assert len(asked[0]) > len(ids)
    shifted = diagnose.code_marks(preset, logits_for(asked[0][1:]), *asked, sem, pix, empty)
    assert shifted == perfect
    marks = diagnose.reconstruct_codes(llm, projectors, preset, tok, sem, pix, torch.randn(81, 64),
                                       torch.randn(256, 8), empty, "keep it as is")
    assert [len(marks["semantic"]), len(marks["pixel"])] == [81, 256]


def test_copy_probe_fillers_ask_for_no_change_and_are_checked_beyond_the_lengths_trained():
    import numpy as np

    from illume_rt.nano import copy_probe

    rng = np.random.default_rng(0)
    for words in (1, 5, 12):
        instruction = copy_probe.filler_instruction(rng, words)
        assert len(instruction.split()) == words and set(instruction.split()) <= set(copy_probe.FILLER_WORDS)
    checks = copy_probe.filler_checks(12)
    assert min(checks) == 1 and 12 in checks and max(checks) > 12  # the last one is a distance never trained


def test_the_decoder_stages_train_beside_the_mllm_stages_only_when_both_are_to_do():
    from illume_rt.nano import train

    every = list(train.STAGES)
    assert train.side_chain(every, set(), jobs=2) == ["vae", "decoder"]
    assert train.side_chain(every, set(), jobs=1) == []
    assert train.side_chain(every, {"vae"}, jobs=2) == ["decoder"]
    done_mllm = {"semantic", "pixel", "tokens", "mllm", "focus", "edit", "polish"}
    assert train.side_chain(every, done_mllm, jobs=2) == []  # nothing to overlap with: in order, one process
    assert train.side_chain(["vae", "decoder", "export"], set(), jobs=2) == []
    assert train.side_chain(["polish", "decoder"], set(), jobs=2) == ["decoder"]
    # what the side chain is built on is trained before it starts, by the first process
    for stage in train.SIDE_CHAIN:
        assert set(train.BUILT_ON[stage]) <= set(train.SIDE_CHAIN) | set(train.TOKENIZER_STAGES)


def test_only_the_stages_after_the_side_chain_train_on_two_threads(monkeypatch):
    """The late MLLM stages take the core the side chain frees; every other stage keeps ``--threads``, and a
    machine with one core is never given two threads."""
    import os

    from illume_rt.nano import train

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [s for s in train.STAGES if train.stage_threads(s, 1) == 2] == ["edit", "polish"]
    assert train.stage_threads("edit", 4) == 4 and train.stage_threads("focus", 3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert train.stage_threads("edit", 1) == 1
    # each comes after focus, during which the side chain ends on this machine (the wait before them is
    # exercised by the smoke run of the whole command, not asserted here)
    assert all(train.STAGES.index(s) > train.STAGES.index("focus") for s in train.TWO_THREAD_STAGES)


def test_a_right_padded_training_batch_loses_its_padding_mask_and_nothing_else():
    """lm_loss gives the LLM no attention mask for pad_batch's right-padded batches (SDPA's causal kernel is
    faster): each row's loss must be what that row gives alone, unpadded, as with the padding mask; a batch padded
    anywhere else keeps its mask."""
    import torch

    from illume_rt.export.configs import PRESETS
    from illume_rt.nano import train

    preset = PRESETS["nano"]()
    llm, _ = train.build_mllm(preset)
    llm.config._attn_implementation = "sdpa"  # as _train_mllm trains
    g = torch.Generator().manual_seed(0)
    lengths = (23, 9, 16)
    seqs = [(ids, [-100] * 3 + ids[3:]) for ids in
            (torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths)]
    ids, labels, mask = train.pad_batch(seqs, preset.vocab.pad_id)
    assert mask[1, 9:].sum() == 0 and mask[1, :9].all()  # right padding: the case the mask is dropped for
    assert train.attention_mask_for(mask) is None
    embed = llm.get_input_embeddings()
    with torch.no_grad():
        for row, n in enumerate(lengths):
            alone = train.lm_loss(llm, embed(ids[row:row + 1, :n]), labels[row:row + 1, :n], mask[row:row + 1, :n])
            batched = train.lm_loss(llm, embed(ids[row:row + 1]), labels[row:row + 1], mask[row:row + 1])
            masked_logits = llm(inputs_embeds=embed(ids[row:row + 1]), attention_mask=mask[row:row + 1]).logits
            unmasked_logits = llm(inputs_embeds=embed(ids[row:row + 1])).logits
            assert torch.allclose(batched, alone, atol=1e-5), (row, batched, alone)
            assert torch.allclose(masked_logits[0, :n], unmasked_logits[0, :n], atol=1e-5)
    left = mask.flip(1)  # padded at the start: the causal mask alone would let real tokens see the pads
    assert train.attention_mask_for(left) is left


def test_input_slots_are_labelled_with_their_own_cells_codes_only_when_asked(monkeypatch):
    """SLOT_CODE_WEIGHT (an arm, 0 in the recipe): each feature slot of an input picture is labelled with its own
    cell's code, in the order embed_with_features fills the slots, and nothing else is; lm_loss adds the weight
    times those labels' mean cross-entropy at the slots' own outputs. At 0, nothing is labelled and the loss is the
    next-token loss alone."""
    import torch
    import torch.nn.functional as F

    from illume_rt.nano import train

    preset = train.nano_preset()
    v, tok = preset.vocab, train.nano_tokenizer(preset)
    g = torch.Generator().manual_seed(0)
    sem = torch.randint(0, v.semantic_codebook_size, (2, 81), generator=g)
    pix = torch.randint(0, v.pixel_codebook_size, (2, 256), generator=g)
    seqs = [train.edit_example(preset, tok, instruction, sem[0].reshape(9, 9), pix[0].reshape(16, 16))
            for instruction in ("make it large", None)]  # two lengths: the second row is padded
    ids, labels, mask = train.pad_batch(seqs, v.pad_id)
    assert train.slot_codes_for(v, ids, sem, pix) is None
    monkeypatch.setattr(train, "SLOT_CODE_WEIGHT", 0.5)
    slots = train.slot_codes_for(v, ids, sem, pix)
    for row in range(2):
        assert slots[row][ids[row] == train.SEM_SLOT].tolist() == (sem[row] + v.semantic_code_offset).tolist()
        assert slots[row][ids[row] == train.PIX_SLOT].tolist() == (pix[row] + v.pixel_code_offset).tolist()
        assert (slots[row] != -100).sum() == 81 + 256
    llm, projectors = train.build_mllm(preset)
    emb = train.embed_with_features(llm.get_input_embeddings(), projectors, ids, torch.randn(2, 81, 64),
                                    torch.randn(2, 256, 8))
    with torch.no_grad():
        plain = train.lm_loss(llm, emb, labels, mask)
        with_slots = train.lm_loss(llm, emb, labels, mask, slot_codes=slots)
        logits = llm(inputs_embeds=emb).logits
    at = slots != -100
    assert torch.allclose(with_slots - plain, 0.5 * F.cross_entropy(logits[at], slots[at]), atol=1e-5)


def _log_many(work, prefix, n):
    from illume_rt.nano import train

    for i in range(n):
        train.update_log(work, {f"{prefix}{i}": {"cpu_s": float(i)}})


def test_two_training_processes_finishing_stages_keep_each_others_log_entries(tmp_path):
    """The side chain's process and the first one both write log.json (the CPU seconds in training.json): neither
    may lose the other's entries."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_log_many, args=(tmp_path, prefix, 40)) for prefix in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert set(log) == {f"{p}{i}" for p in "ab" for i in range(40)}


def _folder_digest(folder):
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_the_one_training_command_writes_a_complete_weights_folder_where_it_is_told(tmp_path):
    """``python -m illume_rt.nano.train --work W --out DIR --seed 7`` as a user runs it, in its smoke mode (two steps
    of each stage, a few scenes; ``ILLUME_NANO_SMOKE``): every stage, the diffusion decoder's in a second process, then
    ``export`` and ``sampling`` (a temporary bundle of DIR, the candidates scored on it) write one complete weights
    folder into DIR, its sampling choices bound to those weights, and nothing into the committed weights."""
    import os
    import subprocess
    import sys

    from illume_rt.nano import train
    from illume_rt.nano.checkpoint import NanoWeights, available, decoder_digest, weights_digest
    from illume_rt.nano.evaluate import TEMPORARY_BUNDLE_PREFIX

    committed = _folder_digest(WEIGHTS) if WEIGHTS.is_dir() else None
    work, out = tmp_path / "work", NanoWeights(tmp_path / "my-nano")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "ILLUME_NANO_SMOKE": "1", "ILLUME_RT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(tmp_path / "tmp")}
    run = subprocess.run([sys.executable, "-m", "illume_rt.nano.train", "--work", str(work), "--out", str(out.root),
                          "--seed", "7"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert available(out) and (out.decoder / "model_index.json").is_file()
    training = json.loads((out.root / "training.json").read_text())
    assert set(training) == set(train.BUILT_ON) and all(training[s]["cpu_s"] > 0 for s in train.BUILT_ON)
    # the seed reached every stage, the side chain's process included, and each logs the machine it finished on
    assert {s: training[s]["seed"] for s in train.BUILT_ON} == {s: 7 for s in train.BUILT_ON}
    assert {s: training[s]["finished_on"] for s in train.BUILT_ON} == {s: train.machine() for s in train.BUILT_ON}
    sampling = json.loads(out.sampling_file.read_text())
    assert sampling["weights_sha256"] == weights_digest(out) and sampling["edits"] > 0
    assert json.loads(out.refine_file.read_text())["decoder_sha256"] == decoder_digest(out)
    if committed is not None:
        assert _folder_digest(WEIGHTS) == committed, "the committed weights changed"
    assert not list((tmp_path / "tmp").glob(TEMPORARY_BUNDLE_PREFIX + "*")), "the temporary bundle was left behind"


def test_training_on_a_gpu_this_torch_cannot_see_is_refused_with_one_line_before_anything_is_written(tmp_path):
    """``--device cuda`` where torch sees no CUDA GPU (this machine, CI) stops at once with the fix, before the work
    folder is made or seeded."""
    import torch

    from illume_rt.nano import train

    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA GPU: the refusal is for machines without one")
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as stop:
        train.main(["mllm", "--work", str(work), "--device", "cuda", "--seed-from", str(WEIGHTS)])
    message = str(stop.value)
    assert "--device cuda" in message and "leave --device out" in message and "\n" not in message
    assert not work.exists()


def test_the_mllm_stages_batches_and_features_go_to_the_training_device(monkeypatch):
    """pad_batch puts each batch on DEVICE and embed_with_features brings the pictures' features (kept on the CPU in
    tokens.pt) to the ids' device, so that ``--device cuda`` trains with nothing left behind on the CPU. Checked
    with the meta device, the one other device every torch build has."""
    import torch

    from illume_rt.nano import train

    monkeypatch.setattr(train, "DEVICE", torch.device("meta"))
    ids, labels, mask = train.pad_batch([([1, 2, 3], [-100, 2, 3]), ([4], [4])], 0)
    assert {t.device.type for t in (ids, labels, mask)} == {"meta"}
    seen = []

    class Projector(torch.nn.Module):  # records the device its input arrives on
        def forward(self, x):
            seen.append(x.device.type)
            return x

    proj = torch.nn.Module()
    proj.projector_1, proj.projector_2 = Projector(), Projector()
    emb = train.embed_with_features(torch.nn.Embedding(8, 4, device="meta"), proj, ids, torch.zeros(2, 81, 4),
                                    torch.zeros(2, 256, 4))
    assert seen == ["meta", "meta"] and emb.device.type == "meta" and emb.shape == (2, 3, 4)


def test_the_side_chain_starts_with_the_command_and_its_decoder_waits_for_the_tokenizer(tmp_path, monkeypatch):
    """``vae`` is built on nothing, so the second process starts before the first trains anything, told to wait
    for the tokenizer stages the first one is to train (none when they are done); the first process skips the
    side chain's stages."""
    from illume_rt.nano import train

    events = []
    monkeypatch.setattr(train, "start_side_chain", lambda args, side, wait_for=(): events.append(
        ("side", tuple(side), tuple(wait_for))) or None)
    monkeypatch.setattr(train, "run_stage", lambda name, args: events.append(name))
    train.main(["--work", str(tmp_path / "a")])
    assert events[0] == ("side", ("vae", "decoder"), ("semantic", "pixel"))
    assert events[1:] == ["semantic", "pixel", "tokens", "mllm", "focus", "edit", "polish", "export", "sampling"]
    events.clear()
    for name in ("semantic", "pixel"):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / f"{name}.pt").write_bytes(b"")
    train.main(["--work", str(tmp_path / "b"), "mllm", "vae", "decoder"])
    assert events == [("side", ("vae", "decoder"), ()), "mllm"]


def test_a_stage_waiting_for_states_goes_on_once_they_are_written(tmp_path):
    import threading
    import time

    from illume_rt.nano import train

    train.wait_for_states(tmp_path, [])  # nothing to wait for: returns at once
    threading.Timer(0.3, lambda: (tmp_path / "pixel.pt").write_bytes(b"")).start()
    start = time.monotonic()
    train.wait_for_states(tmp_path, ["pixel"], poll_s=0.05)
    assert (tmp_path / "pixel.pt").is_file() and time.monotonic() - start >= 0.25
