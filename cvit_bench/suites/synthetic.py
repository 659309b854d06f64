"""Deterministic procedural scenes for the cvit-v1 suite, written as LLaVA-format JSON + PNG.

A scene is a frozen set of drawn parameters (`Scene`); its canonical key keeps splits
disjoint and its rendering is a pure function of it. Geometry lives in a 64-unit design
space and is drawn supersampled, so `image_size` changes resolution, never content.
Visuals follow DESIGN.md §4: a from-scratch tower at 64 px learns large, clean shapes
and reads words only as big uppercase glyphs in fixed slots, so nothing smaller is drawn.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

TASK_KINDS: tuple[str, ...] = (
    "pretrain", "mcq", "ocr", "caption", "classify", "relation",
    "vqa", "ground", "unanswerable", "textcap", "scene",
)

DESIGN = 64  # every coordinate below is in units of a 64 px canvas
SUPERSAMPLE_PX = 256  # draw at least this large, then downsample for clean edges
FULL = (2, 2, 62, 62)  # drawable area: shapes keep a 2-unit margin
MAX_ATTEMPTS = 1000

RGB = tuple[int, int, int]
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 70, 225),
    "yellow": (240, 200, 0), "purple": (140, 40, 190), "orange": (250, 125, 0),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")
WORDS = (
    "cat", "dog", "sun", "hat", "cup", "box", "bed", "car", "bus", "pen",
    "map", "key", "egg", "fox", "owl", "bee", "cow", "pig", "ant", "bat",
    "jar", "fan", "net", "pot", "rug", "toy", "van", "web", "zip", "ice",
    "ink", "oak", "sea", "sky", "tea", "leg", "arm", "ear", "eye", "lip",
)
PLACES = ("beach", "forest", "night", "snow", "desert", "ocean")
PLAIN_BACKGROUNDS: dict[str, RGB] = {
    "white": (255, 255, 255), "cream": (250, 244, 226),
    "lightgrey": (230, 230, 230), "lightblue": (222, 236, 250),
}
INKS: dict[str, RGB] = {
    "black": (20, 20, 20), "navy": (20, 30, 110), "maroon": (120, 20, 20), "darkgreen": (15, 80, 30),
}
NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}

GLYPH_SLOT_CENTRES = (12, 32, 52)  # one glyph per fixed slot: the only layout the tower learns to read
GLYPH_MAX_WIDTH = 18
OCR_ROW_TOP = 21
TEXTCAP_ROW_TOP = 3
BELOW_TEXT = (2, 29, 62, 62)
SINGLE_REGIONS = {"left": (2, 2, 28, 62), "middle": (20, 2, 44, 62), "right": (36, 2, 62, 62)}
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
DEGRADATIONS = ("blur_dark", "noise")
LOW_CONTRAST = {  # shape colours that blend into a place's texture
    "beach": {"yellow"}, "forest": {"green"}, "night": {"blue", "purple"},
    "snow": set(), "desert": {"orange", "yellow"}, "ocean": {"blue"},
}


def place_names() -> tuple[str, ...]:
    """Places drawn as textured backgrounds (scene task and pretraining)."""
    return PLACES


def shape_names() -> tuple[str, ...]:
    return SHAPES


def colour_names() -> tuple[str, ...]:
    return tuple(COLOURS)


def words() -> tuple[str, ...]:
    """The 3-letter words drawn as glyphs (answers are lowercase, glyphs uppercase)."""
    return WORDS


# ---------------------------------------------------------------- scene model


@dataclass(frozen=True)
class Shape:
    name: str
    colour: str
    cx: int
    cy: int
    size: int

    def points(self) -> list[tuple[float, float]] | None:
        """Polygon vertices in design units; None for shapes drawn as ellipses."""
        r = self.size / 2
        unit = _UNIT_POLYGONS.get(self.name)
        return None if unit is None else [(self.cx + x * r, self.cy + y * r) for x, y in unit]

    def box(self) -> tuple[float, float, float, float]:
        """Tight bounding box of what is drawn, in design units."""
        pts = self.points()
        if pts is None:
            r = self.size / 2
            return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)
        xs, ys = zip(*pts)
        return (min(xs), min(ys), max(xs), max(ys))


def _regular(n: int, radii: Sequence[float], start_deg: float) -> list[tuple[float, float]]:
    step = 360 / n
    return [
        (radii[i % len(radii)] * math.cos(math.radians(start_deg + i * step)),
         radii[i % len(radii)] * math.sin(math.radians(start_deg + i * step)))
        for i in range(n)
    ]


_T = 1 / 3  # half-thickness of the cross arms, relative to the radius
_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "hexagon": _regular(6, [1.0], 0),
    "star": _regular(10, [1.0, 0.45], -90),
    "cross": [(-_T, -1), (_T, -1), (_T, -_T), (1, -_T), (1, _T), (_T, _T),
              (_T, 1), (-_T, 1), (-_T, _T), (-1, _T), (-1, -_T), (-_T, -_T)],
}


@dataclass(frozen=True)
class Scene:
    """Everything that determines the pixels; two equal scenes render identically."""

    background: str  # a PLAIN_BACKGROUNDS name or a place
    texture_seed: int = 0  # seeds the place texture's details
    shapes: tuple[Shape, ...] = ()
    word: str = ""
    glyph_top: int = 0
    glyph_height: int = 0
    glyph_jitter: tuple[int, ...] = ()
    ink: str = ""
    degradation: str = "none"
    degradation_seed: int = 0

    def key(self) -> tuple:
        """Canonical key: drawing order of non-overlapping shapes does not change the scene."""
        shapes = tuple(sorted(astuple(s) for s in self.shapes))
        return (*astuple(replace(self, shapes=())), shapes)


@dataclass
class Sample:
    scene: Scene
    question: str
    answer: str
    answers: list[str]
    query: dict = field(default_factory=dict)  # question parameters, stored in meta
    extra: dict = field(default_factory=dict)  # extra top-level record fields (options, box)


# ---------------------------------------------------------------- rendering


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of side `image_size`."""
    supersample = max(1, SUPERSAMPLE_PX // image_size)
    side = image_size * supersample
    unit = side / DESIGN
    image = Image.new("RGB", (side, side), PLAIN_BACKGROUNDS.get(scene.background, (0, 0, 0)))
    draw = ImageDraw.Draw(image)
    if scene.background in PLACES:
        _PLACE_PAINTERS[scene.background](draw, random.Random(scene.texture_seed), unit)
    for shape in scene.shapes:
        _draw_shape(draw, shape, unit)
    if scene.word:
        _draw_word(image, scene, unit)
    if supersample > 1:
        image = image.reduce(supersample)  # box average: no ringing halo around shapes
    return _degrade(image, scene)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, unit: float) -> None:
    fill = COLOURS[shape.colour]
    pts = shape.points()
    if pts is not None:
        draw.polygon([(x * unit, y * unit) for x, y in pts], fill=fill)
        return
    box = [v * unit for v in shape.box()]
    if shape.name == "ring":
        draw.ellipse(box, outline=fill, width=round(shape.size * 0.22 * unit))
    else:
        draw.ellipse(box, fill=fill)


def _draw_word(image: Image.Image, scene: Scene, unit: float) -> None:
    """One uppercase glyph per fixed slot, each nudged vertically by its jitter."""
    height = round(scene.glyph_height * unit)
    for centre, dy, letter in zip(GLYPH_SLOT_CENTRES, scene.glyph_jitter, scene.word.upper()):
        mask = _glyph_mask(letter, height, round(GLYPH_MAX_WIDTH * unit))
        x = round(centre * unit - mask.width / 2)
        y = round((scene.glyph_top + dy) * unit)
        image.paste(INKS[scene.ink], (x, y, x + mask.width, y + height), mask)


@lru_cache(maxsize=512)
def _glyph_mask(letter: str, height: int, max_width: int) -> Image.Image:
    """A glyph scaled to an exact cap height; wide letters (M, W) are narrowed to fit their slot."""
    font = _font(160)
    mask = Image.new("L", (200, 200), 0)
    ImageDraw.Draw(mask).text((20, 0), letter, fill=255, font=font, stroke_width=6, stroke_fill=255)
    mask = mask.crop(mask.getbbox())
    width = min(max_width, round(mask.width * height / mask.height))
    return mask.resize((width, height), Image.Resampling.LANCZOS)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType; the scalable default font is needed for glyphs")
    return font


def _degrade(image: Image.Image, scene: Scene) -> Image.Image:
    """Destroy the content (VizWiz-like) so that 'unanswerable' is the right answer."""
    if scene.degradation == "none":
        return image
    scale = image.width / DESIGN
    noise = np.random.default_rng(scene.degradation_seed).normal(0.0, 1.0, (image.height, image.width, 3))
    if scene.degradation == "blur_dark":
        blurred = ImageEnhance.Brightness(image.filter(ImageFilter.GaussianBlur(9 * scale))).enhance(0.15)
        pixels = np.asarray(blurred, dtype=np.float64) + 12 * noise
    else:
        blurred = image.filter(ImageFilter.GaussianBlur(5 * scale))
        pixels = 0.2 * np.asarray(blurred, dtype=np.float64) + 0.8 * (128 + 70 * noise)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


# --- place textures: one painter per place, details from the scene's texture seed


def _scaled(box: Sequence[float], unit: float) -> list[float]:
    return [v * unit for v in box]


def _dot(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: RGB, unit: float) -> None:
    draw.ellipse(_scaled((x - r, y - r, x + r, y + r), unit), fill=fill)


def _wave(rng: random.Random, y: float, amplitude: float, period: float) -> list[tuple[float, float]]:
    phase = rng.uniform(0, 2 * math.pi)
    return [(x, y + amplitude * math.sin(2 * math.pi * x / period + phase)) for x in range(0, DESIGN + 2, 2)]


def _paint_beach(draw: ImageDraw.ImageDraw, rng: random.Random, unit: float) -> None:
    """Sky above a sandy lower part."""
    horizon = rng.randint(20, 34)
    draw.rectangle(_scaled((0, 0, DESIGN, horizon), unit), fill=(140, 200, 240))
    draw.rectangle(_scaled((0, horizon, DESIGN, DESIGN), unit), fill=(232, 206, 140))
    for _ in range(rng.randint(15, 30)):
        _dot(draw, rng.uniform(0, DESIGN), rng.uniform(horizon + 2, DESIGN), 0.6, (200, 170, 105), unit)


def _paint_forest(draw: ImageDraw.ImageDraw, rng: random.Random, unit: float) -> None:
    """Green with dark vertical trunks."""
    draw.rectangle(_scaled((0, 0, DESIGN, DESIGN), unit), fill=(40, 125, 55))
    for _ in range(rng.randint(20, 35)):
        _dot(draw, rng.uniform(0, DESIGN), rng.uniform(0, DESIGN), rng.uniform(1.5, 3), (70, 160, 70), unit)
    for _ in range(rng.randint(5, 8)):
        x, width = rng.uniform(-2, DESIGN), rng.uniform(2.5, 4.5)
        draw.rectangle(_scaled((x, 0, x + width, DESIGN), unit), fill=(75, 48, 25))


def _paint_night(draw: ImageDraw.ImageDraw, rng: random.Random, unit: float) -> None:
    """Dark navy with small white stars."""
    draw.rectangle(_scaled((0, 0, DESIGN, DESIGN), unit), fill=(14, 20, 62))
    for _ in range(rng.randint(25, 45)):
        _dot(draw, rng.uniform(0, DESIGN), rng.uniform(0, DESIGN), rng.uniform(0.4, 0.9), (255, 255, 255), unit)


def _paint_snow(draw: ImageDraw.ImageDraw, rng: random.Random, unit: float) -> None:
    """Light grey with white flakes."""
    draw.rectangle(_scaled((0, 0, DESIGN, DESIGN), unit), fill=(208, 214, 224))
    for _ in range(rng.randint(30, 50)):
        _dot(draw, rng.uniform(0, DESIGN), rng.uniform(0, DESIGN), rng.uniform(0.8, 1.6), (255, 255, 255), unit)


def _paint_desert(draw: ImageDraw.ImageDraw, rng: random.Random, unit: float) -> None:
    """Orange-yellow dunes, darker towards the front."""
    draw.rectangle(_scaled((0, 0, DESIGN, DESIGN), unit), fill=(245, 200, 110))
    for level, colour in ((rng.randint(16, 24), (232, 168, 72)), (rng.randint(34, 40), (216, 146, 56)),
                          (rng.randint(48, 54), (198, 124, 44))):
        crest = _wave(rng, level, rng.uniform(2, 4), rng.uniform(30, 60))
        draw.polygon(_scaled_points(crest + [(DESIGN + 2, DESIGN), (0, DESIGN)], unit), fill=colour)


def _paint_ocean(draw: ImageDraw.ImageDraw, rng: random.Random, unit: float) -> None:
    """Blue with light horizontal waves."""
    draw.rectangle(_scaled((0, 0, DESIGN, DESIGN), unit), fill=(28, 88, 168))
    y = rng.uniform(1, 5)
    while y < DESIGN:
        crest = _wave(rng, y, rng.uniform(0.8, 1.6), rng.uniform(10, 18))
        draw.line(_scaled_points(crest, unit), fill=(110, 165, 230), width=max(1, round(1.2 * unit)))
        y += rng.uniform(5, 8)


def _scaled_points(points: list[tuple[float, float]], unit: float) -> list[tuple[float, float]]:
    return [(x * unit, y * unit) for x, y in points]


_PLACE_PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, random.Random, float], None]] = {
    "beach": _paint_beach, "forest": _paint_forest, "night": _paint_night,
    "snow": _paint_snow, "desert": _paint_desert, "ocean": _paint_ocean,
}


# ---------------------------------------------------------------- layout helpers

Spec = tuple[str, str]  # (shape name, colour)


def _specs(rng: random.Random, count: int, *, distinct_names: bool = False,
           distinct_colours: bool = False) -> list[Spec]:
    """Distinct (shape, colour) pairs, optionally with all names or all colours different."""
    while True:
        specs = [(rng.choice(SHAPES), rng.choice(tuple(COLOURS))) for _ in range(count)]
        names, colours = {n for n, _ in specs}, {c for _, c in specs}
        if (len(set(specs)) == count and (not distinct_names or len(names) == count)
                and (not distinct_colours or len(colours) == count)):
            return specs


def _shape_in(rng: random.Random, spec: Spec, area: Sequence[int], sizes: tuple[int, int] = (14, 26)) -> Shape:
    """One shape whose full box lies inside `area`."""
    size = rng.randint(*sizes)
    half = (size + 1) // 2
    x0, y0, x1, y1 = area
    return Shape(*spec, rng.randint(x0 + half, x1 - half), rng.randint(y0 + half, y1 - half), size)


def _scatter(rng: random.Random, specs: Sequence[Spec], area: Sequence[int] = FULL,
             sizes: tuple[int, int] = (14, 20)) -> tuple[Shape, ...]:
    """Non-overlapping shapes (3-unit gap) so every one stays countable and nameable."""
    while True:
        placed: list[Shape] = []
        for spec in specs:
            for _ in range(200):
                shape = _shape_in(rng, spec, area, sizes)
                if all(_apart(shape, other, 3) for other in placed):
                    placed.append(shape)
                    break
            else:
                break
        if len(placed) == len(specs):
            return tuple(placed)


def _apart(a: Shape, b: Shape, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _pair(rng: random.Random, first: Spec, second: Spec, vertical: bool) -> tuple[Shape, Shape]:
    """Two shapes clearly apart along one axis and roughly aligned on the other; first is left/top."""
    s1, s2 = rng.randint(14, 24), rng.randint(14, 24)
    h1, h2 = (s1 + 1) // 2, (s2 + 1) // 2
    along1 = rng.randint(2 + h1, 62 - h2 - (h1 + 4 + h2))
    along2 = rng.randint(along1 + h1 + 4 + h2, 62 - h2)
    across = rng.randint(2 + max(h1, h2), 62 - max(h1, h2))
    across1 = min(max(across + rng.randint(-4, 4), 2 + h1), 62 - h1)
    across2 = min(max(across + rng.randint(-4, 4), 2 + h2), 62 - h2)
    if vertical:
        return Shape(*first, across1, along1, s1), Shape(*second, across2, along2, s2)
    return Shape(*first, along1, across1, s1), Shape(*second, along2, across2, s2)


def _plain(rng: random.Random, shapes: Sequence[Shape] = (), **fields) -> Scene:
    return Scene(background=rng.choice(tuple(PLAIN_BACKGROUNDS)), shapes=tuple(shapes), **fields)


def _textured(rng: random.Random, shapes: Sequence[Shape] = (), places: Sequence[str] = PLACES) -> Scene:
    return Scene(background=rng.choice(places), texture_seed=rng.getrandbits(32), shapes=tuple(shapes))


def _any_background(rng: random.Random, shapes: Sequence[Shape]) -> Scene:
    """Plain or textured; a place never hides a shape that asks to be named in its own hue."""
    if rng.random() < 0.5:
        return _plain(rng, shapes)
    colours = {s.colour for s in shapes}
    return _textured(rng, shapes, [p for p in PLACES if not colours & LOW_CONTRAST[p]])


def _glyph_fields(rng: random.Random, word: str, row_top: int) -> dict:
    return {
        "word": word, "glyph_top": row_top, "glyph_height": rng.randint(20, 22),
        "glyph_jitter": tuple(rng.randint(-2, 2) for _ in word), "ink": rng.choice(tuple(INKS)),
    }


# ---------------------------------------------------------------- language helpers


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _thing(shape: Shape) -> str:
    return _a(f"{shape.colour} {shape.name}")


def _annotate(rng: random.Random, answer: str, wrong_pool: Sequence[str]) -> list[str]:
    """Ten VQA annotators: mostly the answer, some surface variants the official
    normalization maps back to it, and sometimes one annotator who is wrong."""
    variants = [answer.capitalize(), answer.upper(), answer + "."]
    if answer in NUMBER_WORDS:
        variants += [NUMBER_WORDS[answer], NUMBER_WORDS[answer].capitalize()]
    answers = [answer] * 10
    for slot in rng.sample(range(10), rng.randint(0, 3)):
        answers[slot] = rng.choice(variants)
    if rng.random() < 0.3:
        answers[rng.randrange(10)] = rng.choice([w for w in wrong_pool if w != answer])
    return answers


def _options(rng: random.Random, correct: str, pool: Sequence[str], in_image: Sequence[str]) -> list[str]:
    """Correct option plus three distractors; values seen in the image come first so the referent matters."""
    distractors = [v for v in dict.fromkeys(in_image) if v != correct]
    rest = [v for v in pool if v != correct and v not in distractors]
    options = [correct, *distractors, *rng.sample(rest, 3 - len(distractors))]
    rng.shuffle(options)
    return options


def _box_text(shape: Shape) -> tuple[list[float], str]:
    box = [round(v / DESIGN, 2) for v in shape.box()]
    return box, "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


# ---------------------------------------------------------------- builders: one per task kind

DESCRIBE = "Describe the image in one sentence."


def _build_mcq(rng: random.Random, index: int) -> Sample:
    shapes = _scatter(rng, _specs(rng, rng.randint(1, 2), distinct_names=True, distinct_colours=True),
                      sizes=(14, 26))
    target = rng.choice(shapes)
    qtype = ("colour", "shape")[index % 2]
    if qtype == "colour":
        text, correct, pool = f"What is the colour of the {target.name}?", target.colour, tuple(COLOURS)
        in_image = [s.colour for s in shapes]
    else:
        text, correct, pool = f"Which shape is {target.colour}?", target.name, SHAPES
        in_image = [s.name for s in shapes]
    options = _options(rng, correct, pool, in_image)
    letter = "ABCD"[options.index(correct)]
    question = text + "".join(f"\n{tag}. {option}" for tag, option in zip("ABCD", options))
    return Sample(_plain(rng, shapes), question, letter, [letter], {"qtype": qtype}, {"options": options})


def _build_ocr(rng: random.Random, index: int) -> Sample:
    word = rng.choice(WORDS)
    scene = _plain(rng, **_glyph_fields(rng, word, OCR_ROW_TOP))
    return Sample(scene, "What word is written in the image?", word, _annotate(rng, word, WORDS))


def _build_caption(rng: random.Random, index: int) -> Sample:
    if rng.random() < 0.5:
        region = rng.choice(tuple(SINGLE_REGIONS))
        shape = _shape_in(rng, _specs(rng, 1)[0], SINGLE_REGIONS[region], sizes=(14, 22))
        references = _single_captions(shape, WHERE[region])
        return Sample(_plain(rng, [shape]), DESCRIBE, references[0], references, {"region": region})
    vertical = rng.random() < 0.5
    first, second = _pair(rng, *_specs(rng, 2), vertical)
    references = _pair_captions(first, second, vertical)
    return Sample(_plain(rng, [first, second]), DESCRIBE, references[0], references,
                  {"axis": "vertical" if vertical else "horizontal"})


def _single_captions(shape: Shape, where: str) -> list[str]:
    thing, bare = _thing(shape), f"{shape.colour} {shape.name}"
    return [f"{thing} {where} of the image.", f"a single {bare} {where}.", f"there is {thing} {where}.",
            f"the image shows {thing} {where}.", f"one {bare} {where} of the picture."]


def _pair_captions(first: Shape, second: Shape, vertical: bool) -> list[str]:
    a, b = _thing(first), _thing(second)
    if vertical:
        return [f"{a} above {b}.", f"{b} below {a}.", f"{a} is placed over {b}.",
                f"there is {a} at the top and {b} at the bottom.", f"two shapes, {a} and {b}."]
    return [f"{a} to the left of {b}.", f"{b} to the right of {a}.", f"{a} next to {b}.",
            f"there is {a} on the left and {b} on the right.", f"two shapes, {a} and {b}."]


def _build_classify(rng: random.Random, index: int) -> Sample:
    shape = _shape_in(rng, _specs(rng, 1)[0], FULL)
    return Sample(_plain(rng, [shape]), "What object is shown in the image?", shape.name, [shape.name])


def _build_relation(rng: random.Random, index: int) -> Sample:
    vertical = rng.random() < 0.5
    first, second = _pair(rng, *_specs(rng, 2, distinct_names=True, distinct_colours=True), vertical)
    anchor_first = rng.random() < 0.5
    anchor, other = (first, second) if anchor_first else (second, first)
    relation = {(False, True): "to the right of", (False, False): "to the left of",
                (True, True): "below", (True, False): "above"}[(vertical, anchor_first)]
    if index % 2 == 0:
        question, answer = f"What shape is {relation} the {anchor.colour} {anchor.name}?", other.name
    else:
        question, answer = f"What colour is the shape {relation} the {anchor.name}?", other.colour
    return Sample(_plain(rng, [first, second]), question, answer, [answer],
                  {"qtype": "shape" if index % 2 == 0 else "colour", "relation": relation})


def _build_vqa(rng: random.Random, index: int) -> Sample:
    qtype = ("count", "yes_no", "colour")[index % 3]
    if qtype == "count":
        count = rng.randint(1, 4)
        shapes = _scatter(rng, [_specs(rng, 1)[0] for _ in range(count)])
        question, answer, wrong = "How many shapes are there?", str(count), [str(count - 1), str(count + 1)]
    elif qtype == "yes_no":
        shapes = _scatter(rng, _specs(rng, rng.randint(1, 3)))
        asked_yes = (index // 3) % 2 == 0
        name, colour = _yes_no_target(rng, shapes, asked_yes)
        question, answer, wrong = f"Is there {_a(colour + ' ' + name)}?", "yes" if asked_yes else "no", ["yes", "no"]
    else:
        shapes = _scatter(rng, _specs(rng, rng.randint(1, 3), distinct_names=True))
        target = rng.choice(shapes)
        question, answer, wrong = f"What colour is the {target.name}?", target.colour, tuple(COLOURS)
    return Sample(_plain(rng, shapes), question, answer, _annotate(rng, answer, wrong), {"qtype": qtype})


def _yes_no_target(rng: random.Random, shapes: Sequence[Shape], present: bool) -> Spec:
    """A present (shape, colour), or an absent one that is often a near miss (right shape, wrong colour)."""
    seen = {(s.name, s.colour) for s in shapes}
    if present:
        return rng.choice(sorted(seen))
    near_miss = rng.random() < 0.5
    while True:
        name = rng.choice(shapes).name if near_miss else rng.choice(SHAPES)
        candidate = (name, rng.choice(tuple(COLOURS)))
        if candidate not in seen:
            return candidate


def _build_ground(rng: random.Random, index: int) -> Sample:
    shapes = _scatter(rng, _specs(rng, 2), sizes=(14, 26))
    target = rng.choice(shapes)
    box, text = _box_text(target)
    return Sample(_plain(rng, shapes), f"Give the bounding box of the {target.colour} {target.name}.", text, [text],
                  {"target": shapes.index(target)}, {"box": box})


def _build_unanswerable(rng: random.Random, index: int) -> Sample:
    shapes = _scatter(rng, _specs(rng, rng.randint(1, 2), distinct_names=True, distinct_colours=True),
                      sizes=(14, 26))
    target = rng.choice(shapes)
    if rng.random() < 0.5:
        qtype, question, answer, wrong = "colour", f"What colour is the {target.name}?", target.colour, tuple(COLOURS)
    else:
        qtype, question, answer, wrong = "shape", f"What shape is the {target.colour} object?", target.name, SHAPES
    scene = _plain(rng, shapes)
    if index % 2 == 1:
        scene = replace(scene, degradation=rng.choice(DEGRADATIONS), degradation_seed=rng.getrandbits(32))
        answers = ["unanswerable"] * 10
        if rng.random() < 0.3:
            answers[rng.randrange(10)] = "unsuitable"
        return Sample(scene, question, "unanswerable", answers, {"qtype": qtype, "visible_answer": answer})
    return Sample(scene, question, answer, _annotate(rng, answer, wrong), {"qtype": qtype})


def _build_textcap(rng: random.Random, index: int) -> Sample:
    word = rng.choice(WORDS)
    shape = _shape_in(rng, _specs(rng, 1)[0], BELOW_TEXT, sizes=(14, 22))
    a = _thing(shape)
    references = [f"{a} below the word {word}.", f"the word {word} written above {a}.",
                  f"{a} under the text {word}.", f"an image with the word {word} and {a}.",
                  f"the text {word} is shown above {a}."]
    scene = _plain(rng, [shape], **_glyph_fields(rng, word, TEXTCAP_ROW_TOP))
    return Sample(scene, DESCRIBE, references[0], references)


def _build_scene(rng: random.Random, index: int) -> Sample:
    scene = _textured(rng, [_shape_in(rng, _specs(rng, 1)[0], FULL, sizes=(12, 16))])
    return Sample(scene, "What kind of place is shown in the image?", scene.background, [scene.background])


# --- pretraining: plain-phrasing skills answered in plain sentences, plus generic format practice


def _pretrain_shape(rng: random.Random) -> tuple[Scene, str, str]:
    shape = _shape_in(rng, _specs(rng, 1)[0], FULL)
    return _any_background(rng, [shape]), "Name the shape.", f"It is {_a(shape.name)}."


def _pretrain_colour(rng: random.Random) -> tuple[Scene, str, str]:
    shape = _shape_in(rng, _specs(rng, 1)[0], FULL)
    return _any_background(rng, [shape]), "Name the colour of the shape.", f"It is {shape.colour}."


def _pretrain_count(rng: random.Random) -> tuple[Scene, str, str]:
    count = rng.randint(1, 4)
    shapes = _scatter(rng, [_specs(rng, 1)[0] for _ in range(count)])
    answer = "There is 1 shape." if count == 1 else f"There are {count} shapes."
    return _any_background(rng, shapes), "Count the shapes.", answer


def _pretrain_position(rng: random.Random) -> tuple[Scene, str, str]:
    vertical = rng.random() < 0.5
    first, second = _pair(rng, *_specs(rng, 2, distinct_colours=True), vertical)
    target_first = rng.random() < 0.5
    target = first if target_first else second
    where = {(False, True): "on the left", (False, False): "on the right",
             (True, True): "at the top", (True, False): "at the bottom"}[(vertical, target_first)]
    return _plain(rng, [first, second]), f"Where is the {target.colour} shape?", f"It is {where}."


def _pretrain_read(rng: random.Random) -> tuple[Scene, str, str]:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        scene = _plain(rng, **_glyph_fields(rng, word, OCR_ROW_TOP))
    else:
        shape = _shape_in(rng, _specs(rng, 1)[0], BELOW_TEXT, sizes=(14, 22))
        scene = _plain(rng, [shape], **_glyph_fields(rng, word, TEXTCAP_ROW_TOP))
    return scene, "Read the text.", f"The text says {word}."


def _pretrain_place(rng: random.Random) -> tuple[Scene, str, str]:
    scene = _textured(rng, [_shape_in(rng, _specs(rng, 1)[0], FULL, sizes=(12, 16))])
    return scene, "Name the place.", f"It is {_a(scene.background)} scene."


def _pretrain_describe(rng: random.Random) -> tuple[Scene, str, str]:
    shapes = sorted(_scatter(rng, _specs(rng, rng.randint(1, 2)), sizes=(14, 24)), key=lambda s: s.cx)
    return _plain(rng, shapes), "Tell me about the picture.", f"I see {' and '.join(map(_thing, shapes))}."


def _pretrain_format(rng: random.Random) -> tuple[Scene, str, str]:
    """Text-only format practice, as a real LLM's language pretraining gives: upper case, JSON,
    picking a listed option's letter, copying a box. Phrased unlike every task template, it
    trains the embeddings those formats need without teaching any task's instruction."""
    items = (*WORDS, *SHAPES, *COLOURS, *PLACES, "yes", "no", "unanswerable", *NUMBER_WORDS)
    item = rng.choice(items)
    form = rng.choice(("upper", "json", "letter", "box"))
    if form == "upper":
        return _plain(rng), f"Spell {item} in big letters.", item.upper()
    if form == "json":
        return _plain(rng), f"Put {item} in a JSON object under answer.", json.dumps({"answer": item})
    if form == "letter":
        options = [item, *rng.sample([i for i in items if i != item], 3)]
        rng.shuffle(options)
        listing = " ".join(f"{tag}. {option}" for tag, option in zip("ABCD", options))
        return _plain(rng), f"{listing}\nWhich letter is {item}?", "ABCD"[options.index(item)]
    box = "[" + ", ".join(f"{rng.randint(0, 100) / 100:.2f}" for _ in range(4)) + "]"
    return _plain(rng), f"Copy {box.strip('[]')} as a box.", box


_PRETRAIN_SKILLS: dict[str, Callable[[random.Random], tuple[Scene, str, str]]] = {
    "shape": _pretrain_shape, "colour": _pretrain_colour, "count": _pretrain_count,
    "position": _pretrain_position, "read": _pretrain_read, "place": _pretrain_place,
    "describe": _pretrain_describe, "format": _pretrain_format,
}


def vision_scenes(count: int, seed: int) -> list[Scene]:
    """A fresh stream of the pretraining mix's pictures (text-only format practice left out)
    for the supervised tower stage: a tiny ViT from scratch needs far more images than the
    language stage's corpus holds, and drawing one costs well under a millisecond."""
    visual = [skill for skill in _PRETRAIN_SKILLS.values() if skill is not _pretrain_format]
    return [visual[i % len(visual)](_rng(seed, "vision", "train", i, 0))[0] for i in range(count)]


def _build_pretrain(rng: random.Random, index: int) -> Sample:
    skill = tuple(_PRETRAIN_SKILLS)[index % len(_PRETRAIN_SKILLS)]
    scene, question, answer = _PRETRAIN_SKILLS[skill](rng)
    return Sample(scene, question, answer, [answer], {"skill": skill})


Builder = Callable[[random.Random, int], Sample]
_BUILDERS: dict[str, Builder] = {
    "pretrain": _build_pretrain, "mcq": _build_mcq, "ocr": _build_ocr, "caption": _build_caption,
    "classify": _build_classify, "relation": _build_relation, "vqa": _build_vqa, "ground": _build_ground,
    "unanswerable": _build_unanswerable, "textcap": _build_textcap, "scene": _build_scene,
}


# ---------------------------------------------------------------- generation


def generate_task(kind: str, sizes: dict[str, int], seed: int, out_dir: Path,
                  image_size: int = 64) -> dict[str, Path]:
    """Write `<split>.json` and `images/<split>/<i>.png` for each split, in the order given.

    A scene already used by an earlier split is redrawn, so splits never share a scene.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown task kind {kind!r}; valid kinds: {', '.join(TASK_KINDS)}")
    out_dir = Path(out_dir)
    earlier: set[tuple] = set()
    paths: dict[str, Path] = {}
    for split, count in sizes.items():
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        records, keys = [], set()
        for index in range(count):
            sample = _unseen_sample(kind, split, index, seed, earlier)
            keys.add(sample.scene.key())
            render(sample.scene, image_size).save(image_dir / f"{index:05d}.png", format="PNG")
            records.append(_record(kind, split, index, sample))
        earlier |= keys
        paths[split] = out_dir / f"{split}.json"
        text = json.dumps(records, ensure_ascii=True, sort_keys=True, indent=1, separators=(",", ": "))
        paths[split].write_text(text + "\n", encoding="ascii")
    return paths


def _unseen_sample(kind: str, split: str, index: int, seed: int, earlier: set[tuple]) -> Sample:
    for attempt in range(MAX_ATTEMPTS):
        sample = _BUILDERS[kind](_rng(seed, kind, split, index, attempt), index)
        if sample.scene.key() not in earlier:
            return sample
    raise RuntimeError(f"{kind}/{split}[{index}]: no scene unseen in earlier splits after {MAX_ATTEMPTS} "
                       "attempts; the splits are too large for this task's scene space")


def _rng(seed: int, kind: str, split: str, index: int, attempt: int) -> random.Random:
    """A private generator per (seed, kind, split, index, attempt): no global state, stable across runs."""
    digest = hashlib.sha256(f"{seed}|{kind}|{split}|{index}|{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def _record(kind: str, split: str, index: int, sample: Sample) -> dict:
    key_digest = hashlib.sha256(repr(sample.scene.key()).encode()).hexdigest()[:16]
    return {
        "id": f"{kind}-{split}-{index:05d}",
        "image": f"images/{split}/{index:05d}.png",
        "conversations": [
            {"from": "human", "value": "<image>\n" + sample.question},
            {"from": "gpt", "value": sample.answer},
        ],
        "question": sample.question,
        "answer": sample.answer,
        "answers": sample.answers,
        "meta": {**asdict(sample.scene), **sample.query, "scene_key": key_digest},
        **sample.extra,
    }
