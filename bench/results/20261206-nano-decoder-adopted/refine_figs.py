"""Session 49: the figures tests/test_nano.py's refinement comments cite, on the working tree's weights."""
import json
import numpy as np


def exported_bundle():
    """The working tree's nano weights exported into a temporary folder (removed at exit)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from illume_rt.export.bundle import write_bundle
    from illume_rt.nano.checkpoint import load_models

    tmp = Path(tempfile.mkdtemp(prefix="nano-decoder-adopted-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return write_bundle(load_models(), tmp / "bundle", log=lambda m: None)


def main():
    import torch
    from illume_rt.runtime.pipeline import Pipeline, to_uint8
    from illume_rt.nano import decoder, train, data, score
    from illume_rt.nano.checkpoint import COMMITTED, load_models
    from illume_rt.nano.heldout import eval_scenes, eval_prompts, greedy_sampling

    pipe = Pipeline.from_bundle(exported_bundle(), threads=2)
    out = {"refine8": decoder.refinement_scores(pipe, eval_scenes("held")[:8],
                                                *decoder.tokenizer_from_weights(COMMITTED.dualvitok))}
    print(out, flush=True)
    same = []
    for prompt, _ in eval_prompts(4, "train"):
        r = pipe.generate(prompt, (256, 256), seed=0, refine=pipe.default_refine(), sampling=greedy_sampling(pipe))
        drawn = to_uint8(pipe.decode_image(r.tokens.semantic, r.tokens.pixel))
        same.append(score.read_scene(r.image) == score.read_scene(drawn))
    out["refine_same"] = same
    models = load_models()
    encoder, pixel = decoder.tokenizer_from_weights(COMMITTED.dualvitok)
    spreads = []
    for scene in data.split()[1][:4]:
        tm = decoder.token_maps(encoder, pixel, torch.from_numpy(data.to_model_input(data.render(scene))))
        pics = decoder.first_step_pictures(train.nano_preset(), models.unet, models.vae, tm, range(4)).astype(np.float32)
        spreads.append(float(np.abs(pics - np.median(pics, axis=0)).mean(axis=(1, 2, 3)).max()))
    out["first_step_spread"] = spreads
    print(json.dumps(out))


if __name__ == "__main__":
    main()
