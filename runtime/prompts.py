"""Prompt ids for ILLUME+ tasks: Qwen chat template + ILLUME+ task templates + resolution tags.

Templates follow ILLUME/generation_eval/models/illume.py: the user turn holds the task text with the
``<height_h><width_w>`` tags in place of ``{resolution_tag}``, and the tags are appended again after the
assistant prefix.
"""

from __future__ import annotations

from typing import Union

from illume_rt.runtime.layout import LayoutError, VocabLayout
from illume_rt.runtime.tokenizer import SYSTEM_PROMPT, Tokenizer

Segment = Union[str, int]  # text to tokenize, or a special id

T2I_TEMPLATE = "Generate an image of {tags}, the content of image is {content}\n"
T2I_UNCOND_TEMPLATE = "Generate a random image of {tags}\n"


def chat_ids(tokenizer: Tokenizer, layout: VocabLayout, user: list[Segment], assistant_prefix: list[Segment]) -> list[int]:
    """<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{prefix}"""
    segments: list[Segment] = [
        layout.im_start_id, f"system\n{SYSTEM_PROMPT}", layout.im_end_id, "\n",
        layout.im_start_id, "user\n", *user, layout.im_end_id, "\n",
        layout.im_start_id, "assistant\n", *assistant_prefix,
    ]
    ids: list[int] = []
    for seg in segments:
        if isinstance(seg, int):
            ids.append(seg)
        elif seg:
            ids.extend(tokenizer.encode(seg))
    return ids


def _fill(template: str, tags: list[int], **fields: str) -> list[Segment]:
    """Split a template at {tags} so the tag ids go in as ids."""
    before, after = template.split("{tags}")
    for key, value in fields.items():  # str.replace, not format: prompts may contain braces
        before, after = before.replace("{" + key + "}", value), after.replace("{" + key + "}", value)
    return [before, *tags, after]


MAX_TEXT_CHARS = 1 << 20  # far past any context; stops a runaway argument before tokenizing it


def check_text(text, what: str) -> None:
    """A prompt, question or instruction must be a str that encodes as UTF-8 (command-line bytes that are not
    UTF-8 arrive as lone surrogates)."""
    if not isinstance(text, str):
        raise LayoutError(f"the {what} must be text (str), not {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise LayoutError(f"the {what} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LayoutError(f"the {what} is not valid UTF-8 text; pass it in UTF-8") from None


def text_to_image_ids(tokenizer: Tokenizer, layout: VocabLayout, prompt: str, height: int, width: int
                      ) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) prompt ids for text to image."""
    check_text(prompt, "prompt")
    if not prompt.strip():
        raise LayoutError("the prompt is empty: describe the image, e.g. \"a red circle on a blue background\"")
    tags = [layout.height_tag(height), layout.width_tag(width)]
    cond = chat_ids(tokenizer, layout, _fill(T2I_TEMPLATE, tags, content=prompt), tags)
    uncond = chat_ids(tokenizer, layout, _fill(T2I_UNCOND_TEMPLATE, tags), tags)
    return cond, uncond


# Where the image block goes in a prompt's ids (the official IMAGE_TOKEN_INDEX); never a vocabulary id.
IMAGE_PLACEHOLDER = -200
UNDERSTAND_TEMPLATE = "\n{content}"  # user turn: <image>\n{question} (ILLUME/app.py)
EDIT_TEMPLATE = "\nPlease edit the image according to the instruction: {content}\n"  # ILLUME/app.py (no period)
EDIT_UNCOND_TEMPLATE = "\nReconstruct the image according to the given image\n"


def understanding_ids(tokenizer: Tokenizer, layout: VocabLayout, question: str) -> list[int]:
    check_text(question, "question")
    if not question.strip():
        raise LayoutError("the question is empty: ask something about the image, e.g. \"What is in the image?\"")
    return chat_ids(tokenizer, layout, [IMAGE_PLACEHOLDER, UNDERSTAND_TEMPLATE.replace("{content}", question)], [])


def editing_ids(tokenizer: Tokenizer, layout: VocabLayout, instruction: str, height: int, width: int
                ) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) ids for editing; both hold the same image at IMAGE_PLACEHOLDER."""
    check_text(instruction, "instruction")
    if not instruction.strip():
        raise LayoutError("the instruction is empty: say how to change the image, e.g. \"make the sky red\"")
    tags = [layout.height_tag(height), layout.width_tag(width)]
    cond = chat_ids(tokenizer, layout, [*tags, IMAGE_PLACEHOLDER, EDIT_TEMPLATE.replace("{content}", instruction)],
                    tags)
    uncond = chat_ids(tokenizer, layout, [*tags, IMAGE_PLACEHOLDER, EDIT_UNCOND_TEMPLATE], tags)
    return cond, uncond
