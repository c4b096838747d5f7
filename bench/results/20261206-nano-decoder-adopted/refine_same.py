"""Session 49: which of test_nano's refined prompts read as the pixel decoder's scene, per decoder (working tree)."""


def main():
    from refine_figs import exported_bundle  # this folder's other script (the script's folder is on sys.path)
    from illume_rt.runtime.pipeline import Pipeline, to_uint8
    from illume_rt.nano import score
    from illume_rt.nano.heldout import eval_prompts, greedy_sampling

    pipe = Pipeline.from_bundle(exported_bundle(), threads=2)
    for n, (prompt, _) in enumerate(eval_prompts(8, "train")):
        for seed in (0, 1):
            r = pipe.generate(prompt, (256, 256), seed=seed, refine=pipe.default_refine(), sampling=greedy_sampling(pipe))
            drawn = score.read_scene(to_uint8(pipe.decode_image(r.tokens.semantic, r.tokens.pixel)))
            refined = score.read_scene(r.image)
            print(n, seed, prompt, "|", drawn, "|", refined, "SAME" if drawn == refined else "DIFF", flush=True)


if __name__ == "__main__":
    main()
