"""One-off experiment (session 38): does nano learn to draw at 512x512 from a short stage on top of its weights?

A stage (resumable: ``nano.train``'s Stage and _train_loop, a checkpoint every 10 steps) continues an MLLM state
of WORK, each step teacher forcing:
- RES_BATCH text-to-image examples at 512x512: 18x18 semantic + 32x32 pixel codes of the 512 renders of the
  training scenes through the committed tokenizer (the ViT sees a 504 view, the 512 grid's multiple of 28), in the
  runtime's 512 prompt and layout;
- T2I_256 at 256x256, as ``focus`` feeds them (tokens.pt);
- UND understanding chats;
fed codes erased as in ``focus`` (the background's empty codes, per size), image tokens' loss weighted as in
``focus`` (HARD_WEIGHT). No edits: the run measures what 512 costs and what it teaches.

WORK is seeded from the committed weights first (``train.seed_from_weights``: work/mllm.pt is then the committed
MLLM, which ``polish`` left). Run as session 38 did (2 threads, niced, its own autogroup):
    python stage_512.py roundtrip WORK                        # the tokenizer's round trip at 256 and 512
    python stage_512.py train WORK 1000                       # stage res512, from mllm.pt
    python stage_512.py train WORK 1000 --init res512.pt --stage res512b   # 1000 more steps from there
Then score_512.py WORK/res512.pt OUT.json 45.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from illume_rt.nano import data
from illume_rt.nano import train as T
from illume_rt.runtime.images import CLIP_MEAN, CLIP_STD

RES_BATCH, T2I_256, UND, LR = 2, 4, 2, 1e-3
COMMITTED = Path(__file__).resolve().parents[3] / "nano" / "weights"


def vit_view(images: torch.Tensor, side: int) -> torch.Tensor:
    """train.vit_view at another side (252 there: the 256 grid's multiple of 28)."""
    unit = F.interpolate((images + 1) / 2, size=(side, side), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)
    return (unit - torch.from_numpy(CLIP_MEAN)[None, :, None, None]) / torch.from_numpy(CLIP_STD)[None, :, None, None]


@torch.no_grad()
def tokens_512(work: Path) -> dict:
    """The 512 codes of every training and held-out scene (cached in WORK/tokens512.pt)."""
    path = work / "tokens512.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    enc, _, pixel = T.load_tokenizer_state(work)
    train, held = data.split()
    out = {}
    for name, scenes in (("train", train), ("held", held)):
        sem, pix = [], []
        for k, s in enumerate(scenes):
            x = torch.from_numpy(data.to_model_input(data.render(s, size=512)))
            z = enc.proj(enc.model(vit_view(x, 504))[None]).transpose(1, 2).reshape(1, -1, 18, 18)
            sem.append(pixel.semantic_quantizer.nearest_indices(z)[0])
            pix.append(pixel.pixel_quantizer.nearest_indices(pixel.pixel_quant_conv(pixel.pixel_encoder(x)))[0])
            if k % 50 == 0:
                print(f"[tokens512] {name} {k}/{len(scenes)}", flush=True)
        out[name] = {"scenes": [s.__dict__ for s in scenes], "semantic": torch.stack(sem), "pixel": torch.stack(pix)}
    torch.save(out, path)
    return out


@torch.no_grad()
def roundtrip(work: Path) -> None:
    """The held-out scenes rendered at 256 and 512, encoded and decoded by the tokenizer, scored by score.py: the
    ceiling for pictures drawn at that size."""
    from illume_rt.nano import score

    if not (work / "pixel.pt").is_file():
        T.seed_from_weights(work, COMMITTED)
    enc, _, pixel = T.load_tokenizer_state(work)
    _, held = data.split()
    for size in (256, 512):
        side = size // 28 * 28
        marks = []
        for s in held:
            x = torch.from_numpy(data.to_model_input(data.render(s, size=size)))
            z = enc.proj(enc.model(vit_view(x, side))[None]).transpose(1, 2).reshape(1, -1, side // 28, side // 28)
            sem = pixel.semantic_quantizer.nearest_indices(z)
            pix = pixel.pixel_quantizer.nearest_indices(pixel.pixel_quant_conv(pixel.pixel_encoder(x)))
            picture = ((pixel.decode_code(sem, pix).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            marks.append(score.score_picture(picture.permute(0, 2, 3, 1).numpy()[0],
                                             {a: getattr(s, a) for a in data.ATTRIBUTES}))
        print(size, tuple(sem.shape), tuple(pix.shape),
              {k: round(v, 3) for k, v in score.summarize(marks).items()}, flush=True)


def t2i_example(preset, tok, sem, pix, prompt, size: int):
    """train.t2i_example at ``size`` x ``size``."""
    from illume_rt.contract import image_grid
    from illume_rt.runtime.prompts import text_to_image_ids

    v = preset.vocab
    cond, uncond = text_to_image_ids(tok, v, prompt or "x", size, size)
    prefix = cond if prompt is not None else uncond
    image = v.image_token_ids(image_grid(size, size), sem.tolist(), pix.tolist()) + [v.im_end_id]
    return prefix + image, [-100] * len(prefix) + image


def run(work: Path, steps: int, init: str, stage_name: str, threads: int) -> None:
    torch.set_num_threads(threads)
    if not (work / "mllm.pt").is_file():
        T.seed_from_weights(work, COMMITTED)
    t512 = tokens_512(work)["train"]
    if not (work / "tokens.pt").is_file():
        T.stage_tokens(work)
    preset = T.nano_preset()
    tok = T.nano_tokenizer(preset)
    toks = torch.load(work / "tokens.pt", weights_only=True)["train"]
    scenes = [data.Scene(**s) for s in toks["scenes"]]
    assert [data.Scene(**s) for s in t512["scenes"]] == scenes
    empty, empty512 = T.empty_codes(toks, scenes), T.empty_codes(t512, scenes)
    short_ok = T.short_caption_allowed(scenes)
    llm, proj = T.build_mllm(preset)
    state = torch.load(work / init, weights_only=True)["modules"]
    llm.load_state_dict(state["llm"])
    proj.load_state_dict(state["projectors"])
    llm.config._attn_implementation = "sdpa"
    llm.train()
    proj.train()
    embed = llm.get_input_embeddings()
    pad = preset.vocab.pad_id
    stage = T.Stage(work, stage_name)

    def erased(src, emp, i, rng):
        background = emp[scenes[i].background]
        share = rng.uniform(0, 1) * T.ERASE_MAX
        return (T.erase_codes(src["semantic"][i], background[0], share, rng),
                T.erase_codes(src["pixel"][i], background[1], share, rng))

    def t2i_loss(src, emp, size, n, rng):
        seqs, fed = [], []
        for i in rng.integers(0, len(scenes), n):
            prompt = T.t2i_prompt(scenes[i], short_ok[i], rng.random())
            seqs.append(t2i_example(preset, tok, src["semantic"][i], src["pixel"][i], prompt, size))
            fed.append(t2i_example(preset, tok, *erased(src, emp, i, rng), prompt, size))
        ids, labels, mask = T.pad_batch(seqs, pad)
        return T.lm_loss(llm, embed(T.pad_batch(fed, pad)[0]), labels, mask, T.HARD_WEIGHT)

    def step_fn(step, rng):
        l512 = t2i_loss(t512, empty512, 512, RES_BATCH, rng)
        l256 = t2i_loss(toks, empty, 256, T2I_256, rng)
        feats = rng.integers(0, len(toks["und_scene"]), UND)
        und = [T.und_example(preset, tok, scenes[int(toks["und_scene"][f])], rng) for f in feats]
        ids, labels, mask = T.pad_batch(und, pad)
        emb = T.embed_with_features(embed, proj, ids, toks["vit"][feats], toks["pixel_features"][feats])
        lund = T.lm_loss(llm, emb, labels, mask)
        return l512 + l256 + lund, f"t512 {l512.item():.3f} t256 {l256.item():.3f} und {lund.item():.3f}"

    params = list(llm.parameters()) + list(proj.parameters())
    extra = T._train_loop(stage, {"llm": llm, "projectors": proj}, params, steps, LR, step_fn, every=10)
    stage.finish({"modules": {"llm": llm.state_dict(), "projectors": proj.state_dict()}}, extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("roundtrip", "train"))
    ap.add_argument("work", type=Path)
    ap.add_argument("steps", type=int, nargs="?", default=1000)
    ap.add_argument("--init", default="mllm.pt", help="the MLLM state in WORK the stage continues")
    ap.add_argument("--stage", default="res512", help="the stage's name (its state: WORK/NAME.pt)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.what == "roundtrip":
        return roundtrip(args.work)
    run(args.work, args.steps, args.init, args.stage, args.threads)


if __name__ == "__main__":
    main()
