"""A PNG of a few test faces with a probe's predictions drawn over them, for a person to look
at: landmarks (truth green, prediction red), head pose axes (x red, y green, z blue; the
prediction large at the centre, the truth small in the top-left corner) , the parsing
probe's classes or the attribute probe's answers."""

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.transforms import denormalize

COLUMNS = 4
TILE = 192  # pixels a tile is drawn at, at least


def face_tile(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((denormalize(x).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def draw_landmarks(draw: ImageDraw.ImageDraw, pred, truth, size: int) -> None:
    r = max(1.0, size / 112)
    for points, colour in ((truth, (0, 255, 0)), (pred, (255, 0, 0))):
        for x, y in points.tolist():
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def axes(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """[3, 2] image-plane directions of the head's x, y, z axes (image y down) for angles in
    degrees: the rotation Rx(pitch) Ry(yaw) Rz(roll) of the head's frame, projected
    orthographically (yaw's sign: positive turns the head towards the image's left)."""
    p, y, r = (math.radians(v) for v in (pitch, -yaw, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return (rx @ ry @ rz)[:2].T  # row k: the image-plane x, y of the head's axis k


def draw_pose(draw: ImageDraw.ImageDraw, pred, truth, size: int) -> None:
    for angles, (cx, cy), length, width in ((pred, (size / 2, size / 2), size / 3, 3),
                                            (truth, (size / 8, size / 8), size / 10, 2)):
        for (dx, dy), colour in zip(axes(*angles.tolist()), ((255, 0, 0), (0, 255, 0), (0, 0, 255))):
            draw.line((cx, cy, cx + length * dx, cy + length * dy), fill=colour, width=width)


def draw_parsing(draw: ImageDraw.ImageDraw, pred, truth, size: int) -> None:
    """The predicted classes [S, S] blended over the face, one colour each (background left
    clear); `truth` is not drawn."""
    ids = Image.fromarray(pred.numpy().astype(np.uint8), "L").resize((size, size), Image.NEAREST)
    ids = np.asarray(ids)
    for c in np.unique(ids[ids > 0]).tolist():
        hue = (c * 0.618034) % 1.0  # (golden-ratio hues: neighbouring ids far apart)
        colour = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.9, 1.0))
        draw.bitmap((0, 0), Image.fromarray(((ids == c) * 110).astype(np.uint8), "L"), fill=colour)


def attribute_drawer(names: list[str]):
    """A drawer of binary attributes [A] (1 present) by `names`: each predicted present, green
    when right, red when wrong, then each missed one in yellow."""

    def draw_attributes(draw: ImageDraw.ImageDraw, pred, truth, size: int) -> None:
        lines = [(n, (0, 255, 0) if t > 0 else (255, 0, 0)) for n, p, t in zip(names, pred.tolist(), truth.tolist())
                 if p > 0]
        lines += [(n, (255, 255, 0)) for n, p, t in zip(names, pred.tolist(), truth.tolist()) if t > 0 and p <= 0]
        for k, (name, colour) in enumerate(lines[: size // 12]):
            draw.text((2, 1 + 12 * k), name, fill=colour)

    return draw_attributes


def write_preview(path, dataset, items, drawer) -> None:
    """`items`: (face index in `dataset`, prediction, truth) in the crop's pixels (landmarks) or
    degrees (pose); `drawer`: draw_landmarks or draw_pose. Faces that no longer read are left out."""
    tiles = []
    for index, pred, truth in items:
        item, _ = dataset[index]
        if item is None:
            continue
        tile = face_tile(item[0])
        zoom = max(1, TILE // tile.size[0])  # (small inputs drawn larger, to be seen)
        tile = tile.resize((tile.size[0] * zoom,) * 2, Image.NEAREST)
        drawer(ImageDraw.Draw(tile), pred * zoom if pred.shape[-1] == 2 else pred,
               truth * zoom if truth.shape[-1] == 2 else truth, tile.size[0])
        tiles.append(tile)
    if not tiles:
        return
    s, cols = tiles[0].size[0], min(COLUMNS, len(tiles))
    sheet = Image.new("RGB", (cols * s, -(-len(tiles) // cols) * s))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % cols) * s, (k // cols) * s))
    sheet.save(path)


__all__ = ["write_preview", "face_tile", "draw_landmarks", "draw_pose", "draw_parsing", "attribute_drawer", "axes"]
