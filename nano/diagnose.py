"""Why illume-nano does or does not draw what it is asked: the evidence behind nano/README.md's "Diagnosis".

``python -m illume_rt.nano.diagnose [--llm-state WORK/STAGE.pt] [--scenes N]`` (default: the committed weights):

1. tokenizer: which level carries which attribute. Canonical pictures are encoded, then decoded with the semantic
   codes of one scene and the pixel codes of a scene that differs in one attribute; the scorer says whose value
   shows. Also how pure the semantic codes of object cells are by colour and by shape.
2. MLLM, teacher forced on training captions: cross-entropy and argmax accuracy of the image codes, split into
   background codes (equal to the code the same background's empty picture has there) and object codes.
3. The decision: at the first object code of the semantic level (the code that starts the object and so decides
   its colour), log p of the right code and the probability mass on codes of the right colour, under the true
   caption, under the caption with another colour word, and under the unconditional prompt. A model that reads
   the colour word gives the true caption clearly more than the wrong one. Also the total variation of that
   code's distribution when one caption word (colour, shape, size, position, background) changes.
4. Held out: a held-out picture's codes that no training picture has at the same position (``unseen_at_position``),
   and the teacher-forced argmax accuracy of the held-out pictures' object codes (full captions), split into those
   seen at their position in training and those not. A model that only recalls codes where it saw them gets the
   second group wrong, whatever the caption says. And how many held-out objects are, at the semantic level, a
   training picture's object shifted by whole cells (``object_patch``): only those could be drawn by moving a
   pattern the model has drawn elsewhere.
5. Held out, generated: for each held-out full caption, the greedy picture's semantic codes (nano's own guidance,
   PyTorch reference) against the held-out picture's own codes and against every training picture's. A model that
   composes the caption's words lands nearest its own picture; one that recalls training pictures lands nearer a
   training picture, and the attributes that picture differs in are the ones it got wrong.
6. Held out, the size word: the size read from the greedy picture of each held-out scene's full caption and of its
   short (size-free) one, against the size asked and the sizes the training split has that scene's context at (for
   a held-out scene, only the other size). A model that reads the size word draws the size asked; one that learned
   to draw the size without it (from the short captions) draws its context's trained size for both prompts.
7. Held out, copied: teacher forced on the reconstruct prompt (the held-out picture's features in, its own codes
   out, the true codes fed), the argmax accuracy of object and background codes per level. ``edit`` keeps what it
   copies; a code missed here is one an edit cannot keep.
8. Input features, mirrored: whether the MLLM's two input streams (ViT merger output, pixel-encoder output) can
   tell left from right or top from bottom. For the held-out pictures, the relative L2 distance between the
   features of the mirrored picture and the picture's features mirrored the same way (0: the encoders are mirror-
   equivariant, so the features say what is where only relative to each other, and where on the canvas must come
   from the LLM's own positions of the input tokens), beside the distance to the unmirrored features.
9. Held out, edited: which level loses what an edit should keep. Each held-out edit (``heldout.eval_edits``) is
   decoded greedily at nano's editing guidance (1.0: the conditional row alone) twice, in PyTorch: free (the
   reference of the runtime's greedy edit) and with the semantic level given (the edited scene's own semantic
   codes fed, the pixel level greedy). Both are decoded by the tokenizer and scored as the evaluation scores edits
   (``heldout.score_edits``'s 'kept_by_attribute'), and the free run's semantic codes are compared with the
   edited scene's where either differs from the empty background's (the object's cells). If an attribute is kept
   far more often with the semantic level given, the semantic codes are where the edit loses it; if not, the
   pixel level loses it even when told the semantic codes. ``--edits-only`` runs this part alone.
10. Held out, drawn: the same question for drawing from captions. Each held-out prompt (``heldout.eval_prompts``:
   full and short captions) is drawn greedily in PyTorch at the committed text-to-image guidance three ways: free
   (the reference of the runtime's greedy drawing), with the scene's own semantic codes fed, and with them fed under
   the unconditional prompt alone (no caption, guidance 1.0: what the pixel level draws from the semantic codes
   with no word to read). Beside part 9 it says whether the pixel level reads an attribute from the caption, from
   the semantic codes, or, in an edit, from the input picture. ``--drawing-only`` runs this part alone.
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch
import torch.nn.functional as F

from illume_rt.contract import PIXEL, SEMANTIC, image_grid
from illume_rt.nano import data, score
from illume_rt.nano import train as T
from illume_rt.nano.checkpoint import COMMITTED, load_models

# nano's code grids (one resolution): every reshape and row offset below reads them
SEMANTIC_GRID = image_grid(data.IMAGE_SIZE, data.IMAGE_SIZE).level_shape(SEMANTIC)
PIXEL_GRID = image_grid(data.IMAGE_SIZE, data.IMAGE_SIZE).level_shape(PIXEL)


def tokenizer_modules():
    preset = T.nano_preset()
    enc, _, pixel = T.build_tokenizer_modules(preset)
    state = torch.load(COMMITTED.dualvitok, weights_only=True)
    enc.load_state_dict({k[len("semantic_encoder."):]: v for k, v in state.items()
                         if k.startswith("semantic_encoder.")})
    pixel.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith(("semantic_encoder.", "semantic_decoder."))})
    return enc.eval(), pixel.eval()


@torch.no_grad()
def encode(enc, pixel, scenes):
    x = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in scenes]))
    sem = pixel.semantic_quantizer.nearest_indices(enc(x))
    pix = pixel.pixel_quantizer.nearest_indices(pixel.pixel_quant_conv(pixel.pixel_encoder(x)))
    return sem.reshape(len(scenes), -1), pix.reshape(len(scenes), -1)


@torch.no_grad()
def decoded_pictures(pixel, sem, pix) -> np.ndarray:
    """The tokenizer's pictures (uint8 [B, H, W, 3]) of codes ``sem`` [B, 81] and ``pix`` [B, 256]."""
    rec = pixel.decode_code(sem.reshape(-1, *SEMANTIC_GRID), pix.reshape(-1, *PIXEL_GRID))
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def decoded_scores(pixel, sem, pix, scenes):
    imgs = decoded_pictures(pixel, sem, pix)
    return score.summarize([score.score_picture(im, {a: getattr(s, a) for a in data.ATTRIBUTES})
                            for im, s in zip(imgs, scenes)])


@torch.no_grad()
def level_swaps(enc, pixel) -> dict:
    """Part 1: for colour, shape and size, each held-out scene's semantic codes decoded with the pixel codes of a
    scene that differs in that attribute (and the other way round): how often the picture shows the semantic
    scene's value, and how often the pixel scene's."""
    swaps = {}
    for attr in ("colour", "shape", "size"):
        a, b = [], []
        for s in data.split()[1]:
            for value in data.CHOICES[attr]:
                t = data.Scene(**{**s.__dict__, attr: value})
                if value != getattr(s, attr) and t.colour != t.background:
                    a.append(s), b.append(t)
                    break
        (sa, pa), (sb, pb) = encode(enc, pixel, a), encode(enc, pixel, b)
        swaps[attr] = {"semantic_codes_decide": decoded_scores(pixel, sa, pb, a)[attr],
                       "pixel_codes_decide": decoded_scores(pixel, sb, pa, a)[attr]}
    return swaps


def mirror_equivariance(enc, pixel, x: torch.Tensor) -> dict:
    """Part 8 for pictures ``x`` [B, 3, H, W]: per stream and axis, the relative L2 distance of the mirrored
    picture's features to the mirrored features and to the plain features."""
    def streams(images):  # [B, rows, cols, channels]
        return {"semantic": enc.features(images).reshape(len(images), *SEMANTIC_GRID, -1),
                "pixel": pixel.pixel_encoder(images).permute(0, 2, 3, 1)}

    def distance(a, b) -> float:
        return round(float((a - b).norm() / a.norm()), 3)

    plain, out = streams(x), {}
    for axis, image_dim, grid_dim in (("left_right", 3, 2), ("top_bottom", 2, 1)):
        mirrored = streams(x.flip(image_dim))
        for name, features in plain.items():
            out[f"{name}_{axis}"] = {"to_mirrored_features": distance(features.flip(grid_dim), mirrored[name]),
                                     "to_plain_features": distance(features, mirrored[name])}
    return out


def unseen_at_position(train_codes: np.ndarray, held_codes: np.ndarray) -> np.ndarray:
    """Boolean [held pictures, positions]: True where a held-out picture's code occurs at that position in no
    training picture (``*_codes``: [pictures, positions] of one level)."""
    seen = [set(column.tolist()) for column in train_codes.T]
    return np.array([[code not in seen[j] for j, code in enumerate(row.tolist())] for row in held_codes], dtype=bool)


def object_patch(grid: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """The codes of ``grid`` ([side, side]) inside the box of the cells that differ from ``empty`` (the
    background's empty picture): the object as a pattern, wherever it sits."""
    rows, cols = np.nonzero(grid != empty)
    return grid[rows.min():rows.max() + 1, cols.min():cols.max() + 1] if len(rows) else grid[:0, :0]


def nearest_picture(codes: np.ndarray, pictures: np.ndarray) -> tuple[int, int]:
    """(row, Hamming distance) of the row of ``pictures`` ([pictures, positions]) with the fewest codes different
    from ``codes`` ([positions]); the first such row on ties."""
    distance = (pictures != codes[None]).sum(1)
    row = int(distance.argmin())
    return row, int(distance[row])


def size_word_marks(asked: list[str], full_drawn: list, short_drawn: list, trained: list[set[str]]) -> dict:
    """Part 6 over scenes i: ``asked[i]`` the size its full caption names, ``full_drawn[i]`` / ``short_drawn[i]``
    the size read from the picture drawn for its full / short caption (None when unreadable), ``trained[i]`` the
    sizes the training split has its context at (``data.trained_sizes``)."""
    return {"scenes": len(asked),
            "full_caption_draws_the_size_asked": sum(a == f for a, f in zip(asked, full_drawn)),
            "short_caption_draws_a_trained_size": sum(d in t for d, t in zip(short_drawn, trained)),
            "full_and_short_caption_draw_the_same_size": sum(f is not None and f == d
                                                             for f, d in zip(full_drawn, short_drawn))}


def teacher_forced_codes(llm, preset, tok, scene, sem, pix, empty_codes):
    """Teacher forced on ``scene``'s full caption: per level ('semantic', 'pixel'), for each of its codes in
    order, (is an object code, argmax right, cross-entropy). ``empty_codes``: that background's empty picture's
    (semantic, pixel) codes, which tell background codes from object codes."""
    ids, labels = T.t2i_example(preset, tok, scene, sem.reshape(SEMANTIC_GRID), pix.reshape(PIXEL_GRID), scene.caption)
    with torch.no_grad():
        logits = llm(input_ids=torch.tensor([ids])).logits[0, :-1]
    return code_marks(preset, logits, ids, labels, sem, pix, empty_codes)


def reconstruct_codes(llm, projectors, preset, tok, sem, pix, vit, pixel_features, empty_codes,
                      instruction: str | None = None):
    """As teacher_forced_codes, on the reconstruct prompt (``edit`` without instruction; else the editing prompt
    with ``instruction``, which then must ask for no change): the picture's features (``vit`` [81, 64],
    ``pixel_features`` [256, 8]) in, its own codes out, the true codes fed. Every code is there to be copied from
    the same cell of the input; a miss is a code the model does not copy."""
    ids, labels = T.edit_example(preset, tok, instruction, sem.reshape(SEMANTIC_GRID), pix.reshape(PIXEL_GRID))
    with torch.no_grad():
        embeds = T.embed_with_features(llm.get_input_embeddings(), projectors, torch.tensor([ids]), vit[None],
                                       pixel_features[None])
        logits = llm(inputs_embeds=embeds).logits[0, :-1]
    return code_marks(preset, logits, ids, labels, sem, pix, empty_codes)


def code_marks(preset, logits, ids, labels, sem, pix, empty_codes):
    """Per level, (is an object code, argmax right, cross-entropy) for each code of ``sem`` / ``pix`` in ``ids``,
    from the next-token ``logits`` of ``ids`` (one row per position but the last)."""
    v = preset.vocab
    target = torch.tensor(ids[1:]).clamp(min=0)  # an input picture's feature slots (negative) are never codes
    nll = (-F.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]).tolist()
    right = (logits.argmax(-1) == target).tolist()
    pos = [k for k in range(len(ids) - 1) if labels[k + 1] != -100]
    out = {}
    for level, offset, size, codes, plain in (
            ("semantic", v.semantic_code_offset, v.semantic_codebook_size, sem, empty_codes[0]),
            ("pixel", v.pixel_code_offset, v.pixel_codebook_size, pix, empty_codes[1])):
        where = [k for k in pos if offset <= ids[k + 1] < offset + size]
        out[level] = [(is_obj, right[k], nll[k]) for k, is_obj in zip(where, (codes != plain).tolist())]
    return out


@torch.no_grad()
def _greedy_codes(llm, v, layout: list[int], cond_prompt, uncond_prompt=None, guidance: float = 1.0,
                  semantic_given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic, pixel) codes decoded greedily along ``layout`` (an image's tokens from <start_of_image> on, every
    code 0: the level's first code marks a code's place), the conditional row primed with ``cond_prompt`` (ids, or
    a [length, hidden] tensor of embeddings) and, with ``guidance`` != 1, the unconditional row with
    ``uncond_prompt``. Each level is restricted to its own codes as the runtime's masks restrict it; guidance mixes
    the rows' log-probabilities as the reference loop does (the runtime's raw-logit mix differs by one constant per
    step, so the argmax is the same). ``semantic_given``: the semantic codes fed instead of the model's (the pixel
    level stays greedy)."""
    from illume_rt.export.reference import _Stream  # the reference loop's one sequence with its cache

    codebook_size = {v.semantic_code_offset: v.semantic_codebook_size, v.pixel_code_offset: v.pixel_codebook_size}
    rows = [_Stream(llm, cond_prompt)] + ([_Stream(llm, uncond_prompt)] if guidance != 1.0 else [])
    drawn: dict[int, list[int]] = {v.semantic_code_offset: [], v.pixel_code_offset: []}
    for k, token in enumerate(layout):
        if token in codebook_size:
            offset = token
            if offset == v.semantic_code_offset and semantic_given is not None:
                code = int(semantic_given[len(drawn[offset])])
            else:
                scores = [F.log_softmax(row.logits[0].double(), -1)[offset:offset + codebook_size[offset]]
                          for row in rows]
                guided = scores[0] if len(rows) == 1 else guidance * (scores[0] - scores[1]) + scores[1]
                code = int(guided.argmax())
            drawn[offset].append(code)
            token = offset + code
        if k + 1 < len(layout):
            for row in rows:
                row.feed(token)
    return torch.tensor(drawn[v.semantic_code_offset]), torch.tensor(drawn[v.pixel_code_offset])


def greedy_edit_codes(llm, projectors, preset, tok, instruction: str | None, vit, pixel_features,
                      semantic_given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic, pixel) codes of nano's greedy edit of one picture (its features ``vit`` [81, 64],
    ``pixel_features`` [256, 8]) at guidance 1.0 (``_greedy_codes``). The layout (prompt, structure tokens, where
    each code goes) is ``train.edit_example``'s, read from an example whose codes are all 0."""
    ids, labels = T.edit_example(preset, tok, instruction, torch.zeros(SEMANTIC_GRID, dtype=torch.long),
                                 torch.zeros(PIXEL_GRID, dtype=torch.long))
    prefix = next(k for k, label in enumerate(labels) if label != -100)
    with torch.no_grad():
        prompt = T.embed_with_features(llm.get_input_embeddings(), projectors, torch.tensor([ids[:prefix]]),
                                       vit[None], pixel_features[None])[0]
    return _greedy_codes(llm, preset.vocab, ids[prefix:], prompt, semantic_given=semantic_given)


def greedy_draw_codes(llm, preset, tok, caption: str | None, guidance: float,
                      semantic_given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic, pixel) codes of nano's greedy drawing of ``caption`` (``None``: the unconditional prompt alone)
    at ``guidance`` against the unconditional prompt (``_greedy_codes``); the layout is ``train.t2i_example``'s."""
    zeros = torch.zeros(SEMANTIC_GRID, dtype=torch.long), torch.zeros(PIXEL_GRID, dtype=torch.long)
    ids, labels = T.t2i_example(preset, tok, None, *zeros, caption)
    uncond, uncond_labels = T.t2i_example(preset, tok, None, *zeros, None)
    prefix = next(k for k, label in enumerate(labels) if label != -100)
    uncond_prefix = next(k for k, label in enumerate(uncond_labels) if label != -100)
    return _greedy_codes(llm, preset.vocab, ids[prefix:], ids[:prefix], uncond[:uncond_prefix], guidance,
                         semantic_given)


def edit_levels(llm, projectors, preset, tok, enc, pixel, codes_of, empty, limit: int | None = None) -> dict:
    """Part 9 over the held-out edits (``limit``: the first so many): per decoding ('free', 'semantic_given'),
    each attribute's 'kept' over the edits not asking for it, 'asked', and 'right'; and the free run's semantic
    codes right on the object's cells. ``codes_of(scene)``: its (semantic, pixel) codes; ``empty[background]``:
    that background's empty picture's codes."""
    from illume_rt.nano.heldout import edit_figures, edit_kind, eval_edits

    edits = eval_edits(limit, "held")
    sources = list(dict.fromkeys(scene for scene, _, _ in edits))
    x = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in sources]))
    with torch.no_grad():
        vit, pixel_features = enc.features(x), pixel.pixel_encoder(x).flatten(2).transpose(1, 2)
    rows = collections.defaultdict(list)
    object_codes_right = []
    for scene, instruction, target in edits:
        n = sources.index(scene)
        want_sem, _ = codes_of(target)
        wanted = {a: getattr(target, a) for a in data.ATTRIBUTES}
        kind = edit_kind(scene, target)
        for mode, given in (("free", None), ("semantic_given", want_sem)):
            sem, pix = greedy_edit_codes(llm, projectors, preset, tok, instruction, vit[n], pixel_features[n], given)
            rows[mode].append((kind, score.score_picture(decoded_pictures(pixel, sem, pix)[0], wanted)))
            if given is None:
                on_object = (want_sem != empty[target.background][0]) | (sem != empty[target.background][0])
                object_codes_right += (sem == want_sem)[on_object].tolist()
    out = {"edits": len(edits)}
    for mode, marks in rows.items():
        figures = edit_figures(marks)
        out[mode] = {key: round(figures[key], 3) for key in ("right", "asked", "kept")}
        out[mode]["kept_by_attribute"] = {a: round(x, 3) for a, x in figures["kept_by_attribute"].items()}
    out["free"]["semantic_object_codes_right"] = round(float(np.mean(object_codes_right)), 3)
    return out


def drawing_levels(llm, preset, tok, pixel, codes_of, guidance: float, limit: int | None = None) -> dict:
    """Part 10 over the held-out prompts (``heldout.eval_prompts``; ``limit``: the first so many): each
    attribute's share right, all of them, and how often each shape was read as each, per decoding: 'free' (the
    caption at ``guidance``: the runtime's greedy drawing), 'semantic_given' (the same, the scene's own semantic
    codes fed) and 'semantic_given_no_caption' (the unconditional prompt alone, the scene's semantic codes fed:
    what the pixel level draws from the semantic codes with no word to read). ``codes_of(scene)``: its (semantic,
    pixel) codes."""
    from illume_rt.nano.heldout import eval_prompts, eval_scenes

    scenes = eval_scenes("held")
    prompts = list(zip(scenes * 2, eval_prompts(limit, "held")))  # each scene's full caption, then its short one
    marks = collections.defaultdict(list)
    shapes_read = collections.defaultdict(collections.Counter)  # per decoding: "asked -> read" shapes
    for scene, (caption, wanted) in prompts:
        semantic = codes_of(scene)[0]
        for mode, prompt, given in (("free", caption, None), ("semantic_given", caption, semantic),
                                    ("semantic_given_no_caption", None, semantic)):
            sem, pix = greedy_draw_codes(llm, preset, tok, prompt, guidance if prompt else 1.0, given)
            picture = decoded_pictures(pixel, sem, pix)[0]
            marks[mode].append(score.score_picture(picture, wanted))
            shapes_read[mode][f"{scene.shape} -> {score.read_scene(picture)['shape']}"] += 1
    return {"prompts": len(marks["free"]), "guidance": guidance,
            **{mode: {**{a: round(x, 3) for a, x in score.summarize(m).items()},
                      "shapes_read": dict(sorted(shapes_read[mode].items()))} for mode, m in marks.items()}}


def reference_models(llm_state: str | None):
    """The committed weights as ``ReferenceModels``, their LLM and projectors from ``llm_state`` if given."""
    models = load_models()
    if llm_state:
        state = torch.load(llm_state, weights_only=True)["modules"]
        models.llm.load_state_dict(state["llm"])
        models.projectors.load_state_dict(state["projectors"])
    models.llm.eval()
    return models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm-state", default=None, help="a finished or partial MLLM stage state (mllm.pt, focus.pt)")
    ap.add_argument("--scenes", type=int, default=30, help="training scenes for parts 2 and 3")
    ap.add_argument("--edits-only", action="store_true", help="part 9 alone")
    ap.add_argument("--edits", type=int, default=None, help="part 9 on the first so many held-out edits (of 225)")
    ap.add_argument("--drawing-only", action="store_true", help="part 10 alone")
    ap.add_argument("--prompts", type=int, default=None, help="part 10 on the first so many held-out prompts (of 90)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out: dict = {}
    enc, pixel = tokenizer_modules()
    scenes = data.all_scenes()
    S, P = encode(enc, pixel, scenes)
    empty = {}  # per background: the codes of its empty picture (the mode over its scenes at each position)
    for bg in data.BACKGROUNDS:
        rows = [i for i, s in enumerate(scenes) if s.background == bg]
        empty[bg] = (S[rows].mode(0).values, P[rows].mode(0).values)

    def codes_of(scene):
        i = scenes.index(scene)
        return S[i], P[i]

    def edited(models) -> dict:
        return edit_levels(models.llm, models.projectors, models.preset, T.nano_tokenizer(models.preset), enc, pixel,
                           codes_of, empty, args.edits)

    def drawn(models) -> dict:
        # the committed weights' text-to-image guidance (nano/choose_sampling.py's choice), whatever the LLM state
        guidance = json.loads(COMMITTED.sampling_file.read_text())["text_to_image"]["guidance_scale"]
        return drawing_levels(models.llm, models.preset, T.nano_tokenizer(models.preset), pixel, codes_of, guidance,
                              args.prompts)

    if args.edits_only or args.drawing_only:
        models = reference_models(args.llm_state)
        print(json.dumps({**({"held_out_edited": edited(models)} if args.edits_only else {}),
                          **({"held_out_drawn": drawn(models)} if args.drawing_only else {})}, indent=1))
        return 0

    # 1. which level carries what
    swaps = level_swaps(enc, pixel)
    by_colour, by_shape = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for s, row in zip(scenes, S):
        for c in row[row != empty[s.background][0]].tolist():
            by_colour[c][s.colour] += 1
            by_shape[c][s.shape] += 1

    def purity(table):
        return sum(max(c.values()) for c in table.values()) / sum(sum(c.values()) for c in table.values())

    out["tokenizer"] = {"attribute_shows_from": swaps, "object_semantic_code_purity": {
        "colour": round(purity(by_colour), 3), "shape": round(purity(by_shape), 3),
        "chance_colour": 0.25, "chance_shape": 0.333}}
    colour_of = {c: max(k, key=k.get) for c, k in by_colour.items()}

    # 2 and 3: the MLLM
    models = reference_models(args.llm_state)
    llm, preset = models.llm.eval(), models.preset
    v, tok = preset.vocab, T.nano_tokenizer(preset)
    sem_rows = range(v.semantic_code_offset, v.semantic_code_offset + v.semantic_codebook_size)
    nll = collections.defaultdict(list)
    acc = collections.defaultdict(list)
    decision = []
    tv = collections.defaultdict(list)
    train = data.split()[0]
    for s in train[::max(1, len(train) // args.scenes)][:args.scenes]:
        i = scenes.index(s)
        for level, marks in teacher_forced_codes(llm, preset, tok, s, S[i], P[i], empty[s.background]).items():
            for is_obj, right, ce in marks:
                key = f"{level}_{'object' if is_obj else 'background'}"
                nll[key].append(ce)
                acc[key].append(right)
        first = int((S[i] != empty[s.background][0]).float().argmax())
        other = next(c for c in data.COLOURS if c not in (s.colour, s.background))
        row = []
        for prompt in (s.caption, s.caption.replace(f" {s.colour} ", f" {other} ", 1), None):
            pids, _ = T.t2i_example(preset, tok, s, S[i].reshape(SEMANTIC_GRID), P[i].reshape(PIXEL_GRID), prompt)
            k = pids.index(v.start_of_level0_id) + first + first // SEMANTIC_GRID[1]  # codes and <end_of_line>s before it
            assert pids[k + 1] == v.semantic_code_offset + int(S[i][first])
            with torch.no_grad():
                p = F.softmax(llm(input_ids=torch.tensor([pids[:k + 1]])).logits[0, -1, sem_rows.start:sem_rows.stop], -1)
            row += [float(torch.log(p[int(S[i][first])])),
                    sum(p[c].item() for c, col in colour_of.items() if col == s.colour)]
        decision.append(row)

        def first_code_probs(caption):
            pids, _ = T.t2i_example(preset, tok, s, S[i].reshape(SEMANTIC_GRID), P[i].reshape(PIXEL_GRID), caption)
            at = pids.index(v.start_of_level0_id) + first + first // SEMANTIC_GRID[1]
            with torch.no_grad():
                logits = llm(input_ids=torch.tensor([pids[:at + 1]])).logits[0, -1]
            return F.softmax(logits[sem_rows.start:sem_rows.stop], -1)

        base = first_code_probs(s.caption)
        for attr in data.ATTRIBUTES:  # the first other value that makes a valid scene
            for value in data.CHOICES[attr]:
                t = data.Scene(**{**s.__dict__, attr: value})
                if value != getattr(s, attr) and t.colour != t.background:
                    tv[attr].append(0.5 * float((first_code_probs(t.caption) - base).abs().sum()))
                    break
    out["teacher_forced"] = {k: {"tokens": len(nll[k]), "nll": round(float(np.mean(nll[k])), 3),
                                 "argmax_accuracy": round(float(np.mean(acc[k])), 3)} for k in sorted(nll)}
    d = np.array(decision)
    names = ("true_caption", "wrong_colour_caption", "unconditional")
    out["first_object_semantic_code"] = {
        "log_p_right_code": {n: round(float(d[:, 2 * j].mean()), 2) for j, n in enumerate(names)},
        "p_right_colour_codes": {n: round(float(d[:, 2 * j + 1].mean()), 3) for j, n in enumerate(names)},
        "true_beats_wrong_colour": round(float((d[:, 0] > d[:, 2]).mean()), 3),
        "total_variation_when_one_word_changes": {a: round(float(np.mean(x)), 3) for a, x in tv.items()}}

    # 4. held out: codes never seen at their position, and whether the model gets them
    train_rows = [i for i, s in enumerate(scenes) if not data.is_held_out(s)]
    held_rows = [i for i, s in enumerate(scenes) if data.is_held_out(s)]
    unseen = {level: unseen_at_position(codes[train_rows].numpy(), codes[held_rows].numpy())
              for level, codes in (("semantic", S), ("pixel", P))}
    translated = 0
    for i in held_rows:
        s, empty_grid = scenes[i], empty[scenes[i].background][0].reshape(SEMANTIC_GRID).numpy()
        patch = object_patch(S[i].reshape(SEMANTIC_GRID).numpy(), empty_grid)
        twins = [j for j in train_rows if all(getattr(scenes[j], a) == getattr(s, a)
                                              for a in ("shape", "colour", "size", "background"))]
        translated += any(np.array_equal(object_patch(S[j].reshape(SEMANTIC_GRID).numpy(), empty_grid), patch) for j in twins)
    held_acc = collections.defaultdict(list)
    for n, i in enumerate(held_rows):
        s = scenes[i]
        for level, marks in teacher_forced_codes(llm, preset, tok, s, S[i], P[i], empty[s.background]).items():
            for (is_obj, right, _), new in zip(marks, unseen[level][n].tolist()):
                if is_obj:
                    held_acc[f"{level}_object_{'unseen' if new else 'seen'}_at_position"].append(right)
    out["held_out"] = {
        "pictures_with_codes_unseen_at_position": {level: int(u.any(1).sum()) for level, u in unseen.items()},
        "pictures": len(held_rows),
        "semantic_object_is_a_training_object_shifted_by_whole_cells": translated,
        "unseen_codes_per_picture": {level: round(float(u.sum(1).mean()), 2) for level, u in unseen.items()},
        "teacher_forced_object_codes": {k: {"tokens": len(x), "argmax_accuracy": round(float(np.mean(x)), 3)}
                                        for k, x in sorted(held_acc.items())}}

    # 5. held out, generated: the asked picture, or a training picture?
    from illume_rt.nano.evaluate import reference_generate

    train_codes = S[train_rows].numpy()
    own, nearer_training, copied = 0, 0, 0
    differs = collections.Counter()
    full_drawn = []
    for i in held_rows:
        picture, generated, _ = reference_generate(models, scenes[i].caption)
        full_drawn.append(score.read_scene(picture)["size"])
        generated = generated.reshape(-1)
        row, to_training = nearest_picture(generated, train_codes)
        to_own = int((S[i].numpy() != generated).sum())
        own += to_own == 0
        copied += to_training == 0
        if to_training < to_own:
            nearer_training += 1
            differs.update(a for a in data.ATTRIBUTES if getattr(scenes[train_rows[row]], a) != getattr(scenes[i], a))
    out["held_out_generated"] = {
        "pictures": len(held_rows), "semantic_codes_equal_its_own": own,
        "nearer_a_training_picture_than_its_own": nearer_training, "semantic_codes_equal_a_training_picture": copied,
        "that_training_picture_differs_in": {a: differs[a] for a in data.ATTRIBUTES}}

    # 6. held out, the size word: read, or drawn from the context as the short captions taught?
    held = [scenes[i] for i in held_rows]
    short_drawn = [score.read_scene(reference_generate(models, s.short_caption)[0])["size"] for s in held]
    train_scenes = [scenes[i] for i in train_rows]
    out["held_out_size_word"] = size_word_marks([s.size for s in held], full_drawn, short_drawn,
                                                [data.trained_sizes(s, train_scenes) for s in held])

    # 7. held out, copied: the reconstruct prompt, teacher forced
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in held]))
        vit, pixel_features = enc.features(x), pixel.pixel_encoder(x).flatten(2).transpose(1, 2)
    copied_marks = collections.defaultdict(list)
    for n, i in enumerate(held_rows):
        marks = reconstruct_codes(llm, models.projectors, preset, tok, S[i], P[i], vit[n], pixel_features[n],
                                  empty[scenes[i].background])
        for level, level_marks in marks.items():
            for is_obj, right, _ in level_marks:
                copied_marks[f"{level}_{'object' if is_obj else 'background'}"].append(right)
    out["held_out_copied"] = {k: {"tokens": len(marks), "argmax_accuracy": round(float(np.mean(marks)), 3)}
                              for k, marks in sorted(copied_marks.items())}

    # 8. input features, mirrored (the held-out pictures of part 7)
    out["input_features_mirror"] = mirror_equivariance(enc, pixel, x)

    # 9. held out, edited: which level loses what an edit keeps
    out["held_out_edited"] = edited(models)

    # 10. held out, drawn: which level loses what a drawing gets wrong
    out["held_out_drawn"] = drawn(models)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
