"""Session 50's arms of stages ``edit`` and ``polish`` (NOTES.md), each from the committed weights' ``focus`` state:

- ``one-length``: nano's edit instructions phrased at one length, the recipe otherwise as committed. Why: a copy at
  one distance between an input cell and its output cell is what nano's LLM learns (nano/README.md, "Editing"); the
  grammar's instructions are 3 to 6 ids long ("make it large" ... "move it to the bottom right"), so each edit kind
  puts the copy at another distance. Here every instruction is 4 ids with the committed text tokenizer: size "make
  the shape large", position "move to top left" / "move to the center", the rest as committed. The tokenizer stays
  the committed one: its merges are learned (and cached) from the committed grammar before the grammar is patched;
  learned from the patched grammar, the same 450 tokens would take other ids (21 move), and every stage from
  ``mllm`` on would have to be retrained.
- ``captions-2``: the committed grammar, 2 captions a step in ``edit`` instead of EDIT_T2I_BATCH's 6, so that
  copying the input picture (what an edit fails to keep, the shape) weighs more against drawing from captions;
  ``polish`` (which gives drawing back) as committed.
- ``semantic-erase-0.9`` (session 51): the committed grammar, with the fed semantic codes of stage ``edit``'s
  examples erased up to 0.9 instead of ERASE_MAX's 0.6 (the pixel codes already are: EDIT_PIXEL_ERASE_MAX), so that
  fewer of an edited picture's semantic codes can be continued from the codes already drawn and more must be read
  from the input picture's features, where the shape an edit loses is (the diagnosis behind ``focus``, applied to
  edits). ``polish`` as committed.
- ``slot-codes-0.5`` (session 51): the committed grammar, with ``train.SLOT_CODE_WEIGHT`` 0.5 in ``edit`` and
  ``polish``: every input picture's feature slot (an edit's source, an understanding chat's picture) also trained
  to give its own cell's code as its output, so that the code an output cell must write back is there to be read
  (``diagnose.py`` part 9: given the edited picture's semantic codes, the pixel level still loses the shape of 26%
  of the edits).
- ``edit-lr-2e-3`` (session 52): the committed grammar, stage ``edit`` at learning rate EDIT_LR_ARM (2e-3, ``focus``'s)
  instead of EDIT_LR's 1e-3, never varied before. Why: more ``edit`` steps were the one lever that raised editing
  (25% -> 40% -> 45% -> 52% of edits right), by less each time, and the budget has no room for more steps; a fresh
  LLM learned the copy an edit needs quickly at 2e-3 while the committed MLLM took to it slowly at 1e-3 (nano/README.md
  "Editing", sessions 24-25). ``polish`` as committed.
- ``edit-lr-3e-3`` (session 53): stage ``edit`` at 3e-3 (EDIT_LR_3E3), the next step of the one lever that held on
  two pairs of draws (``edit-lr-2e-3``), at seeds 1234 and 2 beside those pairs. ``polish`` as committed.
- ``control`` (session 52): the recipe as committed, for draws of ``edit`` and ``polish`` at another seed
  (``run.sh`` with SEED) beside the arms at that seed.

Usage (``run.sh``), ARM one of the above:

    python edit_arms.py ARM train edit polish export --work W --out O --jobs 1
    python edit_arms.py ARM bind-sampling O
    python edit_arms.py ARM evaluate --weights O --no-reference --split held --sampled held --json J

``bind-sampling`` copies the committed weights' sampling choice (text-to-image guidance 1.5, top-p 0.6; editing
guidance 1.0) into O, bound to O's MLLM weights: the arm is compared at the committed settings (without it the
runtime falls back to the official defaults, which are not what nano is scored at).
"""
import sys

ONE_LENGTH = {"colour": "make the shape {}", "position": "move to {}", "shape": "make it a {}",
              "background": "make the background {}", "size": "make the shape {}"}


def value_words(value: str) -> str:
    return "the center" if value == "center" else value  # "move to top left" and "move to the center": 4 ids each


def patch_grammar() -> None:
    from illume_rt.nano import data, text_tokenizer

    text_tokenizer._learned()  # the committed tokenizer, cached before the grammar changes

    def edits(scene):
        out = []
        for attribute, template in ONE_LENGTH.items():
            for value in data.CHOICES[attribute]:
                target = scene.with_(attribute, value)
                if value != getattr(scene, attribute) and target.colour != target.background:
                    out.append((template.format(value_words(value)), target))
        return out

    data.EDIT_INSTRUCTIONS = ONE_LENGTH
    data.edits = edits


ARMS = ("one-length", "captions-2", "semantic-erase-0.9", "slot-codes-0.5", "edit-lr-2e-3", "edit-lr-3e-3",
        "control")
EDIT_SEMANTIC_ERASE_MAX = 0.9  # the semantic-erase-0.9 arm's
EDIT_LR_ARM = 2e-3  # the edit-lr-2e-3 arm's
EDIT_LR_3E3 = 3e-3  # the edit-lr-3e-3 arm's
COMMANDS = ("train", "evaluate", "lengths", "bind-sampling")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ARMS or argv[1] not in COMMANDS:
        raise SystemExit(f"usage: edit_arms.py {{{','.join(ARMS)}}} {{{','.join(COMMANDS)}}} [that command's "
                         "arguments]")
    arm, argv = argv[0], argv[1:]
    if arm == "one-length":
        patch_grammar()
    if argv[0] == "bind-sampling":
        import json
        from pathlib import Path

        from illume_rt.nano.checkpoint import COMMITTED, NanoWeights, weights_digest

        weights = NanoWeights(Path(argv[1]))
        record = json.loads(COMMITTED.sampling_file.read_text())
        record["weights_sha256"] = weights_digest(weights)
        record["command"] = (f"bench/results/20261206-nano-edit-arms/edit_arms.py {arm} bind-sampling (the committed "
                             "choice)")
        weights.sampling_file.write_text(json.dumps(record, indent=1) + "\n")
        return 0
    if argv[0] == "lengths":  # the ids of every instruction of one scene, to check the one length
        from illume_rt.nano import data, text_tokenizer

        tok = text_tokenizer.build()
        for instruction, _ in data.edits(data.all_scenes()[0]):
            print(len(tok.encode(instruction).ids), instruction)
        return 0
    if argv[0] == "train":
        from illume_rt.nano import train as command

        if arm == "captions-2":
            command.EDIT_T2I_BATCH = 2  # read when stage edit starts
        if arm == "edit-lr-2e-3":
            command.EDIT_LR = EDIT_LR_ARM  # read when stage edit starts; polish has its own POLISH_LR
        if arm == "edit-lr-3e-3":
            command.EDIT_LR = EDIT_LR_3E3
        if arm == "slot-codes-0.5":
            command.SLOT_CODE_WEIGHT = 0.5  # read at every step of edit and polish
        if arm == "semantic-erase-0.9":
            committed_stage_edit = command.stage_edit

            def stage_edit(work):  # ERASE_MAX is read when stage edit starts; polish keeps the committed one
                committed = command.ERASE_MAX
                command.ERASE_MAX = EDIT_SEMANTIC_ERASE_MAX
                try:
                    committed_stage_edit(work)
                finally:
                    command.ERASE_MAX = committed

            command.stage_edit = stage_edit  # run_stage looks stages up by name at call time
    else:
        from illume_rt.nano import evaluate as command
    return command.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
