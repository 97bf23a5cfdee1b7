"""Pictures of the bundled benchmark's scenes, for the multimodal runner and demo.

    from cl_core.continual.images import draw_scene, scene_from_description, split_scene_prompt
    img = draw_scene(scene)                       # a 48 x 48 RGB PIL image
    prompt, scene = split_scene_prompt(sample.prompt)   # the prompt without its scene line

Every synthetic prompt (:mod:`cl_core.continual.synthetic`) starts with the scene's text
description (``scene : red small circle stop 1 2 3 5 ;``). In multimodal mode that line is
removed and the scene is drawn instead, so the answers must be read from the picture; the
line is parsed back into a :class:`~cl_core.continual.synthetic.Scene`
(:func:`scene_from_description`, the exact inverse of ``Scene.describe``, tested), so the
benchmark's generators are used unchanged.

The picture (``IMAGE_SIZE`` 48 pixels; the tiny vision tower's 12-pixel patches give 4 x 4 =
16 image tokens) has two halves:

* the caption (rows 0-23, the top two patch rows): each object's label, its colour as the
  background with its shape drawn in black and its word as a black code. One object fills the
  caption (shape on the left 24 x 24 pixels, word on the right); two or three share it
  side by side (shape above, word below). Word k of ``synthetic.WORDS`` is the 4-bit code of
  k+1 drawn as four vertical bars (black where the bit is set).
* the grid (rows 26-45, columns 4-43): the 10 x 10 grid at 4 x 2 pixels per cell; each
  object's box (cells x1..x2, y1..y2, inclusive) has a dark grey outline and a light tint of
  its colour, and inside it the object's shape in its colour, filling the box (``big``) or a
  centred box of half the size (``small``). Position, box, size and the number of objects are
  read here only.

Why a caption with codes, not text written on the objects: a word in a box two cells wide is
8 pixels, too small for letters, and a vision tower of two layers trained for a minute from
scratch cannot learn to read letters; a bar code per word is readable and still has to be
learned from pixels. Why the caption is large, with the colour as its background: the tiny
LLaVA learns what one image token in 16 holds only slowly, and what several uniform tokens
hold quickly (measured with full fine-tuning, 200 steps of batch 16 on the GQA-like colour
question: a colour in one 12-pixel patch 28 %, in four patches 100 %; the object's colour
drawn only as a silhouette in its box and a small label stayed at chance, about 17 %). A blank
picture (:func:`blank_image`) is the empty canvas: no objects, no caption.
"""
from __future__ import annotations

IMAGE_SIZE = 48       # pixels, square
PATCH_SIZE = 12       # the tiny vision tower's patch (4 x 4 = 16 image tokens)
LABEL_H = 24          # the caption: the top two patch rows
CELL_W, CELL_H = 4, 2  # pixels per grid cell: the grid is 40 x 20 pixels in the bottom half
GRID_LEFT, GRID_TOP = 4, 26
BACKGROUND = (255, 255, 255)
OUTLINE = (64, 64, 64)
INK = (0, 0, 0)
RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50), "yellow": (235, 210, 20),
       "purple": (140, 40, 170), "orange": (250, 130, 10)}


def blank_image(size: int = IMAGE_SIZE):
    """The empty canvas (what a scene without objects looks like)."""
    from PIL import Image

    return Image.new("RGB", (size, size), BACKGROUND)


def _shape(draw, shape: str, box, color) -> None:
    """``shape`` filling the pixel box (x1, y1, x2, y2), inclusive corners."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(x1, y2), (x2, y2), (cx, y1)], fill=color)
    elif shape == "star":
        import math

        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.22
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * w * math.cos(a) * 1.0, cy + r * h * math.sin(a) * 1.05))
        draw.polygon(pts, fill=color)
    elif shape == "heart":
        draw.ellipse((x1, y1, cx, cy + h * 0.1), fill=color)
        draw.ellipse((cx, y1, x2, cy + h * 0.1), fill=color)
        draw.polygon([(x1, cy - h * 0.05), (x2, cy - h * 0.05), (cx, y2)], fill=color)
    elif shape == "cross":
        tw, th = max(1, w / 3), max(1, h / 3)
        draw.rectangle((cx - tw / 2, y1, cx + tw / 2, y2), fill=color)
        draw.rectangle((x1, cy - th / 2, x2, cy + th / 2), fill=color)
    else:
        raise ValueError(f"cannot draw shape {shape!r}")


def _tint(color) -> tuple:
    """A light version of ``color`` (a third of it on white): the box's background."""
    return tuple(int(255 - (255 - c) / 3) for c in color)


def _glyph(draw, word: str, box, color) -> None:
    """Word k of synthetic.WORDS as the 4-bit code of k+1: four vertical bars across ``box``,
    drawn in ``color`` where the bit is set."""
    from cl_core.continual.synthetic import WORDS

    x1, y1, x2, y2 = box
    code = WORDS.index(word) + 1          # 1..8: never the empty glyph
    width = (x2 - x1 + 1) / 4
    for bit in range(4):
        if code >> bit & 1:
            draw.rectangle((x1 + width * bit, y1, x1 + width * (bit + 1) - 1, y2), fill=color)


def draw_scene(scene, size: int = IMAGE_SIZE):
    """The picture of ``scene`` (see the module docstring). ``size`` must be IMAGE_SIZE: the
    layout is fixed (a tiny model reads it by position)."""
    from PIL import Image, ImageDraw

    if size != IMAGE_SIZE:
        raise ValueError(f"scene pictures are {IMAGE_SIZE} pixels, got size={size}")
    n = len(scene.objects)
    if not 1 <= n <= 3:
        raise ValueError(f"a scene picture has label room for 1 to 3 objects, got {n}")
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene.objects):
        color = RGB[obj.color]
        x1, y1, x2, y2 = obj.box
        px1, py1 = GRID_LEFT + CELL_W * x1, GRID_TOP + CELL_H * y1
        px2, py2 = GRID_LEFT + CELL_W * (x2 + 1) - 1, GRID_TOP + CELL_H * (y2 + 1) - 1
        draw.rectangle((px1, py1, px2, py2), fill=_tint(color), outline=OUTLINE)
        inner = (px1 + 1, py1 + 1, px2 - 1, py2 - 1)
        if obj.size == "small":
            qw, qh = (inner[2] - inner[0]) / 4, (inner[3] - inner[1]) / 4
            inner = (inner[0] + qw, inner[1] + qh, inner[2] - qw, inner[3] - qh)
        _shape(draw, obj.shape, inner, color)
        # the label: one object fills the caption (shape left, word right); several share it
        # (the label's background is the colour, its shape and word are drawn in black on it)
        if n == 1:
            draw.rectangle((0, 0, size - 1, LABEL_H - 1), fill=color)
            _shape(draw, obj.shape, (2, 2, LABEL_H - 3, LABEL_H - 3), INK)
            _glyph(draw, obj.word, (LABEL_H + 2, 2, size - 3, LABEL_H - 3), INK)
        else:
            w = size // n
            draw.rectangle((w * i, 0, w * (i + 1) - 1, LABEL_H - 1), fill=color)
            _shape(draw, obj.shape, (w * i + 2, 1, w * (i + 1) - 3, LABEL_H // 2 - 2), INK)
            _glyph(draw, obj.word, (w * i + 2, LABEL_H // 2, w * (i + 1) - 3, LABEL_H - 2), INK)
    return img


def scene_from_description(text: str):
    """The Scene whose ``describe()`` is ``text`` (ValueError for anything else)."""
    from cl_core.continual.synthetic import Scene, SceneObject

    text = text.strip()
    if not text.startswith("scene :"):
        raise ValueError(f"not a scene description: {text[:60]!r}")
    objects = []
    for part in text[len("scene :"):].split(";"):
        words = part.split()
        if not words:
            continue
        if len(words) != 8:
            raise ValueError(f"a scene object needs colour size shape word x1 y1 x2 y2, got {part.strip()!r}")
        color, size, shape, word = words[:4]
        objects.append(SceneObject(color, shape, size, tuple(int(v) for v in words[4:]), word))
    scene = Scene(tuple(objects))
    if scene.describe() != text:
        raise ValueError(f"not a scene description in the benchmark's format: {text[:60]!r}")
    return scene


def split_scene_prompt(prompt: str):
    """(the prompt without its first line, the Scene that line describes)."""
    first, _, rest = prompt.partition("\n")
    return rest, scene_from_description(first)
