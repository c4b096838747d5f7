"""Does the copy at many distances learn left from right when the input features can carry where they are?

    python bench/results/20261204-nano-copy-position/probe.py ARM WORK STEPS OUT.json [ROPE_THETA]

Session 30's many-distance probe (``nano.copy_probe --fillers 12``): a fresh LLM of nano's size learns to give each
training picture back on the editing prompt with 1 to 12 words that ask for no change, so no single distance
between an input cell and its output cell serves; it kept the row and not the side, because nano's input features
are close to mirror-equivariant (nano/README.md, "Editing"). Four arms, the same data and seed:

- ``frozen``: that probe as committed (the features precomputed by stage ``tokens``, the vision tower frozen);
- ``oracle``: the same, with a fixed random vector per cell added to every input feature (ViT and pixel encoder,
  scaled to the features' own spread) before the projectors: each input cell then says where it is. Not a
  candidate (no such input exists in the official structure), an upper bound for what position in the features
  buys;
- ``oracle_both``: a fixed random vector per cell (spread CELL_VECTOR_STD, about the projected features') added to
  each input slot after the projectors and to the token before each output code of that cell (the one that
  predicts it): both ends of the copy carry the same vector, so one attention head can match them at any distance.
  A diagnostic only: it tells whether what is missing is the input's position or the output's;
- ``vit``: the candidate the official structure allows: the vision tower (ViT + merger, ``semantic_encoder.model``)
  trains with the LLM, as the official MLLM's vision tower was fine-tuned (illume-plus-facts.md, section 6), at
  VIT_LR; its features are recomputed from the pictures each step and for each measurement.

Every MEASURE_EVERY steps the held-out pictures are copied back teacher forced (``diagnose.reconstruct_codes``) at
the reconstruct prompt and at 1, 12 and 18 filler words; the share of object and background codes right per level
goes to OUT.json. ROPE_THETA: the LLM's RoPE base instead of nano's 10000 (Qwen2.5's is 1e6). One thread. WORK: a
nano.train work folder with stages ``semantic`` and ``tokens`` done.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ARMS = ("frozen", "oracle", "oracle_both", "vit")
MEASURE_EVERY = 300
C_LR = 2e-3  # copy_probe's default learning rate
VIT_LR = 5e-4
FILLERS = 12
# oracle_both's cell vectors: about the spread of the projected input features at init (0.36 / 0.39; the token
# table's is 0.02), so that the input slots' vectors are not buried under their features (a first run at 0.02 was
# stopped at step 300, at the frozen arm's copy).
CELL_VECTOR_STD = 0.3


def main() -> int:
    if len(sys.argv) not in (5, 6) or sys.argv[1] not in ARMS:
        raise SystemExit(f"usage: probe.py {{{','.join(ARMS)}}} WORK STEPS OUT.json [ROPE_THETA]")
    arm, work, steps, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    rope_theta = float(sys.argv[5]) if len(sys.argv) > 5 else None
    import dataclasses

    import numpy as np
    import torch

    from illume_rt.nano import copy_probe as C
    from illume_rt.nano import data
    from illume_rt.nano import diagnose as D
    from illume_rt.nano import train as T

    torch.set_num_threads(1)
    preset = T.nano_preset()
    if rope_theta is not None:
        preset = dataclasses.replace(preset, llm=dataclasses.replace(preset.llm, rope_theta=rope_theta))
    tok = T.nano_tokenizer(preset)
    tokens = torch.load(work / "tokens.pt", weights_only=True)
    toks, held = tokens["train"], tokens["held"]
    scenes = [data.Scene(**s) for s in toks["scenes"]]
    held_scenes = [data.Scene(**s) for s in held["scenes"]]
    empty = T.empty_codes(toks, scenes)
    llm, proj = T.build_mllm(preset)
    llm.config._attn_implementation = "sdpa"
    embed = llm.get_input_embeddings()
    params = list(llm.parameters()) + list(proj.parameters())
    groups = [{"params": params, "lr": C_LR}]

    if arm == "vit":
        enc, _, _ = T.load_tokenizer_state(work)
        vit_tower = enc.model.train()
        groups.append({"params": list(vit_tower.parameters()), "lr": VIT_LR, "peak": VIT_LR})

        def views(scene_list):
            x = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in scene_list]))
            return T.vit_view(x)

        train_views = torch.cat([views(scenes[k:k + 32]) for k in range(0, len(scenes), 32)])
        held_views = views(held_scenes)

        def vit_features(view_batch):
            return torch.stack([vit_tower(v[None]) for v in view_batch])
    if arm in ("oracle", "oracle_both"):
        gen = torch.Generator().manual_seed(T.SEED + 11)
        sem_code = torch.randn(toks["vit"].shape[1:], generator=gen) * toks["vit"].std()
        pix_code = torch.randn(toks["pixel_features"].shape[1:], generator=gen) * toks["pixel_features"].std()

    if arm == "oracle_both":
        plain_embed = T.embed_with_features
        v = preset.vocab
        out_sem = torch.randn(sem_code.shape[0], embed.weight.shape[1], generator=gen) * CELL_VECTOR_STD
        out_pix = torch.randn(pix_code.shape[0], embed.weight.shape[1], generator=gen) * CELL_VECTOR_STD

        def embed_with_cells(embed_, proj_, ids, vit, pix):
            """plain_embed, plus each input slot's cell vector and, on the token before each output code, its cell's
            (slots and codes counted in order)."""
            emb = plain_embed(embed_, proj_, ids, vit, pix)
            add = torch.zeros_like(emb)
            for slot, table in ((T.SEM_SLOT, out_sem), (T.PIX_SLOT, out_pix)):
                for row in range(ids.shape[0]):
                    where = torch.nonzero(ids[row] == slot)[:, 0]
                    add[row, where] = table[:len(where)]
            for lo, n, table in ((v.semantic_code_offset, v.semantic_codebook_size, out_sem),
                                 (v.pixel_code_offset, v.pixel_codebook_size, out_pix)):
                is_code = (ids >= lo) & (ids < lo + n)
                for row in range(ids.shape[0]):
                    where = torch.nonzero(is_code[row])[:, 0]
                    add[row, where - 1] = table[:len(where)]
            return emb + add

        T.embed_with_features = embed_with_cells  # diagnose.reconstruct_codes reads it from T too

    def features(split, which, idx):
        """(ViT features, pixel features) of pictures ``idx`` of ``split`` as this arm feeds them."""
        vit, pix = split["vit"][idx], split["pixel_features"][idx]
        if arm == "oracle":
            vit, pix = vit + sem_code, pix + pix_code
        if arm == "vit":
            vit = vit_features((train_views if which == "train" else held_views)[idx])
        return vit, pix

    opt = torch.optim.AdamW(groups, lr=C_LR, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng(T.SEED)

    def copied(words: int) -> dict[str, float]:
        llm.eval(), proj.eval()
        instruction = C.filler_instruction(np.random.default_rng(words), words) if words else None
        marks: dict[str, list] = {}
        with torch.no_grad():
            for i, scene in enumerate(held_scenes):
                plain = tuple(codes.flatten() for codes in empty[scene.background])
                vit, pix = features(held, "held", torch.tensor([i]))
                levels = D.reconstruct_codes(llm, proj, preset, tok, held["semantic"][i].flatten(),
                                             held["pixel"][i].flatten(), vit[0], pix[0], plain, instruction)
                for level, level_marks in levels.items():
                    for is_object, right, _ in level_marks:
                        marks.setdefault(f"{level}_{'object' if is_object else 'background'}", []).append(right)
        llm.train(), proj.train()
        return {k: round(float(np.mean(v)), 3) for k, v in sorted(marks.items())}

    log = []
    start = time.process_time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = T.cosine_lr(step, steps, group.get("peak", C_LR))
        seqs, fed, sources = [], [], []
        for i in rng.integers(0, len(scenes), T.EDIT_BATCH):
            background = empty[scenes[i].background]
            share = rng.uniform(0, 1)
            sem = T.erase_codes(toks["semantic"][i], background[0], share * T.ERASE_MAX, rng)
            pix = T.erase_codes(toks["pixel"][i], background[1], share * T.EDIT_PIXEL_ERASE_MAX, rng)
            instruction = C.filler_instruction(rng, int(rng.integers(1, FILLERS + 1)))
            seqs.append(T.edit_example(preset, tok, instruction, toks["semantic"][i], toks["pixel"][i]))
            fed.append(T.edit_example(preset, tok, instruction, sem, pix))
            sources.append(int(i))
        _, labels, mask = T.pad_batch(seqs, preset.vocab.pad_id)
        inputs = T.pad_batch(fed, preset.vocab.pad_id)[0]
        vit, pix = features(toks, "train", torch.tensor(sources))
        emb = T.embed_with_features(embed, proj, inputs, vit, pix)
        loss = T.lm_loss(llm, emb, labels, mask, T.HARD_WEIGHT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        if (step + 1) % MEASURE_EVERY == 0 or step + 1 == steps:
            row = {"step": step + 1, "loss": round(loss.item(), 4), "cpu_s": round(time.process_time() - start),
                   "held_out_copied": {w: copied(w) for w in (0, *C.filler_checks(FILLERS))}}
            log.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps({"arm": arm, "rope_theta": preset.llm.rope_theta, "steps": steps, "lr": C_LR,
                                       "vit_lr": VIT_LR, "fillers": FILLERS, "log": log}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
