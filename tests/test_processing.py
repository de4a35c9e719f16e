"""MMDLMProcessor: chats with images -> model inputs, task prompt layouts, answer decoding, errors, save/load."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration
from mmdlm.processing import MMDLMProcessor
from mmdlm.tokenization import config_token_fields, special_token_ids, train_tokenizer
from mmdlm.vision.image_processing import MMDLMImageProcessor

WORDS = "a red blue green circle square triangle on the left right top bottom what color is shape how many".split()
S, SLOTS = 16, 4  # view size and feature slots per view of the test processor


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(300)], vocab_size=400)


@pytest.fixture(scope="module")
def proc(tok):
    return MMDLMProcessor(tok, MMDLMImageProcessor(image_size=S), num_image_tokens=SLOTS, max_length=256)


@pytest.fixture(scope="module")
def ids(tok):
    return special_token_ids(tok)


def img(color, size=(20, 12)):
    return Image.new("RGB", size, color)


def user(*blocks):
    content = [{"type": "image", "image": b} if not isinstance(b, str) else {"type": "text", "text": b} for b in blocks]
    return {"role": "user", "content": content}


def collapse(row, image_id):
    """Ids with each run of image slots folded back to one placeholder, padding removed by the caller."""
    out = []
    for t in row:
        if not (t == image_id and out and out[-1] == image_id):
            out.append(t)
    return out


def test_single_image_chat(proc, tok, ids):
    conv = [user(img("red"), "what color is the shape?")]
    out = proc.apply_chat_template(conv)
    row = out["input_ids"][0].tolist()
    assert out["input_ids"].shape == out["attention_mask"].shape and out["attention_mask"].all()
    assert row.count(ids["image_token_id"]) == SLOTS
    rendered = proc.apply_chat_template(conv, tokenize=False)
    assert rendered.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat color")
    assert collapse(row, ids["image_token_id"]) == tok.encode(rendered, add_special_tokens=False)
    assert out["pixel_values"].shape == (1, 3, S, S) and out["image_sizes"] == [(20, 12)]


def test_multi_image_and_multi_turn(proc, tok, ids):
    conv = [
        user(img("red"), img("blue"), "compare"),
        {"role": "assistant", "content": [{"type": "text", "text": "red and blue"}]},
        user(np.full((8, 8, 3), 255, np.uint8), "and this?"),
    ]
    out = proc.apply_chat_template(conv)
    row = out["input_ids"][0].tolist()
    assert row.count(ids["image_token_id"]) == 3 * SLOTS
    assert row.count(ids["eot_token_id"]) == 3  # two user turns and the assistant turn
    assert "red and blue<|eot_id|>" in tok.decode(row)
    pv = out["pixel_values"]
    assert pv.shape == (3, 3, S, S)
    # Images keep conversation order: red, blue, white (centre pixels, normalised to [-1, 1]).
    centre = pv[:, :, S // 2, S // 2]
    assert torch.allclose(centre, torch.tensor([[1.0, -1, -1], [-1, -1, 1], [1, 1, 1]]), atol=0.05)


def test_batch_is_left_padded_with_mask(proc, ids):
    short = [user(img("red"), "red?")]
    long = [user(img("blue"), img("green"), "a red circle on the left of a blue square")]
    out = proc.apply_chat_template([short, long])
    single = [proc.apply_chat_template(c)["input_ids"][0] for c in (short, long)]
    L = max(len(s) for s in single)
    assert out["input_ids"].shape == (2, L)
    for r, s in enumerate(single):
        pad = L - len(s)
        assert torch.equal(out["input_ids"][r, pad:], s)
        assert (out["input_ids"][r, :pad] == ids["pad_token_id"]).all()
        assert out["attention_mask"][r].tolist() == [0] * pad + [1] * len(s)
    assert out["pixel_values"].shape[0] == 3 and len(out["image_sizes"]) == 3
    right = proc.apply_chat_template([short, long], padding_side="right")
    assert torch.equal(right["input_ids"][0, : len(single[0])], single[0])
    assert right["attention_mask"][0].tolist() == [1] * len(single[0]) + [0] * (L - len(single[0]))


def test_text_only_batch_and_plain_string_content(proc, ids):
    out = proc.apply_chat_template([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "how many?"}]])
    assert out["pixel_values"] is None and out["image_sizes"] is None
    assert ids["image_token_id"] not in out["input_ids"].tolist()
    assert proc.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=False).dim() == 2


def test_image_sources_paths_and_separate_images(proc, tmp_path, ids):
    path = tmp_path / "red.png"
    img("red").save(path)
    text = {"type": "text", "text": "x"}
    by_path = proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "path": str(path)}, text]}])
    by_url = proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": str(path)}, text]}])
    by_pil = proc.apply_chat_template([user(img("red"), "x")])
    # The dataset format: string content with <image> and the images passed alongside.
    by_list = proc.apply_chat_template([{"role": "user", "content": "<image>\nx"}], images=[img("red")])
    for other in (by_url, by_pil, by_list):
        assert torch.equal(other["input_ids"], by_path["input_ids"])
        assert torch.allclose(other["pixel_values"], by_path["pixel_values"])


def test_call_with_placeholders_matches_chat(proc):
    conv = [user(img("red"), "what color?")]
    rendered = proc.apply_chat_template(conv, tokenize=False)
    via_call = proc(rendered, images=[img("red")])
    assert torch.equal(via_call["input_ids"], proc.apply_chat_template(conv)["input_ids"])
    two = proc(["<image>\nred?", "<image> <image> which?"], images=[img("red"), img("blue"), img("green")])
    assert two["pixel_values"].shape[0] == 3
    counts = (two["input_ids"] == proc.image_token_id).sum(1).tolist()
    assert counts == [SLOTS, 2 * SLOTS]


def test_anyres_and_image_newline_slots_match_the_model(tok):
    ip = MMDLMImageProcessor(image_size=S, aspect_ratio="anyres", image_grid_pinpoints="(1x1),...,(2x2)")
    p = MMDLMProcessor(tok, ip, num_image_tokens=SLOTS + 1, use_image_newline=True)
    wide, square = img("red", (64, 32)), img("blue", (16, 16))
    out = p.apply_chat_template([user(wide, square, "compare")])
    views = [ip.num_views(wide.size), ip.num_views(square.size)]
    assert views[0] > 1 and [v.shape[0] for v in out["pixel_values"]] == views
    expected = sum(v * SLOTS + 1 for v in views)  # one newline per image, as MMDLMModel.image_features appends
    assert (out["input_ids"] == p.image_token_id).sum() == expected


def tiny_model_config(tok, **extra):
    vision = {"kind": "vit", "image_size": S, "patch_size": 8, "width": 32, "depth": 2, "heads": 2}
    return MMDLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vision_config=vision,
                       mm_projector_type="linear", max_position_embeddings=300, **config_token_fields(tok, 16), **extra)


def test_from_config_feeds_the_model(tok):
    cfg = tiny_model_config(tok, use_image_newline=True)
    p = MMDLMProcessor.from_config(cfg, tok)
    assert p.num_image_tokens == (S // 8) ** 2 + 1 and p.max_length == 300
    assert p.image_processor.image_size == S and p.image_token_offset == len(tok) and p.codebook_size == 16
    torch.manual_seed(0)
    model = MMDLMForConditionalGeneration(cfg).eval()
    batch = p.apply_chat_template([[user(img("red"), "red?")], [user(img("blue"), img("green"), "which?")]])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    with pytest.raises(ValueError, match="image_size"):
        MMDLMProcessor.from_config(cfg, tok, image_processor=MMDLMImageProcessor(image_size=32))


def test_t2i_and_text_prompt_layouts(proc, tok, ids):
    t2i = proc.build_t2i_prompt(["red circle", ""])
    text_ids = tok.encode("red circle", add_special_tokens=False)
    assert t2i[0] == [ids["t2i_token_id"], ids["bos_token_id"], *text_ids, ids["eos_token_id"]]
    assert t2i[1] == [ids["t2i_token_id"], ids["bos_token_id"], ids["eos_token_id"]]
    assert proc.build_text_prompt("red circle") == [[ids["bos_token_id"], *text_ids]]
    assert proc.build_text_prompt(["red circle"], add_eos=True) == [[ids["bos_token_id"], *text_ids, ids["eos_token_id"]]]


def test_mmu_codes_prompt_layout(tok, ids):
    p = MMDLMProcessor.from_config(tiny_model_config(tok), tok)
    codes = torch.tensor([[0, 5, 15], [3, 3, 1]])
    rows = p.build_mmu_codes_prompt(codes, "what color?")
    chat = tok.apply_chat_template([{"role": "user", "content": "what color?"}], tokenize=False, add_generation_prompt=True)
    chat_ids = tok.encode(chat, add_special_tokens=False)
    off = len(tok)
    assert rows[0] == [ids["mmu_token_id"], ids["soi_token_id"], off, off + 5, off + 15, ids["eoi_token_id"], *chat_ids]
    assert rows[1][2:5] == [off + 3, off + 3, off + 1]
    assert chat_ids[0] == ids["bos_token_id"] and tok.decode(chat_ids).endswith("assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="codes must lie"):
        p.build_mmu_codes_prompt([16], "q")
    with pytest.raises(ValueError, match="one question per row"):
        p.build_mmu_codes_prompt(codes, ["a", "b", "c"])
    no_codes = MMDLMProcessor(tok)
    with pytest.raises(ValueError, match="image_token_offset"):
        no_codes.build_mmu_codes_prompt([1], "q")


def test_decode_strips_prompt_and_cuts_at_eot_or_eos(proc, tok, ids):
    prompt = proc.apply_chat_template([{"role": "user", "content": "color?"}])["input_ids"][0].tolist()
    ans = tok.encode(" red circle ", add_special_tokens=False)
    tail = tok.encode("blue square", add_special_tokens=False)
    mask = ids["mask_token_id"]
    seq = prompt + ans + [ids["eot_token_id"]] + tail
    assert proc.decode(seq, len(prompt)) == "red circle"
    seq_eos = prompt + [mask] + ans + [len(tok) + 3] + [ids["eos_token_id"]] + tail  # mask and image code dropped
    assert proc.decode(seq_eos, len(prompt)) == "red circle"
    n = max(len(seq), len(seq_eos))
    batch = torch.tensor([[ids["pad_token_id"]] * (n - len(seq)) + seq, seq_eos + [ids["eos_token_id"]] * (n - len(seq_eos))])
    assert proc.batch_decode_answers(batch, [n - len(seq) + len(prompt), len(prompt)]) == ["red circle"] * 2
    assert proc.decode(batch[:1], n - len(seq) + len(prompt)) == ["red circle"]


def test_errors_are_clear(proc, tok):
    red = img("red")
    with pytest.raises(ValueError, match="Split the batch"):
        proc.apply_chat_template([[user(red, "x")], [{"role": "user", "content": "no image"}]])
    with pytest.raises(ValueError, match="more images to place"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    with pytest.raises(ValueError, match="more images to place"):
        proc.apply_chat_template([user(red, "and <image> here")])
    with pytest.raises(ValueError, match="more image"):
        proc.apply_chat_template([{"role": "user", "content": "<image>\nx"}], images=[red, red])
    with pytest.raises(ValueError, match="placeholder"):
        proc("<image> one", images=[red, red])
    with pytest.raises(ValueError, match="context.*max_length=256"):
        proc.apply_chat_template([{"role": "user", "content": "what color " * 10_000}])
    with pytest.raises(ValueError, match="unknown content type 'video'"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}])
    with pytest.raises(ValueError, match="non-empty list"):
        proc.apply_chat_template([])
    with pytest.raises(ValueError, match="conversation 1 is empty"):
        proc.apply_chat_template([[{"role": "user", "content": "x"}], []])
    with pytest.raises(ValueError, match="never downloads"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "https://x/y.png"}]}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        proc.apply_chat_template([{"content": "x"}])
    with pytest.raises(ValueError, match="cannot place images"):
        MMDLMProcessor(tok).apply_chat_template([user(red, "x")])


def test_save_and_load_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = MMDLMProcessor.from_config(tiny_model_config(tok, use_image_newline=True), tok)
    p.save_pretrained(tmp_path)
    assert {"tokenizer.json", "preprocessor_config.json", "processor_config.json"} <= {f.name for f in tmp_path.iterdir()}
    q = MMDLMProcessor.from_pretrained(tmp_path)
    assert q.to_dict() == p.to_dict() and q.image_processor.to_dict() == p.image_processor.to_dict()
    conv = [user(img("red"), "what color?")]
    a, b = p.apply_chat_template(conv), q.apply_chat_template(conv)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        MMDLMProcessor.from_pretrained(tmp_path / "missing")
