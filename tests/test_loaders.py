"""Tests of the offline loaders (LLaVA JSON/JSONL, imagefolder, JSON/Parquet tables) and their errors."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmdlm.data import CAPTION_PROMPT, load_imagefolder, load_llava_json, load_table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _img(color, size=(12, 10), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def llava_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    _img((255, 0, 0)).save(tmp_path / "imgs" / "red.png")
    _img(80, mode="L").save(tmp_path / "imgs" / "gray.jpg")  # grayscale file -> must come back RGB
    _img((0, 0, 255, 128), mode="RGBA").save(tmp_path / "imgs" / "blue.png")
    entries = [
        {"id": "a", "image": "red.png", "conversations": _conv("<image>\nWhat color?", "red")},
        {"id": "b", "image": "gray.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "gray"},
            {"from": "user", "value": "Sure?"}, {"from": "assistant", "value": "yes"}]},
        {"id": "c", "conversations": _conv("Hi", "Hello")},
        {"id": "d", "image": ["red.png", "blue.png"], "conversations": _conv("<image><image>\nSame?", "no")},
    ]
    return tmp_path, entries


def test_llava_json_and_jsonl(llava_dir):
    root, entries = llava_dir
    (root / "data.json").write_text(json.dumps(entries))
    (root / "data.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    for name in ("data.json", "data.jsonl"):
        ex = load_llava_json(root / name, root / "imgs")
        assert len(ex) == 4 and ex.num_skipped == 0
        assert [e["id"] for e in ex] == ["a", "b", "c", "d"]
        assert all(e["task"] == "understanding" for e in ex)
        a, b, c, d = ex
        assert a["messages"] == [{"role": "user", "content": "<image>\nWhat color?"},
                                 {"role": "assistant", "content": "red"}]
        assert a["images"][0].mode == "RGB" and a["images"][0].getpixel((0, 0)) == (255, 0, 0)
        assert [m["role"] for m in b["messages"]] == ["user", "assistant", "user", "assistant"]
        assert b["images"][0].mode == "RGB" and b["images"][0].getpixel((3, 3))[0] == pytest.approx(80, abs=3)
        assert c["images"] == [] and c["messages"][1]["content"] == "Hello"
        assert len(d["images"]) == 2 and d["images"][1].mode == "RGB"


def test_llava_default_image_folder_is_json_folder(llava_dir):
    root, entries = llava_dir
    (root / "imgs" / "d.json").write_text(json.dumps(entries[:1]))
    assert len(load_llava_json(root / "imgs" / "d.json")) == 1


def test_llava_missing_image_error_or_skip(llava_dir):
    root, entries = llava_dir
    entries.append({"id": "gone", "image": "missing.png", "conversations": _conv("<image>\nx", "y")})
    (root / "data.json").write_text(json.dumps(entries))
    with pytest.raises(FileNotFoundError, match="missing.png") as err:
        load_llava_json(root / "data.json", root / "imgs")
    assert "'gone'" in str(err.value)
    ex = load_llava_json(root / "data.json", root / "imgs", on_missing="skip")
    assert len(ex) == 4 and ex.num_skipped == 1 and "missing.png" in ex.skipped[0]
    # If every entry is skipped, the result would be empty: that is an error, not a silent empty list.
    (root / "only_missing.json").write_text(json.dumps(entries[-1:]))
    with pytest.raises(ValueError, match="no usable entries"):
        load_llava_json(root / "only_missing.json", root / "imgs", on_missing="skip")
    with pytest.raises(ValueError, match="on_missing"):
        load_llava_json(root / "data.json", root / "imgs", on_missing="ignore")


@pytest.mark.parametrize("entry, message", [
    ({"id": "x", "image": "red.png"}, "conversations"),
    ({"id": "x", "image": "red.png", "conversations": [{"from": "gpt", "value": "<image>"},
                                                      {"from": "human", "value": "q"}]}, "alternate"),
    ({"id": "x", "image": "red.png", "conversations": [{"from": "human", "value": "<image>a"},
                                                      {"from": "human", "value": "b"}]}, "alternate"),
    ({"id": "x", "image": "red.png", "conversations": _conv("no token", "a")}, "0 '<image>' token"),
    ({"id": "x", "image": "red.png", "conversations": _conv("<image><image>", "a")}, "2 '<image>' token"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}]}, "ends with a human turn"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}, "unknown role"),
])
def test_llava_malformed_entries_name_the_entry(llava_dir, entry, message):
    root, entries = llava_dir
    (root / "bad.json").write_text(json.dumps(entries[:2] + [entry]))
    with pytest.raises(ValueError, match=message) as err:
        load_llava_json(root / "bad.json", root / "imgs")
    assert "entry 2" in str(err.value) and "'x'" in str(err.value)


def test_llava_empty_and_corrupt(llava_dir):
    root, entries = llava_dir
    (root / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no entries"):
        load_llava_json(root / "empty.json", root / "imgs")
    (root / "blank.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_llava_json(root / "blank.jsonl", root / "imgs")
    (root / "imgs" / "broken.png").write_bytes(b"not an image at all")
    (root / "c.json").write_text(json.dumps([{"image": "broken.png", "conversations": _conv("<image>", "a")}]))
    with pytest.raises(ValueError, match="broken.png"):
        load_llava_json(root / "c.json", root / "imgs")


def _imagefolder(root, n=3):
    root.mkdir()
    rows = []
    for i in range(n):
        _img((10 * i, 0, 0)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_imagefolder_caption_and_t2i(tmp_path):
    _imagefolder(tmp_path / "folder")
    cap = load_imagefolder(tmp_path / "folder", task="caption", cache_dir=tmp_path / "cache")
    assert len(cap) == 3
    by_text = {e["messages"][1]["content"]: e for e in cap}
    assert set(by_text) == {"picture 0", "picture 1", "picture 2"}
    e = by_text["picture 2"]
    assert e["task"] == "understanding" and e["messages"][0]["content"] == "<image>\n" + CAPTION_PROMPT
    assert e["images"][0].mode == "RGB" and e["images"][0].getpixel((0, 0)) == (20, 0, 0)  # text matches its image
    t2i = load_imagefolder(tmp_path / "folder", task="t2i", cache_dir=tmp_path / "cache")
    assert {(x["prompt"], x["image"].getpixel((0, 0))[0]) for x in t2i} == {(f"picture {i}", 10 * i) for i in range(3)}


def test_imagefolder_errors(tmp_path):
    (tmp_path / "nometa").mkdir()
    _img((1, 2, 3)).save(tmp_path / "nometa" / "a.png")
    with pytest.raises(ValueError, match="metadata.jsonl"):
        load_imagefolder(tmp_path / "nometa", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        load_imagefolder(tmp_path / "nowhere")
    _imagefolder(tmp_path / "f")
    with pytest.raises(ValueError, match="caption_text"):
        load_imagefolder(tmp_path / "f", text_column="caption_text", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="task"):
        load_imagefolder(tmp_path / "f", task="segment", cache_dir=tmp_path / "cache")


def test_jsonl_table_with_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    _img((0, 200, 0)).save(tmp_path / "pics" / "g.png")
    _img((0, 0, 200)).save(tmp_path / "pics" / "b.png")
    rows = [{"img": "pics/g.png", "caption": "green", "q": "color?"},
            {"img": "pics/b.png", "caption": "blue", "q": "which?"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    kw = dict(image_column="img", text_column="caption", cache_dir=tmp_path / "cache")
    cap = load_table(tmp_path / "t.jsonl", **kw)
    assert [e["messages"][1]["content"] for e in cap] == ["green", "blue"]
    assert cap[0]["images"][0].getpixel((1, 1)) == (0, 200, 0) and cap[0]["qtype"] == "caption"
    t2i = load_table(tmp_path / "t.jsonl", task="t2i", **kw)
    assert [(e["prompt"], e["image"].getpixel((0, 0))) for e in t2i] == [("green", (0, 200, 0)), ("blue", (0, 0, 200))]
    vqa = load_table(tmp_path / "t.jsonl", task="vqa", question_column="q", **kw)
    assert vqa[1]["messages"][0]["content"] == "<image>\nwhich?" and vqa[1]["messages"][1]["content"] == "blue"
    # image_root: paths relative to another folder.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.json").write_text(json.dumps(rows))
    assert len(load_table(tmp_path / "sub" / "t.json", image_root=tmp_path, **kw)) == 2
    with pytest.raises(FileNotFoundError, match="g.png"):
        load_table(tmp_path / "sub" / "t.json", **kw)
    with pytest.raises(ValueError, match="no column 'text'"):
        load_table(tmp_path / "t.jsonl", image_column="img", cache_dir=tmp_path / "cache")


def test_parquet_table_with_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(color):
        buf = io.BytesIO()
        _img(color).save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({
        "image": [{"bytes": png((255, 255, 0)), "path": None}, {"bytes": png((0, 255, 255)), "path": None}],
        "raw": [png((1, 1, 1)), png((2, 2, 2))],
        "text": ["yellow", "cyan"],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    ex = load_table(tmp_path / "t.parquet", task="t2i", cache_dir=tmp_path / "cache")
    got = [(e["prompt"], e["image"].getpixel((0, 0))) for e in ex]
    assert got == [("yellow", (255, 255, 0)), ("cyan", (0, 255, 255))]
    raw = load_table(tmp_path / "t.parquet", image_column="raw", cache_dir=tmp_path / "cache")
    assert np.asarray(raw[1]["images"][0]).max() == 2
    bad = pa.table({"image": [b"garbage"], "text": ["x"]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 0"):
        load_table(tmp_path / "bad.parquet", cache_dir=tmp_path / "cache")


def test_table_empty_and_unsupported(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_table(tmp_path / "e.jsonl")
    (tmp_path / "t.csv").write_text("image,text\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_table(tmp_path / "t.csv")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "text": pa.array([], pa.string())}),
                   tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="no rows"):
        load_table(tmp_path / "e.parquet", cache_dir=tmp_path / "cache")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(ValueError, match="e.json"):
        load_table(tmp_path / "e.json", cache_dir=tmp_path / "cache")
