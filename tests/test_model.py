"""The denoiser: bidirectional attention, key-padding masks, GQA, KV-cache hook, logits_to_keep, HF save/load."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration


def tiny(**kw):
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mask_token_id=96)
    cfg.update(kw)
    torch.manual_seed(0)
    return MMDLMForConditionalGeneration(MMDLMConfig(**cfg)).eval()


def test_attention_is_bidirectional_unless_causal():
    x = torch.randint(0, 90, (1, 8))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 90  # change only the LAST token
    for causal in (False, True):
        m = tiny(is_causal=causal)
        a, b = m(input_ids=x).logits, m(input_ids=y).logits
        first_changed = not torch.allclose(a[0, 0], b[0, 0])
        assert first_changed == (not causal)


def test_left_padding_with_mask_equals_unpadded():
    m = tiny(num_key_value_heads=2)
    x = torch.randint(0, 90, (1, 7))
    pad = 4
    am = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    xp = torch.cat([torch.full((1, pad), 3), x], 1)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    ref = m(input_ids=x).logits
    got = m(input_ids=xp, attention_mask=am, position_ids=pos).logits[:, pad:]
    assert torch.allclose(ref, got, atol=1e-5)
    # Without the mask the padding leaks into real tokens: the mask really matters.
    leaky = m(input_ids=xp, position_ids=pos).logits[:, pad:]
    assert not torch.allclose(ref, leaky, atol=1e-4)


def test_padding_mask_never_turns_causal():
    m = tiny()
    x = torch.randint(0, 90, (1, 6))
    am = torch.ones(1, 6, dtype=torch.long)
    am[0, 0] = 0
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 90
    a = m(input_ids=x, attention_mask=am).logits
    b = m(input_ids=y, attention_mask=am).logits
    assert not torch.allclose(a[0, 1], b[0, 1])  # position 1 still sees the last token


def test_gqa_matches_repeated_heads():
    m = tiny(num_attention_heads=4, num_key_value_heads=1)
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    x = torch.randint(0, 90, (2, 5))
    # Expand the single KV head into 4 identical heads in an MHA model: same function.
    mha = tiny(num_attention_heads=4, num_key_value_heads=4)
    sd = m.state_dict()
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = v.repeat(4, 1)
    mha.load_state_dict(sd)
    assert torch.allclose(m(input_ids=x).logits, mha(input_ids=x).logits, atol=1e-5)


def test_kv_cache_of_unchanged_positions_gives_full_forward_logits():
    m = tiny()
    x = torch.randint(0, 90, (2, 12))
    full = m(input_ids=x, use_cache=True)
    # prefix [0,4) and suffix [8,12) cached, window [4,8) recomputed: a dual cache.
    cache = [
        (torch.cat([k[:, :, :4], k[:, :, 8:]], 2), torch.cat([v[:, :, :4], v[:, :, 8:]], 2)) for k, v in full.cache
    ]
    pos = torch.arange(4, 8)[None].expand(2, 4)
    win = m(input_ids=x[:, 4:8], cache=cache, position_ids=pos).logits
    assert torch.allclose(win, full.logits[:, 4:8], atol=1e-5)


def test_logits_to_keep_gathers_positions():
    m = tiny()
    x = torch.randint(0, 90, (2, 9))
    full = m(input_ids=x).logits
    idx = torch.tensor([[0, 5, 8], [2, 2, 7]])
    got = m(input_ids=x, logits_to_keep=idx).logits
    assert got.shape == (2, 3, 97)
    assert torch.allclose(got[1, 2], full[1, 7], atol=1e-6) and torch.allclose(got[0, 1], full[0, 5], atol=1e-6)
    assert torch.allclose(m(input_ids=x, logits_to_keep=2).logits, full[:, -2:], atol=1e-6)


def test_rmsnorm_runs_in_fp32_under_bf16():
    m = tiny()
    x = torch.randint(0, 90, (1, 5))
    ref = m(input_ids=x).logits
    got = m.to(torch.bfloat16)(input_ids=x).logits
    assert got.dtype == torch.float32  # logits are always returned in fp32
    assert (got - ref).abs().max() < 0.05


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip_is_bit_exact(tmp_path, tied):
    m = tiny(tie_word_embeddings=tied)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mmdlm"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MMDLMConfig)
    m2 = AutoModel.from_pretrained(tmp_path)
    assert isinstance(m2, MMDLMForConditionalGeneration)
    assert (m2.lm_head.weight is m2.model.embed_tokens.weight) == tied
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_fsdp_wrap_unit_is_declared():
    assert MMDLMForConditionalGeneration._no_split_modules == ["MMDLMDecoderLayer"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.zeros(5, dtype=torch.long)), "input_ids must be an integer tensor"),
        (dict(input_ids=torch.zeros(1, 5)), "input_ids must be an integer tensor"),
        (dict(input_ids=torch.full((1, 5), 500)), "outside"),
        (dict(input_ids=torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4)), "key-padding mask"),
        (dict(inputs_embeds=torch.zeros(1, 5, 7)), "inputs_embeds must be"),
        (dict(), "exactly one of input_ids or inputs_embeds"),
    ],
)
def test_bad_inputs_say_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny()(**kwargs)


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        MMDLMConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="image_token_id"):
        MMDLMConfig(vision_config={"kind": "vit"})
    with pytest.raises(ValueError, match="raise vocab_size"):
        MMDLMConfig(vocab_size=100, image_token_offset=90, codebook_size=20)


def test_image_slots_without_images_error():
    m = tiny(vocab_size=97)
    m.config.image_token_id = 5
    with pytest.raises(ValueError, match="no pixel_values"):
        m(input_ids=torch.tensor([[1, 5, 5, 2]]))


def test_a_batch_of_images_is_encoded_like_one_image_at_a_time():
    m = tiny(vision_config={"kind": "vit", "image_size": 32, "patch_size": 16, "width": 32, "depth": 2, "heads": 2},
             image_token_id=95)
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batched = m.model.image_features(px)  # [N, 3, S, S]: one tower call for the batch
    one_by_one = m.model.image_features([p[None] for p in px])  # a list of views: one call per image
    assert batched.shape == (3 * 4, 32)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[:4], batched[4:8])  # different images, different features


def test_image_slot_embeddings_add_one_learned_vector_per_slot_of_every_view(tmp_path):
    vit = {"kind": "vit", "image_size": 32, "patch_size": 16, "width": 32, "depth": 2, "heads": 2}
    plain = tiny(vision_config=vit, image_token_id=95)
    slotted = tiny(vision_config=vit, image_token_id=95, image_slot_embeddings=True)
    assert slotted.model.image_slot_embed.shape == (4, 32)  # 2x2 patches, hidden 32
    slotted.model.load_state_dict(plain.model.state_dict(), strict=False)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(slotted.model.image_features(px), plain.model.image_features(px))  # zeros at start
    with torch.no_grad():
        slotted.model.image_slot_embed.normal_()
    # The same slot of any image or view moves by the same vector; different slots by different ones.
    delta = slotted.model.image_features(px) - plain.model.image_features(px)
    torch.testing.assert_close(delta, slotted.model.image_slot_embed.repeat(2, 1), atol=1e-5, rtol=1e-5)
    views = slotted.model.image_features([px]) - plain.model.image_features([px])  # one image, two views
    torch.testing.assert_close(views, delta, atol=1e-5, rtol=1e-5)
    slotted.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    assert again.config.image_slot_embeddings
    assert torch.equal(again.model.image_slot_embed, slotted.model.image_slot_embed)


def drawing_tiny(**kw):
    vq = {"image_size": 8, "base_channels": 8, "channel_mult": [1, 2], "embed_dim": 4, "codebook_size": 16}
    return tiny(image_tokenizer_config=vq, codebook_size=16, image_token_offset=60, soi_token_id=90, eoi_token_id=91,
                **kw)


def test_image_code_positions_add_one_learned_vector_per_grid_cell_after_each_soi(tmp_path):
    plain, placed = drawing_tiny(), drawing_tiny(image_code_positions=True)
    assert placed.model.image_code_pos_embed.shape == (4, 32)  # 8 px, two stride-2 levels: a 2x2 code grid
    placed.load_state_dict(plain.state_dict(), strict=False)
    # text, <|soi|> 4 codes <|eoi|>, text, a second image whose codes are still masked (96), text
    row = torch.tensor([[5, 6, 90, 60, 61, 62, 63, 91, 7, 90, 96, 96, 96, 96, 91, 8]])
    torch.testing.assert_close(placed(input_ids=row).logits, plain(input_ids=row).logits)  # zeros at start
    with torch.no_grad():
        placed.model.image_code_pos_embed.normal_()
    delta = placed.model.embed(row) - plain.model.embed(row)
    table = placed.model.image_code_pos_embed
    expected = torch.zeros_like(delta)
    expected[0, 3:7] = table
    expected[0, 10:14] = table  # each image's codes count from their own <|soi|>, masked or not
    torch.testing.assert_close(delta, expected)
    placed.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    assert again.config.image_code_positions
    assert torch.equal(again.model.image_code_pos_embed, table)


def test_image_code_positions_can_be_added_to_a_trained_model_without_changing_it():
    model = drawing_tiny()
    row = torch.tensor([[5, 90, 60, 96, 62, 63, 91]])
    before = model(input_ids=row).logits
    model.model.add_image_code_positions()
    assert model.config.image_code_positions and model.model.image_code_pos_embed.abs().sum() == 0
    torch.testing.assert_close(model(input_ids=row).logits, before)
    with pytest.raises(ValueError, match="needs a model that draws"):
        tiny().model.add_image_code_positions()
    with pytest.raises(ValueError, match="image_code_positions needs an image tokenizer"):
        MMDLMConfig(vocab_size=97, image_code_positions=True)


def test_residual_dropout_acts_in_training_mode_only():
    x = torch.randint(0, 90, (2, 8))
    plain, dropped = tiny(), tiny(residual_dropout=0.5)  # same seed: same weights
    assert torch.equal(plain(input_ids=x).logits, dropped(input_ids=x).logits)  # eval mode: no dropout
    dropped.train()
    a, b = dropped(input_ids=x).logits, dropped(input_ids=x).logits
    assert not torch.allclose(a, b) and not torch.allclose(a, plain(input_ids=x).logits)
    dropped.config.residual_dropout = 0.0  # read at each forward: a loaded model can be given (or lose) it
    assert torch.allclose(dropped(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-6)
    with pytest.raises(ValueError, match="residual_dropout"):
        MMDLMConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, residual_dropout=1.0)
