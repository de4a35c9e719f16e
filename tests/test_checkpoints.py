"""Loading LLaDA / LLaDA-V / MMaDA folders natively: logits against an independent from-the-formulas forward pass,
special ids, save/load round trips, and helpful errors for every kind of bad folder."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmdlm.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from mmdlm.testing.fake_checkpoints import (REAL_TOKEN_IDS, fake_siglip_config, write_fake_llada,
                                            write_fake_llada_v, write_fake_mmada)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


# ------------------------------------------------------------------------------------------ reference forward pass


def olmo_params(t: dict, n_layers: int) -> dict:
    """Raw OLMo tensors -> the pieces of the formula (written out here, not taken from the loader)."""
    p = "model.transformer."
    layers = [dict(attn_norm=t[f"{p}blocks.{i}.attn_norm.weight"], q=t[f"{p}blocks.{i}.q_proj.weight"],
                   k=t[f"{p}blocks.{i}.k_proj.weight"], v=t[f"{p}blocks.{i}.v_proj.weight"],
                   o=t[f"{p}blocks.{i}.attn_out.weight"], ff_norm=t[f"{p}blocks.{i}.ff_norm.weight"],
                   gate=t[f"{p}blocks.{i}.ff_proj.weight"], up=t[f"{p}blocks.{i}.up_proj.weight"],
                   down=t[f"{p}blocks.{i}.ff_out.weight"]) for i in range(n_layers)]
    emb = t[p + "wte.weight"]
    return dict(emb=emb, layers=layers, final_norm=t[p + "ln_f.weight"], head=t.get(p + "ff_out.weight", emb))


def llama_params(t: dict, n_layers: int) -> dict:
    layers = [dict(attn_norm=t[f"model.layers.{i}.input_layernorm.weight"],
                   q=t[f"model.layers.{i}.self_attn.q_proj.weight"], k=t[f"model.layers.{i}.self_attn.k_proj.weight"],
                   v=t[f"model.layers.{i}.self_attn.v_proj.weight"], o=t[f"model.layers.{i}.self_attn.o_proj.weight"],
                   ff_norm=t[f"model.layers.{i}.post_attention_layernorm.weight"],
                   gate=t[f"model.layers.{i}.mlp.gate_proj.weight"], up=t[f"model.layers.{i}.mlp.up_proj.weight"],
                   down=t[f"model.layers.{i}.mlp.down_proj.weight"]) for i in range(n_layers)]
    emb = t["model.embed_tokens.weight"]
    return dict(emb=emb, layers=layers, final_norm=t["model.norm.weight"], head=t.get("lm_head.weight", emb))


def rms_norm(x, w, eps=1e-5):
    x = x.float()
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope_half_split(x, theta):
    """x [B, H, L, hd]; pairs (i, i + hd/2) rotate by angle pos * theta^(-2i/hd)."""
    hd, L = x.shape[-1], x.shape[2]
    freq = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * freq[None]
    cos, sin = ang.cos().float(), ang.sin().float()
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def reference_logits(w: dict, embeds: torch.Tensor, n_heads: int, n_kv: int, theta: float) -> torch.Tensor:
    """Bidirectional LLaMA/LLaDA block stack in plain fp32 torch, from the raw weights."""
    x = embeds.float()
    B, L, d = x.shape
    hd = d // n_heads
    for lw in w["layers"]:
        h = rms_norm(x, lw["attn_norm"])
        q = (h @ lw["q"].T).view(B, L, n_heads, hd).transpose(1, 2)
        k = (h @ lw["k"].T).view(B, L, n_kv, hd).transpose(1, 2)
        v = (h @ lw["v"].T).view(B, L, n_kv, hd).transpose(1, 2)
        q, k = rope_half_split(q, theta), rope_half_split(k, theta)
        k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # no causal mask
        x = x + (att @ v).transpose(1, 2).reshape(B, L, d) @ lw["o"].T
        h = rms_norm(x, lw["ff_norm"])
        x = x + (F.silu(h @ lw["gate"].T) * (h @ lw["up"].T)) @ lw["down"].T
    return rms_norm(x, w["final_norm"]) @ w["head"].T


def reference_image_features(fake, pixel_values: torch.Tensor) -> torch.Tensor:
    """SigLIP (HF layout) up to layer -2 of the full tower, patches only, then Linear-GELU-Linear, then newline."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vc, t = fake.vision_config, fake.tensors
    vis = {k[len(VISION_PREFIX):]: v for k, v in t.items() if k.startswith(VISION_PREFIX)}
    n_stored = len({k.split(".")[2] for k in vis if k.startswith("encoder.layers.")})
    fields = {k: v for k, v in vc.items() if k != "model_type"}
    tower = SiglipVisionModel(SiglipVisionConfig(**{**fields, "num_hidden_layers": n_stored}, vision_use_head=False))
    if any(k.startswith("vision_model.") for k in tower.state_dict()):
        vis = {"vision_model." + k: v for k, v in vis.items()}
    tower.load_state_dict(vis, strict=True)
    core = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        h = core.embeddings(pixel_values)
        for layer in core.encoder.layers[: vc["num_hidden_layers"] - 1]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
    proj = F.linear(F.gelu(F.linear(h, t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"])),
                    t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"])
    return torch.cat([proj.reshape(-1, proj.shape[-1]), t["model.image_newline"][None]], dim=0)


# The reference formula and the model add in different orders: fp32 results differ by ~1e-5 on some CPUs' kernels
# (AVX2 here). A wrong key mapping or layout changes logits by O(1).
FP32 = dict(rtol=1e-4, atol=5e-5)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _ids(vocab: int, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("tied,n_kv", [(False, 4), (True, 4), (False, 2)], ids=["untied", "tied", "gqa"])
def test_llada_logits_match_formula(tmp_path, tied, n_kv):
    fake = write_fake_llada(tmp_path, weight_tying=tied, n_kv_heads=n_kv, rope_theta=10000.0)
    model, tok, info = load_checkpoint(tmp_path)
    assert info.layout == "llada" and len(info.weight_files) == 2
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    ids = _ids(model.config.vocab_size)
    w = olmo_params(fake.tensors, 2)
    ref = reference_logits(w, w["emb"][ids], 4, n_kv, 10000.0)
    torch.testing.assert_close(_logits(model, ids), ref, **FP32)
    assert model.config.mask_token_id == fake.config["mask_token_id"] == tok.convert_tokens_to_ids("<|mdm_mask|>")
    assert model.config.eot_token_id == fake.token_ids["<|eot_id|>"]
    assert not any(p.is_meta for p in model.parameters()) and not model.training


def test_fake_tokenizer_loads_with_autotokenizer_and_folder_without_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    fake = write_fake_llada(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=False)
    assert {t: tok.convert_tokens_to_ids(t) for t in fake.token_ids} == fake.token_ids
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    model, tok, info = load_checkpoint(tmp_path)
    assert tok is None and model.config.mask_token_id == fake.config["mask_token_id"]
    assert model.config.soi_token_id is None  # the real 126k ids are only assumed for a 126464-row vocab


def test_llada_text_only_llama_keys(tmp_path):
    fake = write_fake_llada_v(tmp_path, vision=False, tie_word_embeddings=True, shards=1)
    model, _, info = load_checkpoint(tmp_path)
    assert info.layout == "llada_llama" and info.weight_files == ["model.safetensors"]
    assert model.config.vision_config is None
    ids = _ids(model.config.vocab_size)
    w = llama_params(fake.tensors, 2)
    torch.testing.assert_close(_logits(model, ids), reference_logits(w, w["emb"][ids], 4, 4, 500000.0),
                               **FP32)


@pytest.mark.parametrize("truncate,where", [(True, "config"), (False, "subfolder")])
def test_llada_v_image_through_tower_matches_formula(tmp_path, truncate, where):
    fake = write_fake_llada_v(tmp_path, truncate_tower=truncate, vision_config_location=where, n_kv_heads=2)
    model, tok, info = load_checkpoint(tmp_path)
    cfg = model.config
    assert info.layout == "llada_v" and cfg.use_image_newline and cfg.mm_projector_type == "mlp2x_gelu"
    ids = fake.token_ids
    # LLaDA-V bans EOS, BOS and the two header tokens at masked slots; eot is <|eot_id|>.
    assert cfg.banned_token_ids == [ids["<|endoftext|>"], ids["<|startoftext|>"], ids["<|start_header_id|>"],
                                    ids["<|end_header_id|>"]]
    assert cfg.eot_token_id == ids["<|eot_id|>"]
    # <image> is the reserved token right before <|mdm_mask|>, as 126335 is in the real tokenizer.
    assert cfg.image_token_id == ids["<|mdm_mask|>"] - 1 == tok.convert_tokens_to_ids("<image>")
    assert tok("<image>")["input_ids"] == [cfg.image_token_id]
    prompt = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language")
    assert prompt.endswith("What is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    n_slots = (28 // 14) ** 2 + 1
    text = _ids(ids["<|startoftext|>"], length=6)[:1]
    input_ids = torch.cat([text[:, :3], torch.full((1, n_slots), cfg.image_token_id), text[:, 3:]], dim=1)
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    feats = reference_image_features(fake, px)
    w = llama_params(fake.tensors, 2)
    embeds = w["emb"][input_ids].clone()
    embeds[input_ids == cfg.image_token_id] = feats
    ref = reference_logits(w, embeds, 4, 2, 500000.0)
    torch.testing.assert_close(_logits(model, input_ids, pixel_values=px), ref, **FP32)


def test_llada_v_processor_accepts_loaded_model(tmp_path):
    from mmdlm.processing import MMDLMProcessor
    from mmdlm.tokenization import special_token_ids

    write_fake_llada_v(tmp_path)
    model, tok, _ = load_checkpoint(tmp_path)
    assert special_token_ids(tok)["image_token_id"] == model.config.image_token_id
    proc = MMDLMProcessor.from_config(model.config, tok)
    assert proc.num_image_tokens == model.model.vision_tower.num_patches + 1


@pytest.mark.parametrize("named", [True, False], ids=["named-task-tokens", "reserved-names"])
def test_mmada_keeps_vocab_offsets_and_task_ids(tmp_path, named):
    fake = write_fake_mmada(tmp_path, task_token_names=named)
    model, tok, info = load_checkpoint(tmp_path)
    cfg = model.config
    assert info.layout == "mmada" and cfg.source_layout == "mmada"
    assert cfg.vocab_size == fake.config["new_vocab_size"] == fake.extra["llm_vocab_size"] + 64
    assert cfg.codebook_size == 64 and cfg.image_token_offset == len(tok) == fake.extra["image_token_offset"]
    assert cfg.image_tokenizer_config is None and not cfg.can_draw_images
    assert any("image tokenizer" in n for n in info.notes)
    # Same structure as the real ids: task tokens at fixed distances from BOS, codes right after <|eot_id|>.
    bos, real_bos = cfg.bos_token_id, REAL_TOKEN_IDS["<|startoftext|>"]
    for name in ("soi", "eoi", "t2i", "mmu"):
        assert getattr(cfg, f"{name}_token_id") - bos == REAL_TOKEN_IDS[f"<|{name}|>"] - real_bos
        assert tok.convert_tokens_to_ids(f"<|{name}|>") == getattr(cfg, f"{name}_token_id")
    assert cfg.image_token_offset - cfg.eot_token_id == 126349 - REAL_TOKEN_IDS["<|eot_id|>"]
    ids = torch.cat([_ids(len(tok), 5), cfg.image_token_offset + _ids(64, 4, seed=2)], dim=1)  # text + image codes
    w = olmo_params(fake.tensors, 2)
    torch.testing.assert_close(_logits(model, ids), reference_logits(w, w["emb"][ids], 4, 4, 500000.0),
                               **FP32)


def test_mmdlm_load_keeps_mmada_ids(tmp_path):
    import mmdlm

    write_fake_mmada(tmp_path)
    _, tok, info = load_checkpoint(tmp_path)
    pipe = mmdlm.load(str(tmp_path), device="cpu")
    cfg = pipe.model.config
    assert (cfg.image_token_offset, cfg.codebook_size) == (len(tok), 64)
    assert {k: getattr(cfg, k) for k in info.special_token_ids} == info.special_token_ids
    assert pipe.generation_config.image_steps == 15  # MMaDA's own t2i default (T=15)


def test_dtype_and_device(tmp_path):
    write_fake_llada(tmp_path / "a", dtype=torch.bfloat16)
    model, _, _ = load_checkpoint(tmp_path / "a")  # dtype None keeps what is stored
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _, _ = load_checkpoint(tmp_path / "a", dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="not a floating torch dtype"):
        load_checkpoint(tmp_path / "a", dtype="int8")
    fake = write_fake_llada(tmp_path / "b")
    model, _, _ = load_checkpoint(tmp_path / "b", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ids = _ids(model.config.vocab_size)
    w = olmo_params(fake.tensors, 2)
    ref = reference_logits(w, w["emb"][ids], 4, 4, 500000.0)
    assert (_logits(model, ids) - ref).abs().max() < 0.1 * ref.abs().max()


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("writer", [write_fake_llada_v, write_fake_mmada, write_fake_llada])
def test_save_load_round_trip(tmp_path, writer):
    writer(tmp_path / "src")
    model, tok, _ = load_checkpoint(tmp_path / "src")
    save_checkpoint(model, tok, tmp_path / "saved")
    model2, tok2, info2 = load_checkpoint(tmp_path / "saved")
    assert info2.layout == "mmdlm" and model2.config.source_layout == model.config.source_layout
    kw = {}
    ids = _ids(len(tok), 8)
    if model.config.vision_config is not None:
        n = model.model.vision_tower.num_patches + 1
        ids = torch.cat([ids[:1, :3], torch.full((1, n), model.config.image_token_id), ids[:1, 3:]], dim=1)
        kw["pixel_values"] = torch.randn(1, 3, 28, 28)
    assert torch.equal(_logits(model, ids, **kw), _logits(model2, ids, **kw))
    for field in ("image_token_id", "banned_token_ids", "image_token_offset", "codebook_size", "soi_token_id",
                  "mask_token_id", "eot_token_id", "use_image_newline", "vision_config"):
        assert getattr(model2.config, field) == getattr(model.config, field)
    text = "<|startoftext|><image> what color <|soi|><|eot_id|> is it?"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"] and len(tok2) == len(tok)
    chat = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


# ------------------------------------------------------------------------------------------ bad input


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_shard(folder, fn):
    """Apply fn to the tensors of the first shard and keep the index consistent."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = fn(load_file(str(folder / shard)))
    save_file(tensors, str(folder / shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | {k: shard for k in tensors}
    index_file.write_text(json.dumps(index))


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no config\.json.*x\.txt"):
        load_checkpoint(tmp_path)


def test_unknown_layout_names_fields_keys_and_supported_layouts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1}))
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    msg = str(e.value)
    for part in ("unknown checkpoint layout", "'gpt2'", "n_embd", "transformer.h.0.attn.c_attn.weight",
                 "'llada'", "'llada_v'", "'mmada'", "'mmdlm'"):
        assert part in msg


def test_index_naming_missing_shard(tmp_path):
    write_fake_llada(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing.*model-00002-of-00002\.safetensors.*incomplete"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_names_tensor_expected_and_got(tmp_path):
    write_fake_llada(tmp_path)
    _edit_config(tmp_path, mlp_hidden_size=80)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert re.search(r"model\.transformer\.blocks\.0\.ff_proj\.weight .*expected \[80, 64\], got \[96, 64\]",
                     str(e.value))


def test_missing_tensor_named_as_in_checkpoint(tmp_path):
    write_fake_llada(tmp_path)
    _rewrite_shard(tmp_path, lambda t: {k: v for k, v in t.items() if k != "model.transformer.blocks.0.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"1 missing .*blocks\.0\.up_proj\.weight.*Nothing was loaded"):
        load_checkpoint(tmp_path)


def test_unexpected_tensor_and_layer_count(tmp_path):
    write_fake_llada(tmp_path / "a")
    _rewrite_shard(tmp_path / "a", lambda t: {**t, "model.transformer.blocks.0.att_proj.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected .*blocks\.0\.att_proj\.weight"):
        load_checkpoint(tmp_path / "a")
    write_fake_llada(tmp_path / "b")
    _edit_config(tmp_path / "b", n_layers=1)
    with pytest.raises(CheckpointError, match=r"9 unexpected .*blocks\.1\..*-> model\.layers\.1\."):
        load_checkpoint(tmp_path / "b")


def test_tied_head_mismatch_says_which_flag(tmp_path):
    write_fake_llada(tmp_path / "a", weight_tying=True)
    _edit_config(tmp_path / "a", weight_tying=False)
    with pytest.raises(CheckpointError, match=r"ff_out\.weight \(-> lm_head\.weight\).*set weight_tying.* true"):
        load_checkpoint(tmp_path / "a")
    write_fake_llada(tmp_path / "b")
    _edit_config(tmp_path / "b", weight_tying=True)
    with pytest.raises(CheckpointError, match=r"model\.transformer\.ff_out\.weight.*tie_word_embeddings false"):
        load_checkpoint(tmp_path / "b")


def test_pickled_weights_are_refused(tmp_path):
    write_fake_llada(tmp_path, shards=1)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles"):
        load_checkpoint(tmp_path)


def test_unsupported_olmo_option_and_tokenizer_mismatch(tmp_path):
    write_fake_llada(tmp_path)
    _edit_config(tmp_path, alibi=True)
    with pytest.raises(CheckpointError, match=r"'alibi': True.*not a LLaDA/MMaDA checkpoint"):
        load_checkpoint(tmp_path)
    _edit_config(tmp_path, alibi=False, mask_token_id=5)
    with pytest.raises(CheckpointError, match=r"mask_token_id=5 but the tokenizer's <\|mdm_mask\|> is"):
        load_checkpoint(tmp_path)


def test_llada_v_without_tower_config_or_wrong_layer_count(tmp_path):
    write_fake_llada_v(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["vision_config"]
    cfg["mm_vision_tower"] = "my-org/some-siglip"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no SigLIP config.*vision_tower/config\.json"):
        load_checkpoint(tmp_path / "a")
    write_fake_llada_v(tmp_path / "b", vision_config=fake_siglip_config(num_hidden_layers=4))
    _edit_config(tmp_path / "b", vision_config=fake_siglip_config(num_hidden_layers=6))
    with pytest.raises(CheckpointError, match=r"stores 3 SigLIP encoder layers.*has 6"):
        load_checkpoint(tmp_path / "b")
