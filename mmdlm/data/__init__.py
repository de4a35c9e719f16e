"""Data layer: the Shapes world, handwritten digits and loaders for users' datasets, as plain Python examples.

This is the lowest layer of mmdlm: nothing here imports other mmdlm modules.
"""

from .digits import DIGIT_QUESTION, DIGIT_WORDS, digit_caption, digit_examples, load_digit_images
from .loaders import ExampleList, load_imagefolder, load_llava_json, load_table, open_image
from .shapes import (
    CAPTION_PROMPT,
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    QA,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    ShapesSample,
    ShapesWorld,
    caption,
    make_questions,
    parse_caption,
    render_scene,
    sample_scene,
    shapes_examples,
)

__all__ = [
    "CAPTION_PROMPT", "COLORS", "HELD_OUT_PAIRS", "POSITIONS", "QA", "SHAPES", "SIZES", "Scene", "Shape",
    "ShapesSample", "ShapesWorld", "caption", "make_questions", "parse_caption", "render_scene", "sample_scene",
    "shapes_examples",
    "DIGIT_QUESTION", "DIGIT_WORDS", "digit_caption", "digit_examples", "load_digit_images",
    "ExampleList", "load_imagefolder", "load_llava_json", "load_table", "open_image",
]
