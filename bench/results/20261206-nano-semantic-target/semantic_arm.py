"""Session 53's tokenizer arms: stage ``semantic`` trained to a target that might put the shape into the semantic
codes, ``pixel`` and ``tokens`` after it, and the codes measured (NOTES.md). The MLLM stages were not trained on
either tokenizer: neither put the shape into the codes.

- ``semantic-8x8``: each 28-px cell of the 252 view reconstructed at 8x8 RGB (train.cell_target; 4x4 in the
  recipe) through a per-cell decoder of the same form, twice as wide (train.semantic_decoder).
- ``semantic-shape``: each cell at 4x4 RGB (the recipe's) and the object's shape (``patch_shape``).
- ``recipe``: nothing patched, to measure a committed-recipe tokenizer the same way.

Why: an edit loses the shape it should keep (61% kept, every other attribute 87-99%), and diagnose.py parts 9 and 10
showed the pixel level reading the shape from the caption's word or the input picture, never from the semantic
codes, which carry position and size but not the outline (object cells' semantic codes are 41% pure by shape, chance
33%; nano/README.md "Diagnosis" item 2). The official semantic branch reconstructs a pretrained ViT's features,
which do carry shape; nano has none, so its target is a coarse picture of each cell, and at 4x4 a 28-px cell's part
of a circle and of a square look nearly alike. If the semantic codes told them apart, the semantic level (which an
edit copies from its input far better than the pixel level writes a shape unaided) would carry the shape.

    python semantic_arm.py ARM train semantic pixel tokens --work W --threads 2 --jobs 1
    python semantic_arm.py ARM purity W                   # the levels' swaps; object codes' purity by attribute
    python semantic_arm.py semantic-shape read-shape W    # the shape read back through the decoder's shape channels
"""
import sys

CELL = 8  # the arm's target: each cell at CELL x CELL RGB (the recipe: 4)
SHAPE_AMPLITUDE = 2.0  # semantic-shape: the shape one-hot's value on a cell the object covers whole (RGB: [-1, 1])
ARMS = ("semantic-8x8", "semantic-shape", "recipe")
COMMANDS = ("train", "purity", "read-shape")


def patch() -> None:
    import torch.nn.functional as F
    from torch import nn

    from illume_rt.nano import train

    def cell_target(images):
        """[B, 3, 256, 256] -> each 28-px cell of the 252 view at CELL x CELL: [B, 81, 3 CELL^2] in [-1, 1]."""
        small = F.interpolate(images, size=(9 * CELL, 9 * CELL), mode="area")
        b = small.shape[0]
        return small.reshape(b, 3, 9, CELL, 9, CELL).permute(0, 2, 4, 1, 3, 5).reshape(b, 81, 3 * CELL * CELL)

    def semantic_decoder(dim):
        out = 3 * CELL * CELL
        return nn.Sequential(nn.Linear(dim, 2 * out), nn.GELU(), nn.Linear(2 * out, out))

    train.cell_target = cell_target  # both looked up by name at call time (stage_semantic, build_tokenizer_modules)
    train.semantic_decoder = semantic_decoder


def patch_shape() -> None:
    """semantic-shape: stage ``semantic``'s target is each cell at 4x4 RGB (the recipe's) and the object's shape,
    one-hot, times the share of the cell the object covers (0 on the background), as a pretrained ViT's features
    would say what object a patch belongs to."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from illume_rt.nano import data, train

    def semantic_decoder(dim):
        return nn.Sequential(nn.Linear(dim, 96), nn.GELU(), nn.Linear(96, 48 + len(data.SHAPES)))

    def stage_semantic(work):  # train.stage_semantic with the shape in the target
        stage = train.Stage(work, "semantic")
        if stage.done:
            return
        preset = train.nano_preset()
        enc, dec, pixel = train.build_tokenizer_modules(preset)
        quant = pixel.semantic_quantizer
        scenes, _ = data.split()
        modules = {"semantic_encoder": enc, "semantic_decoder": dec, "semantic_quantizer": quant}
        params = [p for m in modules.values() for p in m.parameters()]

        def step_fn(step, rng):
            picked = [scenes[i] for i in rng.integers(0, len(scenes), train.SEMANTIC_BATCH)]
            imgs = [data.render(s, rng) for s in picked]
            x = torch.from_numpy(np.concatenate([data.to_model_input(im) for im in imgs]))
            covered = torch.from_numpy(np.stack([
                (im != np.array(data.BACKGROUNDS[s.background], np.uint8)).any(-1) for s, im in zip(picked, imgs)
            ]).astype(np.float32))[:, None]
            share = F.interpolate(covered, size=(9, 9), mode="area").reshape(len(picked), 81, 1)
            onehot = torch.tensor([[float(s.shape == name) for name in data.SHAPES] for s in picked])[:, None]
            target = torch.cat([train.cell_target(x), SHAPE_AMPLITUDE * share * onehot], dim=2)
            q, idx, commit = train.quantize(quant, enc(x))
            rec = F.mse_loss(dec(q.flatten(2).transpose(1, 2)), target)
            return rec + commit, f"rec {rec.item():.4f} codes {len(torch.unique(idx))}"

        extra = train._train_loop(stage, modules, params, train.SEMANTIC_STEPS, 3e-3, step_fn)
        stage.finish({"modules": {k: m.state_dict() for k, m in modules.items()}}, extra)

    train.semantic_decoder = semantic_decoder
    train.stage_semantic = stage_semantic  # run_stage looks stages up by name at call time


def purity(work) -> int:
    """What diagnose.py's part 1 measures, on the tokenizer in ``work``: the levels' swaps and the object cells'
    semantic code purity."""
    import collections
    import json
    from pathlib import Path

    from illume_rt.nano import data, diagnose, train

    enc, _, pixel = train.load_tokenizer_state(Path(work))
    enc, pixel = enc.eval(), pixel.eval()
    scenes = data.all_scenes()
    S, P = diagnose.encode(enc, pixel, scenes)
    empty = {bg: S[[i for i, s in enumerate(scenes) if s.background == bg]].mode(0).values
             for bg in data.BACKGROUNDS}
    swaps = diagnose.level_swaps(enc, pixel)
    tables = {a: collections.defaultdict(collections.Counter) for a in ("colour", "shape", "size")}
    for s, row in zip(scenes, S):
        for c in row[row != empty[s.background]].tolist():
            for a, table in tables.items():
                table[c][getattr(s, a)] += 1
    pure = {a: round(sum(max(c.values()) for c in t.values()) / sum(sum(c.values()) for c in t.values()), 3)
            for a, t in tables.items()}
    print(json.dumps({"attribute_shows_from": swaps, "object_semantic_code_purity": pure,
                      "semantic_codes_used": len(set(S.flatten().tolist()))}, indent=1))
    return 0


def read_shape(work) -> int:
    """semantic-shape: how often the shape channels of the semantic decoder, summed over a picture's cells, name the
    picture's shape: from its semantic codes, and from the encoder's output before the quantizer."""
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from illume_rt.nano import data, train

    enc, dec, pixel = (m.eval() for m in train.load_tokenizer_state(Path(work)))
    table = pixel.semantic_quantizer.lookup_table()
    out = {}
    for split, scenes in zip(("train", "held"), data.split()):
        x = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in scenes]))
        with torch.no_grad():
            z = enc(x)
            codes = pixel.semantic_quantizer.nearest_indices(z).reshape(len(scenes), -1)
            read = {"codes": dec(table[codes]), "before_quantizer": dec(z.flatten(2).transpose(1, 2))}
        out[split] = {k: round(float(np.mean([data.SHAPES[i] == s.shape for i, s in
                                              zip(v[..., 48:].sum(1).argmax(1).tolist(), scenes)])), 3)
                      for k, v in read.items()}
    print(json.dumps({"shape_read_from_semantic_decoder": out, "chance": round(1 / len(data.SHAPES), 3)}, indent=1))
    return 0


def main(argv):
    if len(argv) < 2 or argv[0] not in ARMS or argv[1] not in COMMANDS:
        raise SystemExit(f"usage: semantic_arm.py {{{','.join(ARMS)}}} {{{','.join(COMMANDS)}}} ...")
    if argv[0] == "semantic-8x8":
        patch()
    if argv[0] == "semantic-shape":
        patch_shape()
    if argv[1] == "purity":
        return purity(argv[2])
    if argv[1] == "read-shape":
        return read_shape(argv[2])
    from illume_rt.nano import train

    return train.main(argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
