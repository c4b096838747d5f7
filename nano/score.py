"""Read shape, colour, size, position and background back from the pixels of a picture, and score prompt
accuracy (generation) and answer accuracy (understanding).

The reading is deliberately simple and independent of any network: background = the palette colour nearest to the
median of the border pixels; object = pixels far from the background colour, opened by a 5x5 square (specks and
seams of decoded pictures go); colour = palette colour nearest to the object's median; position = the canonical
place nearest to the object's centroid; shape = the share of the object in the top half of its bounding box
(a triangle, apex up, has ~1/4 there; decoded pictures blunt its apex, so the fill ratio alone misleads), else the
fill ratio of the box (square ~1.0, circle ~0.785); size = the bounding box's side against the two canonical extents.
"""

from __future__ import annotations

import numpy as np

from illume_rt.nano import data

MIN_OBJECT_FRACTION = 0.004  # an object must cover this much of the picture (about 260 px at 256x256)
OBJECT_DISTANCE = 60.0  # RGB distance from the background colour that makes a pixel part of the object
OPENING = 5  # side of the square that opens the object mask


def _box_count(mask: np.ndarray, k: int) -> np.ndarray:
    """Number of set pixels in the k x k window centred on each pixel (zero padding)."""
    pad = np.pad(mask.astype(np.int32), k // 2 + 1)
    c = pad.cumsum(0).cumsum(1)
    h, w = mask.shape
    return c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]


def _open(mask: np.ndarray, k: int) -> np.ndarray:
    """Morphological opening with a k x k square (erode, then dilate)."""
    eroded = _box_count(mask, k) == k * k
    return _box_count(eroded, k) > 0


def _nearest(rgb: np.ndarray, names: dict[str, tuple[int, int, int]]) -> str:
    keys = list(names)
    table = np.array([names[k] for k in keys], np.float32)
    return keys[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def read_scene(img: np.ndarray) -> dict[str, str | None]:
    """uint8 [H, W, 3] -> {attribute: value or None when unreadable}."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError("read_scene wants a uint8 [H, W, 3] picture")
    h, w, _ = img.shape
    pix = img.astype(np.float32)
    border = np.concatenate([pix[:2].reshape(-1, 3), pix[-2:].reshape(-1, 3), pix[:, :2].reshape(-1, 3),
                             pix[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, data.BACKGROUNDS)
    out: dict[str, str | None] = {a: None for a in data.ATTRIBUTES}
    out["background"] = background
    mask = np.sqrt(((pix - np.array(data.BACKGROUNDS[background], np.float32)) ** 2).sum(-1)) > OBJECT_DISTANCE
    mask = _open(mask, OPENING)  # specks and thin seams of a decoded picture are not the object
    if mask.mean() < MIN_OBJECT_FRACTION:
        return out
    ys, xs = np.nonzero(mask)
    out["colour"] = _nearest(np.median(pix[mask], axis=0), data.COLOURS)
    cy, cx = ys.mean() / h, xs.mean() / w
    # The triangle's centroid sits below its box centre: use the box centre for the position.
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    by, bx = (y0 + y1) / 2 / h, (x0 + x1) / 2 / w
    out["position"] = min(data.POSITIONS, key=lambda p: (data.POSITIONS[p][0] - by) ** 2 + (data.POSITIONS[p][1] - bx) ** 2)
    box = mask[y0:y1, x0:x1]
    fill = box.mean()
    top = box[:(y1 - y0) // 2].sum() / max(1, box.sum())  # triangle (apex up): ~1/4 of it is in the top half
    out["shape"] = "triangle" if top < 0.4 else "square" if fill > 0.82 else "circle"
    extent = ((y1 - y0) / h + (x1 - x0) / w) / 4  # half-extent, fraction of the side
    out["size"] = min(data.SIZES, key=lambda s: abs(data.SIZES[s] - extent))
    del cy, cx
    return out


def score_picture(img: np.ndarray, wanted: dict[str, str]) -> dict[str, bool]:
    """{attribute: correct} for the attributes in ``wanted``, plus 'all'."""
    got = read_scene(img)
    marks = {a: got[a] == v for a, v in wanted.items()}
    marks["all"] = all(marks.values())
    return marks


def summarize(marks: list[dict[str, bool]]) -> dict[str, float]:
    """Mean of each mark over pictures (attributes missing from a prompt are not counted)."""
    keys = sorted({k for m in marks for k in m})
    return {k: float(np.mean([m[k] for m in marks if k in m])) for k in keys}


CHANCE = {"shape": 1 / 3, "colour": 1 / 4, "size": 1 / 2, "position": 1 / 5, "background": 1 / 4}


def answer_correct(answer: str, expected: str) -> bool:
    """An answer is right when, stripped and lower-cased, it equals the expected word(s)."""
    return answer.strip().strip(".").lower() == expected
