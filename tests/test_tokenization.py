"""mmdlm's BPE tokenizer: special tokens, the LLaMA-3 chat template, config fields and offline save/load."""

import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmdlm import MMDLMConfig
from mmdlm.tokenization import SPECIAL_TOKENS, config_token_fields, special_token_ids, train_tokenizer

WORDS = "a red blue green circle square triangle on the left right top bottom what color is shape how many".split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + rng.choice([".", "?", "!"]) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), vocab_size=400)


def test_special_tokens_are_single_ids_in_order_and_round_trip(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t, add_special_tokens=False) == [i]
        assert tok.convert_ids_to_tokens(i) == t
    text = "héllo wörld 😀 <image>\nwhat<|eot_id|> <|soi|><|eoi|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert tok.decode(ids) == text
    assert "<image>" not in tok.decode(ids, skip_special_tokens=True)


def test_roles_and_no_automatic_bos(tok):
    ids = special_token_ids(tok)
    assert tok.bos_token == "<|startoftext|>" and tok.bos_token_id == ids["bos_token_id"]
    assert tok.eos_token_id == tok.pad_token_id == ids["eos_token_id"] == ids["pad_token_id"]
    assert tok.mask_token == "<|mdm_mask|>" and tok.mask_token_id == ids["mask_token_id"]
    assert len(set(v for k, v in ids.items() if k != "pad_token_id")) == len(SPECIAL_TOKENS)
    assert tok("red circle")["input_ids"][0] != tok.bos_token_id
    assert tok.eos_token_id not in tok("red circle")["input_ids"]


def test_chat_template_is_llama3_exactly(tok):
    chat = [
        {"role": "user", "content": "  What color is the circle?\n"},
        {"role": "assistant", "content": "Red. "},
        {"role": "user", "content": "And the square?"},
    ]
    expected = (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat color is the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected
    no_prompt = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("Red.<|eot_id|>") and no_prompt.count("<|startoftext|>") == 1
    ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == tok.encode(expected, add_special_tokens=False)


def test_chat_template_renders_multimodal_blocks(tok):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    out = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|start_header_id|>user<|end_header_id|>\n\n<image>\n<image>\nCompare.<|eot_id|>" in out


def test_training_is_deterministic(tok):
    again = train_tokenizer(corpus(), vocab_size=400)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    other = train_tokenizer(corpus(seed=1) + ["zebra zebra zebra"] * 5, vocab_size=400)
    assert other.backend_tokenizer.to_str() != tok.backend_tokenizer.to_str()


def test_save_and_load_offline_through_autotokenizer(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(loaded) == len(tok)
    assert special_token_ids(loaded) == special_token_ids(tok)
    assert loaded.mask_token == tok.mask_token and loaded.pad_token == tok.pad_token
    chat = [{"role": "user", "content": "how many circles?"}]
    assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    for text in corpus(20, seed=3) + ["<image>\nred<|eot_id|>"]:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_config_token_fields_make_a_valid_config(tok):
    fields = config_token_fields(tok, codebook_size=100)
    assert fields["image_token_offset"] == len(tok)
    assert fields["vocab_size"] % 64 == 0 and len(tok) + 100 <= fields["vocab_size"] < len(tok) + 100 + 64
    ids = special_token_ids(tok)
    banned = set(fields["banned_token_ids"])
    assert banned == {ids[k] for k in ("bos_token_id", "start_header_token_id", "end_header_token_id",
                                       "image_token_id", "soi_token_id", "eoi_token_id", "t2i_token_id", "mmu_token_id")}
    # An answer must be able to end (EOT/EOS) and the mask must stay writable by the sampler's bookkeeping.
    assert not banned & {ids["eot_token_id"], ids["eos_token_id"], ids["mask_token_id"]}
    cfg = MMDLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, **fields)
    assert cfg.image_token_offset + cfg.codebook_size <= cfg.vocab_size
    assert cfg.mask_token_id == tok.mask_token_id and cfg.eot_token_id == ids["eot_token_id"]
    assert config_token_fields(tok)["vocab_size"] >= len(tok)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus(10), vocab_size=200)
    with pytest.raises(TypeError, match="strings"):
        train_tokenizer(["ok", 3], vocab_size=300)
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.add_tokens(["hello"])
    with pytest.raises(ValueError, match="lacks.*mdm_mask.*mmu"):
        special_token_ids(PreTrainedTokenizerFast(tokenizer_object=plain))
