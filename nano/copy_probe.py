"""Can an MLLM of nano's width learn to copy a picture back when that is all it trains on?

    python -m illume_rt.nano.copy_probe --work W --layers 4 --steps 600 -o copy-4.json
    python -m illume_rt.nano.copy_probe --work W --init W/mllm.pt --save W/focus.pt --steps 2000 --lr 1e-3 -o F
    python -m illume_rt.nano.copy_probe --work W --init W/polish.pt --steps 0 -o F   # measure only

From a fresh init (nano's preset, ``--layers`` decoder layers) or from a finished MLLM stage's state (``--init``;
``--save`` writes the result as one, e.g. as ``focus.pt`` for stage ``edit`` to go on from), the LLM and projectors
train on the reconstruct prompt only (``edit`` without instruction: the picture's features in, its own codes out),
EDIT_BATCH pictures of the training split per step, their fed codes erased as in stage ``edit`` and the hard-token
weighting of the MLLM stages; every ``--every`` steps the held-out pictures are copied back teacher forced
(``diagnose.reconstruct_codes``, part 7 of ``nano.diagnose``) and the share of codes right per level, object and
background, is logged to ``-o`` (``--steps 0``: once, for the ``--init`` state as it is). One thread. ``W``: a
nano.train work folder with stage ``tokens`` done. The findings: nano/README.md, "Editing".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m illume_rt.nano.copy_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a nano.train work folder holding tokens.pt")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--init", type=Path, help="start from this MLLM stage state (e.g. W/mllm.pt) instead of afresh")
    ap.add_argument("--save", type=Path, help="write the trained LLM and projectors here as an MLLM stage state")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    if not (args.work / "tokens.pt").is_file():
        raise SystemExit(f"copy_probe: {args.work / 'tokens.pt'} is missing: run "
                         f"`python -m illume_rt.nano.train --work {args.work} tokens` first")
    if min(args.layers, args.every) < 1 or args.steps < 0:
        raise SystemExit("copy_probe: --layers and --every must be at least 1, --steps at least 0")
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

    def copied() -> dict[str, float]:
        llm.eval()
        proj.eval()
        marks: dict[str, list] = {}
        for i, scene in enumerate(held_scenes):
            plain = tuple(codes.flatten() for codes in empty[scene.background])
            levels = D.reconstruct_codes(llm, proj, preset, tok, held["semantic"][i].flatten(),
                                         held["pixel"][i].flatten(), held["vit"][i], held["pixel_features"][i], plain)
            for level, level_marks in levels.items():
                for is_object, right, _ in level_marks:
                    marks.setdefault(f"{level}_{'object' if is_object else 'background'}", []).append(right)
        llm.train()
        proj.train()
        return {k: round(float(np.mean(v)), 3) for k, v in sorted(marks.items())}

    log = []
    start = time.process_time()
    if args.steps == 0:
        log.append({"step": 0, "held_out_copied": copied()})
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
            seqs.append(T.edit_example(preset, tok, None, toks["semantic"][i], toks["pixel"][i]))
            fed.append(T.edit_example(preset, tok, None, sem, pix))
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
                   "held_out_copied": copied()}
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
                                       "init": str(args.init) if args.init else None, "log": log}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
