"""A host's reading of a bundle, written from docs/bundle-format.md alone: it imports nothing of illume-rt.

    python tests/host_reader.py BUNDLE HEIGHTxWIDTH PROMPT   ->  JSON on stdout

Prints what a C++ host would rebuild from the manifest: the id of every position of an image (codes as
{"level": L}), the decode plan (the prefix and, per code, the forced tokens fed before it), and the
text-to-image prompt ids (conditional and unconditional) for PROMPT. tests/test_contract.py compares it with the
runtime's own (tests/test_contract_rules.py: its functions on the contract alone, without a bundle). Only
byte-level tokenizers ("kind": "bytes") are handled here: a host brings its own BPE.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def image_positions(contract: dict, resolution: str) -> list:
    grid = contract["grids"][resolution]
    ids = contract["structure_tokens"]
    names = {level: name for name, level in contract["levels"].items()}
    out: list = []
    for item in contract["image_grammar"]:
        if isinstance(item, str):
            out.append(ids[item])
            continue
        rows, cols = grid[names[item["level"]]]
        for _ in range(rows):
            out += [{"level": item["level"]}] * cols + [ids[item["line_end"]]]
    return out


def decode_plan(positions: list) -> dict:
    first = next(i for i, p in enumerate(positions) if isinstance(p, dict))
    steps, forced = [], []
    for p in positions[first:]:
        if isinstance(p, dict):
            steps.append({"forced": forced, "level": p["level"]})
            forced = []
        else:
            forced.append(p)
    return {"prefix": positions[:first], "steps": steps}


def prompt_ids(manifest: dict, task: str, content: str, height: int, width: int) -> list[int]:
    contract, vocab = manifest["contract"], manifest["vocab"]
    prompts = contract["prompts"]
    assert manifest["tokenizer"]["kind"] == "bytes", "this reader only knows byte-level tokenizers"
    step = vocab["size_tag_step"]
    tags = [vocab["first_height_tag_id"] + height // step - 1, vocab["first_width_tag_id"] + width // step - 1]
    specials = {"<|im_start|>": vocab["im_start_id"], "<|im_end|>": vocab["im_end_id"]}

    def expand(template: str, fields: dict) -> list:
        out: list = []
        for part in re.split(r"(\{[a-z_]+\})", template):
            values = fields[part[1:-1]] if re.fullmatch(r"\{[a-z_]+\}", part) else [part]
            for value in values:
                if isinstance(value, str) and out and isinstance(out[-1], str):
                    out[-1] += value
                elif value != "":
                    out.append(value)
        return out

    fields = {"tags": tags, "image": [prompts["image_placeholder"]], "content": [content]}
    template = prompts["templates"][task]
    chat = {"system": [prompts["system"]], "user": expand(template["user"], fields),
            "assistant_prefix": expand(template["assistant_prefix"], fields)}
    ids: list[int] = []
    for item in prompts["chat_template"]:
        segments = [specials[item]] if item in specials else expand(item, chat)
        for seg in segments:
            ids += [seg] if isinstance(seg, int) else list(seg.encode("utf-8"))
    return ids


def main(argv: list[str]) -> None:
    bundle, resolution, prompt = argv
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    assert manifest["format_version"] == 4
    height, width = (int(x) for x in resolution.split("x"))
    positions = image_positions(manifest["contract"], resolution)
    print(json.dumps({
        "positions": positions,
        "plan": decode_plan(positions),
        "cond": prompt_ids(manifest, "text_to_image", prompt, height, width),
        "uncond": prompt_ids(manifest, "text_to_image_unconditional", "", height, width),
        "imported_illume_rt": any(m == "illume_rt" or m.startswith("illume_rt.") for m in sys.modules),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
