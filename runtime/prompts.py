"""Prompt ids for ILLUME+ tasks: Qwen chat template + ILLUME+ task templates + resolution tags.

Templates follow ILLUME/generation_eval/models/illume.py: the user turn holds the task text with the
``<height_h><width_w>`` tags in place of ``{resolution_tag}``, and the tags are appended again after the
assistant prefix.
"""

from __future__ import annotations

import re
from typing import Union

from illume_rt.contract import (CHAT_TEMPLATE, IMAGE_PLACEHOLDER, PROMPT_TEMPLATES, SYSTEM_PROMPT, LayoutError,
                                VocabLayout)
from illume_rt.runtime.tokenizer import Tokenizer

Segment = Union[str, int]  # text to tokenize, or a special id

_FIELD = re.compile(r"(\{[a-z_]+\})")
_CHAT_SPECIALS = {"<|im_start|>": "im_start_id", "<|im_end|>": "im_end_id"}


def expand(template: str, fields: dict[str, list[Segment]]) -> list[Segment]:
    """A template with {field}s -> segments. A field's value is inserted as it is (never re-parsed, so a prompt may
    contain braces); text next to text is joined, so it is tokenized as one string, as the official code does."""
    out: list[Segment] = []
    for part in _FIELD.split(template):
        values = fields[part[1:-1]] if _FIELD.fullmatch(part) else [part]
        for value in values:
            if isinstance(value, str) and out and isinstance(out[-1], str):
                out[-1] += value
            elif value != "":
                out.append(value)
    return out


def chat_ids(tokenizer: Tokenizer, layout: VocabLayout, user: list[Segment], assistant_prefix: list[Segment]) -> list[int]:
    """CHAT_TEMPLATE (contract): system turn, the user turn, and the assistant turn's start plus a prefix."""
    segments: list[Segment] = []
    fields = {"system": [SYSTEM_PROMPT], "user": user, "assistant_prefix": assistant_prefix}
    for item in CHAT_TEMPLATE:
        segments += [getattr(layout, _CHAT_SPECIALS[item])] if item in _CHAT_SPECIALS else expand(item, fields)
    ids: list[int] = []
    for seg in segments:
        ids.extend([seg] if isinstance(seg, int) else tokenizer.encode(seg))
    return ids


def task_ids(tokenizer: Tokenizer, layout: VocabLayout, task: str, content: str = "",
             size: tuple[int, int] | None = None) -> list[int]:
    """Prompt ids of one PROMPT_TEMPLATES entry; ``size`` (height, width) gives the resolution tags."""
    tags = [layout.height_tag(size[0]), layout.width_tag(size[1])] if size else []
    fields = {"tags": tags, "image": [IMAGE_PLACEHOLDER], "content": [content]}
    template = PROMPT_TEMPLATES[task]
    return chat_ids(tokenizer, layout, expand(template["user"], fields), expand(template["assistant_prefix"], fields))


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
    cond = task_ids(tokenizer, layout, "text_to_image", prompt, (height, width))
    uncond = task_ids(tokenizer, layout, "text_to_image_unconditional", size=(height, width))
    return cond, uncond


def understanding_ids(tokenizer: Tokenizer, layout: VocabLayout, question: str) -> list[int]:
    check_text(question, "question")
    if not question.strip():
        raise LayoutError("the question is empty: ask something about the image, e.g. \"What is in the image?\"")
    return task_ids(tokenizer, layout, "understanding", question)


def editing_ids(tokenizer: Tokenizer, layout: VocabLayout, instruction: str | None, height: int, width: int
                ) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) ids for editing; both hold the same image at IMAGE_PLACEHOLDER. ``instruction``
    None: the reconstruct prompt (the unconditional one) in both rows, which asks for the picture back."""
    uncond = task_ids(tokenizer, layout, "editing_unconditional", size=(height, width))
    if instruction is None:
        return uncond, uncond
    check_text(instruction, "instruction")
    if not instruction.strip():
        raise LayoutError("the instruction is empty: say how to change the image, e.g. \"make the sky red\"")
    return task_ids(tokenizer, layout, "editing", instruction, (height, width)), uncond
