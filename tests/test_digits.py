"""Tests of the digits data: splits, image format, faithfulness to the 8x8 scans, examples."""

import numpy as np
import pytest
from PIL import Image

from mmdlm.data import DIGIT_QUESTION, DIGIT_WORDS, digit_caption, digit_examples, load_digit_images


@pytest.fixture(scope="module")
def splits():
    return {s: load_digit_images(s) for s in ("train", "test")}


def test_split_sizes_and_labels(splits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    assert len(splits["train"]) == 1500 and len(splits["test"]) == 297
    assert [y for _, y in splits["train"]] == target[:1500].tolist()
    assert [y for _, y in splits["test"]] == target[1500:].tolist()
    assert all(isinstance(y, int) for _, y in splits["test"])


def test_image_format_dark_ink_on_white(splits):
    from sklearn.datasets import load_digits

    scans = load_digits().images
    for i, (img, _) in enumerate(splits["test"][:50]):
        assert img.mode == "RGB" and img.size == (64, 64)
        arr = np.asarray(img)
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # gray
        assert arr.max() >= 245 and arr.min() <= 60  # white paper, dark ink
        # Downsampled back to 8x8, the ink matches the original scan (same digit, not shifted or inverted).
        back = 1 - np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), float) / 255
        scan = scans[1500 + i] / 16
        assert np.corrcoef(back.ravel(), scan.ravel())[0, 1] > 0.9
        # Smooth upscale: no 8x8 blocks of constant colour.
        assert len(np.unique(arr[..., 0])) > 20


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_digit_images("validation")


def test_caption_and_examples():
    assert digit_caption(7) == "a handwritten digit seven"
    assert DIGIT_WORDS[0] == "zero" and len(DIGIT_WORDS) == 10
    with pytest.raises(ValueError):
        digit_caption(10)
    examples = digit_examples("test")
    assert len(examples) == 3 * 297
    labels = [y for _, y in load_digit_images("test")]
    vqa = [e for e in examples if e.get("qtype") == "digit"]
    caps = [e for e in examples if e.get("qtype") == "caption"]
    t2i = [e for e in examples if e["task"] == "t2i"]
    assert [e["messages"][1]["content"] for e in vqa] == [DIGIT_WORDS[y] for y in labels]
    assert all(e["messages"][0]["content"] == "<image>\n" + DIGIT_QUESTION for e in vqa)
    assert [e["messages"][1]["content"] for e in caps] == [digit_caption(y) for y in labels]
    assert [e["prompt"] for e in t2i] == [digit_caption(y) for y in labels]
    assert all(e["image"].size == (64, 64) for e in t2i)
    assert len(digit_examples("test", tasks=("vqa",))) == 297
    with pytest.raises(ValueError, match="unknown"):
        digit_examples("test", tasks=("draw",))
