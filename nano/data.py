"""Scenes of one coloured shape on a plain background, rendered in code, with captions and question/answer pairs.

Everything is a pure function of the scene (and of a seed for jittered training renders), so data, splits and
scores are reproducible. A scene is (shape, colour, size, position, background); 450 combinations exist, a fixed
~10% of them (``is_held_out``) never appear in training and serve as the evaluation prompts/images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 256
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "blue": (40, 80, 220), "gray": (128, 128, 128)}
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.25, 0.75), "bottom left": (0.75, 0.25),
             "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}  # (row, col) of the centre, fraction of the side
SIZES = {"small": 0.11, "large": 0.17}  # half-extent of the shape, fraction of the side
PALETTE = {**COLOURS, **BACKGROUNDS}  # every named colour (blue is both)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position} on a {self.background} background"

    @property
    def short_caption(self) -> str:
        """The caption without the size (either size fits it), e.g. the quick start's prompt."""
        return f"a {self.colour} {self.shape} at the {self.position} on a {self.background} background"

    def with_(self, attribute: str, value: str) -> "Scene":
        return Scene(**{**self.__dict__, attribute: value})

    def qa(self) -> list[tuple[str, str]]:
        """(question, answer) pairs: what colour, which shape, where, what background, how big."""
        return [("What colour is the shape?", self.colour), ("Which shape is it?", self.shape),
                ("Where is the shape?", self.position), ("What colour is the background?", self.background),
                ("How big is the shape?", self.size)]


QUESTIONS = tuple(q for q, _ in Scene("circle", "red", "small", "center", "white").qa())
ATTRIBUTES = ("shape", "colour", "size", "position", "background")  # in the order of QUESTIONS' answers
CHOICES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
           "background": tuple(BACKGROUNDS)}


def all_scenes() -> list[Scene]:
    """Every valid combination (the shape's colour differs from the background), in a fixed order."""
    return [Scene(s, c, z, p, b) for s, c, z, p, b in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS)
            if c != b]


def is_held_out(scene: Scene) -> bool:
    """A fixed ~10% of the combinations, chosen so every value of every attribute, and every colour/background
    pair, still appears in training."""
    idx = [CHOICES[a].index(getattr(scene, a)) for a in ATTRIBUTES]
    return (idx[0] * 7 + idx[1] * 5 + idx[2] * 3 + idx[3] * 2 + idx[4] * 11) % 10 == 3


def split() -> tuple[list[Scene], list[Scene]]:
    scenes = all_scenes()
    return [s for s in scenes if not is_held_out(s)], [s for s in scenes if is_held_out(s)]


def trained_sizes(scene: Scene, scenes: list[Scene]) -> set[str]:
    """The sizes at which ``scenes`` show ``scene``'s size-free context (shape, colour, position, background): what
    a short caption of that context is trained to draw (nano/README.md, Diagnosis item 9)."""
    return {s.size for s in scenes if s.with_("size", scene.size) == scene}


def scene_from_caption(caption: str) -> Scene | None:
    """The scene a caption of ``Scene.caption``'s grammar describes, or None."""
    for s in all_scenes():
        if s.caption == caption.strip():
            return s
    return None


def attributes_of_caption(caption: str) -> dict[str, str] | None:
    """{attribute: value} a caption (full or short form) asks for; the short form asks nothing about size."""
    for s in all_scenes():
        if s.caption == caption.strip():
            return {a: getattr(s, a) for a in ATTRIBUTES}
        if s.short_caption == caption.strip():
            return {a: getattr(s, a) for a in ATTRIBUTES if a != "size"}
    return None


# Editing: one instruction per attribute, in the words; the edited scene changes that attribute only.
EDIT_INSTRUCTIONS = {"colour": "make the shape {}", "position": "move it to the {}", "shape": "make it a {}",
                     "background": "make the background {}", "size": "make it {}"}


def edits(scene: Scene) -> list[tuple[str, Scene]]:
    """(instruction, edited scene) for every valid single-attribute change of ``scene`` (the shape's colour stays
    unlike the background's, as in every scene), in a fixed order."""
    out = []
    for attribute, template in EDIT_INSTRUCTIONS.items():
        for value in CHOICES[attribute]:
            target = scene.with_(attribute, value)
            if value != getattr(scene, attribute) and target.colour != target.background:
                out.append((template.format(value), target))
    return out


def shape_mask(shape: str, centre: tuple[float, float], half: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask; centre (row, col) and half-extent in pixels. Triangle: apex up, base down."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cy, cx = centre
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)
    if shape == "triangle":
        t = (y - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * half)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]. With ``rng``: the centre jitters by up to 4% and the extent by up to 8% (training
    variety); without it the canonical picture."""
    fy, fx = POSITIONS[scene.position]
    half = SIZES[scene.size] * size
    cy, cx = fy * size, fx * size
    if rng is not None:
        cy += rng.uniform(-0.04, 0.04) * size
        cx += rng.uniform(-0.04, 0.04) * size
        half *= rng.uniform(0.92, 1.08)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    img[shape_mask(scene.shape, (cy, cx), half, size)] = COLOURS[scene.colour]
    return img


def to_model_input(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1] (the DualViTok convention)."""
    return (img.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0).astype(np.float32)
