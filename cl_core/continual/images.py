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

The picture (``IMAGE_SIZE`` 48 pixels, the tiny vision tower's 8-pixel patches: 6 x 6 = 36
image tokens) has two parts:

* the grid (rows 8-47, columns 4-43): the 10 x 10 grid at 4 pixels per cell; each object's
  box (cells x1..x2, y1..y2, inclusive) has a dark grey outline, and inside it the object's
  shape is drawn in its colour, filling the box (``big``) or a centred box of half the size
  (``small``). Position, box, size and the number of objects are read here.
* the label strip (rows 0-7): for object i (in the scene's order) the 8 x 8 patch at columns
  16i..16i+7 shows its shape in its colour at a fixed size, and the next patch its word as a
  glyph: word k of ``synthetic.WORDS`` is the 4-bit code of k+1 drawn as black 2-pixel
  vertical bars.

Why a glyph and a label strip, not written text: a word in a 2-5 cell box is 8-20 pixels
wide, too small for letters, and a 2-layer vision tower trained for a minute from scratch
cannot learn to read letters anyway; a fixed-position glyph per word (one patch, so the
patch embedding alone can tell the eight apart) is readable and still has to be learned from
pixels. Likewise shapes drawn in boxes two cells wide are a few pixels, so the strip repeats
each object's shape and colour at a readable size, as a caption beside a photo would. The
box, the size and the count exist only in the grid.

A blank picture (:func:`blank_image`) is the empty canvas: no objects, no labels.
"""
from __future__ import annotations

from typing import Optional

IMAGE_SIZE = 48       # pixels, square
PATCH_SIZE = 8        # the tiny vision tower's patch: one label glyph per patch
CELL = 4              # pixels per grid cell
GRID_TOP = 8          # the grid starts below the label strip
GRID_LEFT = 4         # and is centred horizontally (40 of 48 pixels)
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


def _glyph(draw, word: str, x: int, y: int) -> None:
    from cl_core.continual.synthetic import WORDS

    code = WORDS.index(word) + 1          # 1..8: never the empty glyph
    for bit in range(4):
        if code >> bit & 1:
            draw.rectangle((x + 2 * bit, y, x + 2 * bit + 1, y + PATCH_SIZE - 1), fill=INK)


def draw_scene(scene, size: int = IMAGE_SIZE):
    """The picture of ``scene`` (see the module docstring). ``size`` must be IMAGE_SIZE: the
    layout is fixed (a tiny model reads it by position)."""
    from PIL import Image, ImageDraw

    if size != IMAGE_SIZE:
        raise ValueError(f"scene pictures are {IMAGE_SIZE} pixels, got size={size}")
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if len(scene.objects) > size // (2 * PATCH_SIZE):
        raise ValueError(f"a scene picture has label room for {size // (2 * PATCH_SIZE)} objects, "
                         f"got {len(scene.objects)}")
    for i, obj in enumerate(scene.objects):
        color = RGB[obj.color]
        x1, y1, x2, y2 = obj.box
        px1, py1 = GRID_LEFT + CELL * x1, GRID_TOP + CELL * y1
        px2, py2 = GRID_LEFT + CELL * (x2 + 1) - 1, GRID_TOP + CELL * (y2 + 1) - 1
        draw.rectangle((px1, py1, px2, py2), outline=OUTLINE)
        inner = (px1 + 1, py1 + 1, px2 - 1, py2 - 1)
        if obj.size == "small":
            qw, qh = (inner[2] - inner[0]) / 4, (inner[3] - inner[1]) / 4
            inner = (inner[0] + qw, inner[1] + qh, inner[2] - qw, inner[3] - qh)
        _shape(draw, obj.shape, inner, color)
        lx = 2 * PATCH_SIZE * i
        _shape(draw, obj.shape, (lx, 0, lx + PATCH_SIZE - 1, PATCH_SIZE - 1), color)
        _glyph(draw, obj.word, lx + PATCH_SIZE, 0)
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


def image_summary(images, folder: Optional[str] = None) -> dict:
    """What the report says about the images a run used: how many distinct ones, their sizes
    (``sizes``: "WxH" -> count) and where they came from. ``images``: the distinct image
    references (paths, or Scenes of the bundled benchmark)."""
    from PIL import Image

    sizes: dict = {}
    drawn = 0
    for ref in images:
        if isinstance(ref, str):
            with Image.open(ref) as im:
                key = f"{im.width}x{im.height}"
        else:
            drawn += 1
            key = f"{IMAGE_SIZE}x{IMAGE_SIZE}"
        sizes[key] = sizes.get(key, 0) + 1
    return {"count": len(images), "drawn": drawn, "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
            "folder": folder}
