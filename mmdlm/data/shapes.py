"""The Shapes world: a procedural 64x64 image-text world with captions, VQA pairs and drawing prompts.

Every image is generated deterministically from (seed, split, index), so nothing big is cached.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
CAPTION_PROMPT = "Describe the image."

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
# Cell index 0..8, row-major over a 3x3 grid.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
# (color, shape) pairs that never appear in "train"/"test" images; every "compositional" image has one.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "triangle"), ("purple", "circle"), ("orange", "square"), ("blue", "diamond"),
)
SPLITS: tuple[str, ...] = ("train", "test", "compositional")

# Nominal widths (px) of the bounding box; each scene jitters them by up to SIZE_JITTER.
SIZE_PIXELS: dict[str, float] = {"small": 9.0, "large": 17.0}
SIZE_JITTER = 1.0
COLOR_JITTER = 20
CELL = IMAGE_SIZE / 3
# Minimum distance (px) from a shape to its cell border, so neighbours are always >= 2 px apart.
CELL_MARGIN = 1.0
_SUPERSAMPLE = 4

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
ALLOWED_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)


@dataclass
class Shape:
    """One object: `cx, cy` is the centre of its bounding box and `diameter` its width (= height), in pixels."""

    shape: str
    color: str
    size: str
    cell: int
    cx: float
    cy: float
    diameter: float
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass
class Scene:
    """The objects of one image, ordered by cell."""

    shapes: list[Shape] = field(default_factory=list)


@dataclass
class QA:
    question: str
    answer: str
    qtype: str


@dataclass
class ShapesSample:
    image: Image.Image
    scene: Scene
    caption: str
    qas: list[QA]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown Shapes split {split!r}; use one of {SPLITS}")


def sample_scene(rng: random.Random, split: str) -> Scene:
    """Draw 1-3 shapes in distinct cells; held-out colour-shape pairs only (and always) in "compositional"."""
    _check_split(split)
    n = rng.randint(1, 3)
    cells = sorted(rng.sample(range(9), n))
    forced = rng.randrange(n) if split == "compositional" else -1
    shapes = []
    for k, cell in enumerate(cells):
        if k == forced:
            color, shape = rng.choice(HELD_OUT_PAIRS)
        elif split == "compositional":
            color, shape = rng.choice(ALL_PAIRS)
        else:
            color, shape = rng.choice(ALLOWED_PAIRS)
        size = rng.choice(SIZES)
        diameter = SIZE_PIXELS[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        # Jitter the centre only as far as keeps the whole shape CELL_MARGIN inside its cell.
        slack = max(0.0, CELL / 2 - diameter / 2 - CELL_MARGIN)
        row, col = divmod(cell, 3)
        cx = (col + 0.5) * CELL + rng.uniform(-slack, slack)
        cy = (row + 0.5) * CELL + rng.uniform(-slack, slack)
        rgb = tuple(
            min(255, max(0, v + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for v in COLORS[color]
        )
        shapes.append(Shape(shape, color, size, cell, cx, cy, diameter, rgb))
    return Scene(shapes)


def _outline(s: Shape, scale: float) -> list[tuple[float, float]]:
    """Polygon vertices (in supersampled pixel coordinates) of a non-circle shape."""
    x, y, r = s.cx * scale, s.cy * scale, s.diameter / 2 * scale
    if s.shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if s.shape == "triangle":  # apex up, width = height = diameter
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if s.shape == "diamond":  # a square standing on a corner, diagonal = diameter
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    raise ValueError(f"unknown shape {s.shape!r}; use one of {SHAPES}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene at 4x and box-downsample to 64x64 RGB, which anti-aliases the edges."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for s in scene.shapes:
        if s.shape == "circle":
            r = s.diameter / 2 * _SUPERSAMPLE
            x, y = s.cx * _SUPERSAMPLE, s.cy * _SUPERSAMPLE
            # PIL's ellipse box is inclusive of its end pixel, hence the -1.
            draw.ellipse([x - r, y - r, x + r - 1, y + r - 1], fill=s.rgb)
        else:
            draw.polygon(_outline(s, _SUPERSAMPLE), fill=s.rgb)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _phrase(size: str, color: str, shape: str, cell: int) -> str:
    return f"a {size} {color} {shape} at the {POSITIONS[cell]}"


def caption(scene: Scene) -> str:
    """Canonical caption: objects in cell order joined as "A." / "A and B." / "A, B and C.",
    each object written "a <size> <color> <shape> at the <position>"."""
    phrases = [_phrase(s.size, s.color, s.shape, s.cell) for s in sorted(scene.shapes, key=lambda s: s.cell)]
    if not phrases:
        raise ValueError("cannot caption an empty scene")
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


_PHRASE_RE = re.compile(
    r"an? (?P<size>{}) (?P<color>{}) (?P<shape>{}) (?:at|in) the (?P<pos>{})".format(
        "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES),
        "|".join(sorted(POSITIONS, key=len, reverse=True)),
    )
)


def parse_caption(text: str) -> list[tuple[str, str, str, int]]:
    """Parse a Shapes caption into (size, color, shape, cell) tuples sorted by cell.

    Case, extra whitespace and the final period are ignored; the phrase order is free. Raises ValueError when any
    part is not a Shapes phrase, or two objects share a position.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    norm = " ".join(text.lower().split()).rstrip(". ")
    if not norm:
        raise ValueError("empty caption")
    parts = [p.strip() for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", norm)]
    objects = []
    for part in parts:
        m = _PHRASE_RE.fullmatch(part)
        if m is None:
            raise ValueError(
                f"cannot parse {part!r} in caption {text!r}; expected 'a <size> <color> <shape> at the <position>'"
            )
        objects.append((m["size"], m["color"], m["shape"], POSITIONS.index(m["pos"])))
    cells = [o[3] for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a position in caption {text!r}")
    return sorted(objects, key=lambda o: o[3])


def make_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question per applicable type (color, shape, count, exist, position, size), each unambiguous.

    "exist" is "yes" with probability 1/2. Pairs held out of a split's images are never asked about in it, so
    train/test text never mentions a held-out colour-shape pair either.
    """
    shapes = scene.shapes
    qas: list[QA] = []
    by_shape = [s.shape for s in shapes]
    by_color = [s.color for s in shapes]
    pairs = [(s.color, s.shape) for s in shapes]
    held_out_present = any(p in HELD_OUT_PAIRS for p in pairs)

    unique_shapes = [k for k in SHAPES if by_shape.count(k) == 1]
    if unique_shapes:
        k = rng.choice(unique_shapes)
        qas.append(QA(f"what color is the {k}?", shapes[by_shape.index(k)].color, "color"))
    unique_colors = [c for c in COLORS if by_color.count(c) == 1]
    if unique_colors:
        c = rng.choice(unique_colors)
        qas.append(QA(f"what shape is the {c} object?", shapes[by_color.index(c)].shape, "shape"))
    qas.append(QA("how many shapes are there?", COUNT_WORDS[len(shapes)], "count"))

    candidates = ALL_PAIRS if held_out_present else ALLOWED_PAIRS
    if rng.random() < 0.5:
        color, shape = rng.choice(pairs)
        answer = "yes"
    else:
        color, shape = rng.choice([p for p in candidates if p not in pairs])
        answer = "no"
    article = "an" if color[0] in "aeiou" else "a"
    qas.append(QA(f"is there {article} {color} {shape}?", answer, "exist"))

    unique_pairs = [i for i, p in enumerate(pairs) if pairs.count(p) == 1]
    if unique_pairs:
        s = shapes[rng.choice(unique_pairs)]
        qas.append(QA(f"where is the {s.color} {s.shape}?", s.position, "position"))
        s = shapes[rng.choice(unique_pairs)]
        qas.append(QA(f"what size is the {s.color} {s.shape}?", s.size, "size"))
    return qas


def scene_seed(seed: int, split: str, index: int) -> int:
    """A 64-bit seed for item `index` of `split`; distinct splits hash to distinct seeds."""
    digest = hashlib.sha256(f"mmdlm-shapes/{split}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ShapesWorld:
    """`size` deterministic samples of one split; item i depends only on (seed, split, i)."""

    def __init__(self, split: str, size: int, seed: int = 0):
        _check_split(split)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        self.split, self.size, self.seed = split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> ShapesSample:
        if not isinstance(index, int):
            raise TypeError(f"ShapesWorld indices must be int, got {type(index).__name__}")
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index out of range for ShapesWorld of size {self.size}")
        rng = random.Random(scene_seed(self.seed, self.split, index))
        scene = sample_scene(rng, self.split)
        return ShapesSample(render_scene(scene), scene, caption(scene), make_questions(scene, rng))

    def __iter__(self) -> Iterator[ShapesSample]:
        for i in range(self.size):
            yield self[i]

    def __repr__(self) -> str:
        return f"ShapesWorld(split={self.split!r}, size={self.size}, seed={self.seed})"


SHAPES_TASKS = ("caption", "vqa", "t2i", "chat")
QUESTION_TYPES = ("color", "shape", "count", "exist", "position", "size")  # the `qtype`s of `make_questions`


def understanding_example(image: Image.Image, question: str, answer: str, qtype: str) -> dict:
    """A single-turn, single-image understanding example in the shared example format."""
    return {
        "task": "understanding",
        "images": [image],
        "messages": [
            {"role": "user", "content": "<image>\n" + question},
            {"role": "assistant", "content": answer},
        ],
        "qtype": qtype,
    }


def chat_example(image: Image.Image, qas: Sequence[QA], rng: random.Random) -> dict:
    """One multi-turn conversation about one image (LLaVA-style: the image in the first user turn), asking every
    question of `qas` in a random order. One image encoding then supervises all of its answers at once."""
    qas = list(qas)
    rng.shuffle(qas)
    messages = []
    for k, qa in enumerate(qas):
        messages.append({"role": "user", "content": ("<image>\n" if k == 0 else "") + qa.question})
        messages.append({"role": "assistant", "content": qa.answer})
    return {"task": "understanding", "images": [image], "messages": messages, "qtype": "chat"}


def shapes_examples(
    split: str, n: int, seed: int = 0, tasks: Sequence[str] = ("caption", "vqa", "t2i"),
    question_types: Optional[Sequence[str]] = None, objects: Optional[Sequence[int]] = None,
) -> list[dict]:
    """Training examples from the first `n` scenes of a split: per scene one caption example, one VQA example per
    question from `make_questions`, one t2i example whose prompt is the caption, and one "chat" example that asks
    the caption and every question in one multi-turn conversation (as `tasks` selects). `question_types` (any of
    `QUESTION_TYPES`; default all) keeps only those questions in the VQA and chat examples; `objects` (numbers of
    objects, 1-3; default all) keeps only the scenes of those sizes among the `n`."""
    unknown = set(tasks) - set(SHAPES_TASKS)
    if unknown:
        raise ValueError(f"unknown Shapes tasks {sorted(unknown)}; use any of {SHAPES_TASKS}")
    unknown = set(question_types or ()) - set(QUESTION_TYPES)
    if unknown or (question_types is not None and not question_types):
        raise ValueError(f"question types {sorted(unknown) or '[]'}: choose one or more of {QUESTION_TYPES}")
    if objects is not None and (not objects or not set(objects) <= {1, 2, 3}):
        raise ValueError(f"objects {list(objects)}: choose one or more of 1, 2, 3 (objects in a scene)")
    keep = set(question_types or QUESTION_TYPES)
    examples = []
    for index, sample in enumerate(ShapesWorld(split, n, seed)):
        if objects is not None and len(sample.scene.shapes) not in objects:
            continue
        if "caption" in tasks:
            examples.append(understanding_example(sample.image, CAPTION_PROMPT, sample.caption, "caption"))
        if "vqa" in tasks:
            for qa in sample.qas:
                if qa.qtype in keep:
                    examples.append(understanding_example(sample.image, qa.question, qa.answer, qa.qtype))
        if "t2i" in tasks:
            examples.append({"task": "t2i", "prompt": sample.caption, "image": sample.image})
        if "chat" in tasks:
            turns = [QA(CAPTION_PROMPT, sample.caption, "caption"), *(qa for qa in sample.qas if qa.qtype in keep)]
            examples.append(chat_example(sample.image, turns, random.Random(scene_seed(seed, split + "/chat", index))))
    return examples
