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


def test_augment_scan_makes_new_scans_of_the_same_digit():
    from mmdlm.data.digits import _digits_arrays, _to_image, augment_scan
    from mmdlm.eval.checkers import DigitClassifier

    scans, labels = _digits_arrays()
    test, y = scans[1500:], labels[1500:]
    copies = [augment_scan(s, np.random.default_rng(i)) for i, s in enumerate(test)]
    assert all(c.shape == (8, 8) and c.dtype == np.uint8 for c in copies)
    # Same draws, same copy; each copy differs from its scan, keeps its darkest ink, and still resembles it.
    assert (augment_scan(test[0], np.random.default_rng(0)) == copies[0]).all()
    diffs = [np.abs(c.astype(int) - s).mean() for c, s in zip(copies, test)]
    assert min(diffs) > 0.5 and np.mean(diffs) > 10
    assert all(abs(int(c.min()) - int(s.min())) <= 1 for c, s in zip(copies, test))
    corr = [np.corrcoef(c.ravel(), s.ravel())[0, 1] for c, s in zip(copies, test)]
    assert 0.5 < np.median(corr) < 0.97
    # With every range set to zero the copy is the scan again, up to the resampling's smoothing.
    same = augment_scan(test[0], np.random.default_rng(0), max_rotate=0, scale=(1, 1), max_shear=0, max_shift=0)
    assert np.corrcoef(same.ravel(), test[0].ravel())[0, 1] > 0.97
    # The digit survives: a classifier trained on the real train scans recognises most copies of held-out ones.
    assert DigitClassifier().fit().score([_to_image(c) for c in copies], y) >= 0.8
    with pytest.raises(ValueError, match="8x8"):
        augment_scan(np.zeros((64, 64)), np.random.default_rng(0))


def test_stroke_augmentation_changes_the_pen_only_when_asked():
    from mmdlm.data.digits import _digits_arrays, augment_scan

    scans, _ = _digits_arrays()
    still = dict(max_rotate=0, scale=(1, 1), max_shear=0, max_shift=0)
    ink = lambda scan: float((255 - scan.astype(int)).sum())  # noqa: E731
    for scan in scans[1500:1520]:
        # (0, 0) draws nothing, so recipes without it make the same copies as before it existed
        assert (augment_scan(scan, np.random.default_rng(1)) ==
                augment_scan(scan, np.random.default_rng(1), stroke=(0, 0))).all()
        plain = augment_scan(scan, np.random.default_rng(0), **still)
        thick = augment_scan(scan, np.random.default_rng(0), stroke=(4, 4), **still)
        thin = augment_scan(scan, np.random.default_rng(0), stroke=(-2, -2), **still)
        assert ink(thin) < ink(plain) < ink(thick)
        assert abs(int(thick.min()) - int(scan.min())) <= 1  # wider strokes, not darker ones
    with pytest.raises(ValueError, match="lo <= hi"):
        augment_scan(scans[0], np.random.default_rng(0), stroke=(3, 1))
    a = digit_examples("train", tasks=("vqa",), augment=1, seed=3, stroke=(2, 4))
    b = digit_examples("train", tasks=("vqa",), augment=1, seed=3)
    assert np.array_equal(np.asarray(a[0]["images"][0]), np.asarray(b[0]["images"][0]))  # the real scan
    assert ink(np.asarray(a[1]["images"][0])) > ink(np.asarray(b[1]["images"][0]))


def test_augmented_examples_add_reading_copies_only():
    plain = digit_examples("train", tasks=("vqa", "t2i"))
    aug = digit_examples("train", tasks=("vqa", "t2i"), augment=2, seed=3)
    labels = [y for _, y in load_digit_images("train")]
    vqa = [e for e in aug if e["task"] != "t2i"]
    assert len(vqa) == 3 * 1500 and len([e for e in aug if e["task"] == "t2i"]) == 1500
    assert [e["messages"][1]["content"] for e in vqa] == [DIGIT_WORDS[y] for y in labels for _ in range(3)]
    # Drawing keeps the real scans; each image's first reading row is the real scan, the next two are copies.
    t2i_plain = [e["image"] for e in plain if e["task"] == "t2i"]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b))
               for a, b in zip([e for e in aug if e["task"] == "t2i"], t2i_plain))
    first, copy = np.asarray(vqa[0]["images"][0]), np.asarray(vqa[1]["images"][0])
    assert np.array_equal(first, np.asarray(t2i_plain[0])) and not np.array_equal(first, copy)
    again = digit_examples("train", tasks=("vqa",), augment=2, seed=3)
    other = digit_examples("train", tasks=("vqa",), augment=2, seed=4)
    pixels = lambda ex: [np.asarray(e["images"][0]) for e in ex[:30]]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(pixels(again), pixels(vqa)))
    assert not all(np.array_equal(a, b) for a, b in zip(pixels(other), pixels(vqa)))
    with pytest.raises(ValueError, match="augment"):
        digit_examples("train", augment=-1)
