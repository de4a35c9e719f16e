"""Image loading (formats, modes, bad inputs), padding/anyres geometry and MMDLMImageProcessor."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmdlm.vision.image_processing import (
    ImageLoadError,
    MMDLMImageProcessor,
    anyres_grid_shape,
    expand_to_square,
    load_image,
    parse_grid_pinpoints,
    process_anyres_image,
    resize_keep_aspect,
    select_best_resolution,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _close(rgb, target, tol=0):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(rgb, target))


def _png_header_only(path, w, h):
    """A PNG whose header claims w x h but carries no pixel data (cheap stand-in for a huge image)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("fmt,ext,tol", [("PNG", "png", 0), ("JPEG", "jpg", 6), ("WEBP", "webp", 8),
                                         ("GIF", "gif", 0), ("BMP", "bmp", 0)])
def test_formats_round_trip_to_rgb(tmp_path, fmt, ext, tol):
    path = tmp_path / f"red.{ext}"
    Image.new("RGB", (24, 16), RED).save(path, format=fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (24, 16)
    assert _close(img.getpixel((12, 8)), RED, tol)


def test_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert _close(load_image(str(path)).getpixel((4, 4)), RED)


def test_modes_convert_with_right_colours():
    cases = [
        (Image.new("1", (8, 8), 1), WHITE),
        (Image.new("L", (8, 8), 128), (128, 128, 128)),
        (Image.new("LA", (8, 8), (0, 0)), WHITE),  # fully transparent black -> white background
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), WHITE),
        (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), RED),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), RED),
        (Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F"), (128, 128, 128)),
    ]
    for src, want in cases:
        out = load_image(src)
        assert out.mode == "RGB", src.mode
        assert _close(out.getpixel((3, 3)), want, 1), (src.mode, out.getpixel((3, 3)))
    half = load_image(Image.new("RGBA", (8, 8), (255, 0, 0, 128)))  # half-transparent red over white = pink
    assert _close(half.getpixel((0, 0)), (255, 127, 127), 2)


def test_palette_images_keep_colour_and_transparency(tmp_path):
    p = Image.new("RGB", (8, 8), RED).convert("P")
    assert _close(load_image(p).getpixel((1, 1)), RED)
    # a palette PNG whose index 0 is transparent: transparent pixels become white, others keep their colour
    q = Image.new("P", (8, 8), 0)
    q.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    q.putpixel((5, 5), 1)
    q.info["transparency"] = 0
    q.save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert _close(out.getpixel((0, 0)), WHITE) and _close(out.getpixel((5, 5)), BLUE)


def test_sixteen_and_thirtytwo_bit_greyscale(tmp_path):
    arr = np.array([[0, 128 * 257], [65535, 65535]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    img16 = Image.fromarray(arr)  # mode I;16
    assert img16.mode.startswith("I;16")
    out = load_image(img16)
    assert _close(out.getpixel((0, 0)), (0, 0, 0)) and _close(out.getpixel((5, 0)), (128, 128, 128), 1)
    assert _close(out.getpixel((0, 5)), WHITE)
    img16.save(tmp_path / "g16.png")  # and through a 16-bit PNG file
    assert _close(load_image(tmp_path / "g16.png").getpixel((5, 0)), (128, 128, 128), 1)
    img32 = Image.fromarray(np.full((8, 8), 200, dtype=np.int32), mode="I")
    assert _close(load_image(img32).getpixel((0, 0)), (200, 200, 200))


def test_exif_orientation_rotates(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_numpy_and_bytes_inputs(tmp_path):
    assert load_image(np.full((6, 5), 7, dtype=np.uint8)).getpixel((0, 0)) == (7, 7, 7)
    f = np.zeros((6, 5, 3), dtype=np.float32)
    f[..., 2] = 1.0
    assert load_image(f).getpixel((0, 0)) == BLUE
    rgba = np.zeros((6, 5, 4), dtype=np.uint8)  # transparent black -> white
    assert load_image(rgba).getpixel((0, 0)) == WHITE
    Image.new("RGB", (9, 7), BLUE).save(tmp_path / "b.png")
    img = load_image((tmp_path / "b.png").read_bytes())
    assert img.size == (9, 7) and img.getpixel((0, 0)) == BLUE


def test_bad_inputs_raise_image_load_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello, not an image")
    buf = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    data = buf.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    garbled = bytearray(data)
    garbled[200:400] = bytes(range(200))  # full length, but the compressed pixel stream is garbage
    (tmp_path / "corrupt.png").write_bytes(bytes(garbled))
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    cases = {
        tmp_path / "missing.png": "does not exist",
        tmp_path / "empty.png": "empty",
        tmp_path / "notes.txt": "not an image",
        tmp_path / "truncated.png": "corrupt or truncated",
        tmp_path / "corrupt.png": "corrupt",
        tmp_path / "tiny.png": "min_side",
        _png_header_only(tmp_path / "huge.png", 30000, 30000): "too large",
        _png_header_only(tmp_path / "big.png", 8000, 6000): "max_pixels",  # checked before any decoding
    }
    for path, msg in cases.items():
        with pytest.raises(ImageLoadError, match=msg):
            load_image(path)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(Image.new("RGB", (200, 200)), max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="dtype"):
        load_image(np.zeros((8, 8), dtype=np.int64))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        load_image(np.full((8, 8, 3), 2.0))
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((3, 8, 8, 2), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="cannot load"):
        load_image(12345)
    assert issubclass(ImageLoadError, ValueError)


def test_expand_to_square_and_resize_keep_aspect():
    sq = expand_to_square(Image.new("RGB", (40, 20), RED), (10, 20, 30))
    assert sq.size == (40, 40)
    assert sq.getpixel((20, 2)) == (10, 20, 30) and sq.getpixel((20, 37)) == (10, 20, 30)
    assert sq.getpixel((20, 20)) == RED
    tall = expand_to_square(Image.new("RGB", (10, 30), RED), (0, 0, 0))
    assert tall.size == (30, 30) and tall.getpixel((0, 15)) == (0, 0, 0) and tall.getpixel((15, 15)) == RED
    assert resize_keep_aspect(Image.new("RGB", (200, 100)), 50).size == (50, 25)
    assert resize_keep_aspect(Image.new("RGB", (200, 100)), (40, 40)).size == (40, 20)


def test_processor_pad_uses_mean_colour():
    proc = MMDLMImageProcessor(image_size=16, image_mean=(0.2, 0.4, 0.6), image_std=(0.5, 0.5, 0.5))
    out = proc(Image.new("RGB", (32, 16), RED))
    pv = out["pixel_values"]
    assert pv.shape == (1, 3, 16, 16) and pv.dtype == torch.float32 and out["image_sizes"] == [(32, 16)]
    # padding rows (top/bottom quarter) are the mean colour, so ~0 after normalisation
    assert pv[0, :, 0, :].abs().max() < 0.02 and pv[0, :, -1, :].abs().max() < 0.02
    centre = pv[0, :, 8, 8]
    assert torch.allclose(centre, torch.tensor([(1 - 0.2) / 0.5, (0 - 0.4) / 0.5, (0 - 0.6) / 0.5]), atol=0.02)


def test_processor_resize_batch_and_errors():
    proc = MMDLMImageProcessor(image_size=8, aspect_ratio="resize")
    out = proc([Image.new("RGB", (30, 10), BLUE), np.zeros((5, 7, 3), dtype=np.uint8)])
    assert out["pixel_values"].shape == (2, 3, 8, 8) and out["image_sizes"] == [(30, 10), (7, 5)]
    assert torch.allclose(out["pixel_values"][0, 2], torch.ones(8, 8))  # blue channel: (1 - .5)/.5
    assert proc.num_views((30, 10)) == 1
    for bad in (dict(aspect_ratio="crop"), dict(image_mean=(0.5, 0.5)), dict(image_std=(0.5, 0, 0.5)),
                dict(image_size=0), dict(resample="fancy")):
        with pytest.raises(ValueError):
            MMDLMImageProcessor(**bad)
    with pytest.raises(ValueError, match="no images"):
        proc([])


def test_select_best_resolution():
    # 800x400 fits 768x384 exactly; larger candidates keep no more pixels, smaller ones keep fewer
    assert select_best_resolution((800, 400), [(384, 384), (768, 384), (384, 768), (768, 768)]) == (768, 384)
    # 100x100 keeps all its 10000 pixels in both 128 and 256: the tie goes to the one wasting less
    assert select_best_resolution((100, 100), [(64, 64), (256, 256), (128, 128)]) == (128, 128)


def test_grid_pinpoints_and_grid_shape():
    assert parse_grid_pinpoints("(1x1),...,(2x2)", 10) == [(10, 10), (10, 20), (20, 10), (20, 20)]
    assert parse_grid_pinpoints("(1x1),(2x1)", 10) == [(10, 10), (20, 10)]
    assert parse_grid_pinpoints([(64, 128)], 10) == [(64, 128)]
    with pytest.raises(ValueError):
        parse_grid_pinpoints("no grids here", 10)
    # 200x100 in 64-px tiles: 192x128 holds it at scale 0.96 with the least padding -> 3 columns, 2 rows
    assert anyres_grid_shape((200, 100), "(1x1),...,(3x3)", 64) == (3, 2)
    assert anyres_grid_shape((100, 200), "(1x1),...,(3x3)", 64) == (2, 3)


def test_process_anyres_image_base_first_then_row_major_crops():
    img = Image.new("RGB", (200, 100), RED)
    img.paste(Image.new("RGB", (100, 100), BLUE), (100, 0))
    views = process_anyres_image(img, 64, "(1x1),...,(3x3)")
    assert len(views) == 1 + 3 * 2 and all(v.size == (64, 64) for v in views)
    assert np.array_equal(np.asarray(views[0]), np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC)))
    # content is 192x96, centred in 192x128: 16 px of black padding above and below
    assert views[1].getpixel((5, 5)) == (0, 0, 0)
    assert _close(views[1].getpixel((30, 40)), RED, 3)  # top-left crop
    assert _close(views[3].getpixel((30, 40)), BLUE, 3)  # top-right crop (row-major: index 3)
    assert _close(views[4].getpixel((30, 20)), RED, 3)  # bottom-left crop


def test_processor_anyres_and_round_trip(tmp_path):
    proc = MMDLMImageProcessor(image_size=64, aspect_ratio="anyres", image_grid_pinpoints="(1x1),...,(3x3)")
    img = Image.new("RGB", (200, 100), RED)
    out = proc(img)
    assert isinstance(out["pixel_values"], list) and out["pixel_values"][0].shape == (7, 3, 64, 64)
    assert proc.num_views((200, 100)) == 7
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    again = MMDLMImageProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict()
    assert torch.equal(again(img)["pixel_values"][0], out["pixel_values"][0])
    with pytest.raises(FileNotFoundError):
        MMDLMImageProcessor.from_pretrained(tmp_path / "nowhere")
