"""Can an MLLM of nano's width learn to copy a picture back when that is all it trains on?

    python -m illume_rt.nano.copy_probe --work W --layers 4 --steps 600 -o copy-4.json
    python -m illume_rt.nano.copy_probe --work W --init W/mllm.pt --save W/focus.pt --steps 2000 --lr 1e-3 -o F
    python -m illume_rt.nano.copy_probe --work W --init W/polish.pt --steps 0 -o F   # measure only
    python -m illume_rt.nano.copy_probe --work W --fillers 12 --steps 2400 -o F      # the copy at many distances

From a fresh init (nano's preset, ``--layers`` decoder layers) or from a finished MLLM stage's state (``--init``;
``--save`` writes the result as one, e.g. as ``focus.pt`` for stage ``edit`` to go on from), the LLM and projectors
train on the reconstruct prompt only (``edit`` without instruction: the picture's features in, its own codes out),
EDIT_BATCH pictures of the training split per step, their fed codes erased as in stage ``edit`` and the hard-token
weighting of the MLLM stages; every ``--every`` steps the held-out pictures are copied back teacher forced
(``diagnose.reconstruct_codes``, part 7 of ``nano.diagnose``) and the share of codes right per level, object and
background, is logged to ``-o`` (``--steps 0``: once, for the ``--init`` state as it is). One thread. ``W``: a
nano.train work folder with stage ``tokens`` done. The findings: nano/README.md, "Editing".

``--fillers N``: the pictures are asked back on the editing prompt instead, its instruction 1 to N words that ask
for no change (FILLER_WORDS, drawn per picture), so the distance between each input cell and its output cell
varies from picture to picture as it does between users' instructions; a copy learned at one distance (as on the
reconstruct prompt) cannot serve them all. The held-out copy is then also measured at filler_checks(N) words, one of
them more than N (a distance never trained), besides the reconstruct prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

# Words that ask for no change, so that the picture back is the right answer to any instruction made of them.
FILLER_WORDS = ("please", "keep", "it", "as", "is", "now", "just", "the", "same", "image")


def filler_instruction(rng, words: int) -> str:
    return " ".join(str(w) for w in rng.choice(FILLER_WORDS, words))


def filler_checks(fillers: int) -> tuple[int, ...]:
    """The instruction lengths, in words, the held-out copy is measured at: the shortest and longest trained, and
    half as many again (never trained)."""
    return (1, fillers, fillers + (fillers + 1) // 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m illume_rt.nano.copy_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a nano.train work folder holding tokens.pt")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--init", type=Path, help="start from this MLLM stage state (e.g. W/mllm.pt) instead of afresh")
    ap.add_argument("--save", type=Path, help="write the trained LLM and projectors here as an MLLM stage state")
    ap.add_argument("--fillers", type=int, default=0,
                    help="ask the pictures back on the editing prompt with 1 to N words that ask for no change "
                         "(default 0: on the reconstruct prompt)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    if not (args.work / "tokens.pt").is_file():
        raise SystemExit(f"copy_probe: {args.work / 'tokens.pt'} is missing: run "
                         f"`python -m illume_rt.nano.train --work {args.work} tokens` first")
    if min(args.layers, args.every) < 1 or min(args.steps, args.fillers) < 0:
        raise SystemExit("copy_probe: --layers and --every must be at least 1, --steps and --fillers at least 0")
    if args.steps == 0 and args.init is None:
        raise SystemExit("copy_probe: --steps 0 measures the --init state: name one")
    if args.init is not None and not args.init.is_file():
        raise SystemExit(f"copy_probe: --init {args.init} is not a file: name a finished MLLM stage's state "
                         "(mllm.pt, focus.pt, edit.pt or polish.pt in a nano.train work folder)")
    import numpy as np
    import torch

    from illume_rt.nano import data
    from illume_rt.nano import diagnose as D
    from illume_rt.nano import train as T

    torch.set_num_threads(1)
    preset = T.nano_preset()
    preset = dataclasses.replace(preset, llm=dataclasses.replace(preset.llm, num_hidden_layers=args.layers))
    tok = T.nano_tokenizer(preset)
    tokens = torch.load(args.work / "tokens.pt", weights_only=True)
    toks, held = tokens["train"], tokens["held"]
    scenes = [data.Scene(**s) for s in toks["scenes"]]
    held_scenes = [data.Scene(**s) for s in held["scenes"]]
    empty = T.empty_codes(toks, scenes)
    llm, proj = T.build_mllm(preset)
    if args.init is not None:  # a state of nano's own depth; --layers must match it (load_state_dict says so)
        state = torch.load(args.init, weights_only=True)["modules"]
        llm.load_state_dict(state["llm"])
        proj.load_state_dict(state["projectors"])
    llm.config._attn_implementation = "sdpa"
    embed = llm.get_input_embeddings()
    params = list(llm.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng(T.SEED)

    def copied(instruction_words: int = 0) -> dict[str, float]:
        """Held-out codes copied right, on the reconstruct prompt (0 words) or the editing prompt with that many
        filler words (the same words for every picture, drawn from a fixed seed)."""
        llm.eval()
        proj.eval()
        instruction = (filler_instruction(np.random.default_rng(instruction_words), instruction_words)
                       if instruction_words else None)
        marks: dict[str, list] = {}
        for i, scene in enumerate(held_scenes):
            plain = tuple(codes.flatten() for codes in empty[scene.background])
            levels = D.reconstruct_codes(llm, proj, preset, tok, held["semantic"][i].flatten(),
                                         held["pixel"][i].flatten(), held["vit"][i], held["pixel_features"][i], plain,
                                         instruction)
            for level, level_marks in levels.items():
                for is_object, right, _ in level_marks:
                    marks.setdefault(f"{level}_{'object' if is_object else 'background'}", []).append(right)
        llm.train()
        proj.train()
        return {k: round(float(np.mean(v)), 3) for k, v in sorted(marks.items())}

    def measured() -> dict:
        row = {"held_out_copied": copied()}
        if args.fillers:
            row["held_out_copied_at_filler_words"] = {n: copied(n) for n in filler_checks(args.fillers)}
        return row

    log = []
    start = time.process_time()
    if args.steps == 0:
        log.append({"step": 0, **measured()})
        print(json.dumps(log[0]), flush=True)
        write_log(args, log)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = T.cosine_lr(step, args.steps, args.lr)
        seqs, fed, sources = [], [], []
        for i in rng.integers(0, len(scenes), T.EDIT_BATCH):
            background = empty[scenes[i].background]
            share = rng.uniform(0, 1)
            sem = T.erase_codes(toks["semantic"][i], background[0], share * T.ERASE_MAX, rng)
            pix = T.erase_codes(toks["pixel"][i], background[1], share * T.EDIT_PIXEL_ERASE_MAX, rng)
            instruction = filler_instruction(rng, int(rng.integers(1, args.fillers + 1))) if args.fillers else None
            seqs.append(T.edit_example(preset, tok, instruction, toks["semantic"][i], toks["pixel"][i]))
            fed.append(T.edit_example(preset, tok, instruction, sem, pix))
            sources.append(int(i))
        _, labels, mask = T.pad_batch(seqs, preset.vocab.pad_id)
        inputs = T.pad_batch(fed, preset.vocab.pad_id)[0]
        sources = torch.tensor(sources)
        emb = T.embed_with_features(embed, proj, inputs, toks["vit"][sources], toks["pixel_features"][sources])
        loss = T.lm_loss(llm, emb, labels, mask, T.HARD_WEIGHT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "loss": round(loss.item(), 4), "cpu_s": round(time.process_time() - start),
                   **measured()}
            log.append(row)
            print(json.dumps(row), flush=True)
            write_log(args, log)
    if args.save is not None:  # as Stage.finish writes it, so that the next stage's init reads it
        tmp = args.save.with_suffix(".tmp")
        torch.save({"modules": {"llm": llm.state_dict(), "projectors": proj.state_dict()},
                    "cpu_s": time.process_time() - start}, tmp)
        tmp.replace(args.save)
    return 0


def write_log(args, log: list[dict]) -> None:
    args.output.write_text(json.dumps({"layers": args.layers, "steps": args.steps, "lr": args.lr,
                                       "fillers": args.fillers,
                                       "init": str(args.init) if args.init else None, "log": log}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
