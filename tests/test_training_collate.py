"""MultiTaskCollator: one padded batch from mixed understanding / t2i / text examples, and VQ code precomputation."""

import pytest
import torch
from PIL import Image

from mmdlm.configuration_mmdlm import MMDLMConfig
from mmdlm.processing import MMDLMProcessor
from mmdlm.tokenization import config_token_fields, train_tokenizer
from mmdlm.training.collators import TASK_IDS, MultiTaskCollator, precompute_image_codes
from mmdlm.vision.image_tokenizer import VQConfig, VQImageTokenizer

CODEBOOK = 32
N_CODES = 16


@pytest.fixture(scope="module")
def setup():
    texts = ["what color is the circle?", "a large red circle at the center.", "Describe the image.",
             "the quick brown fox jumps over the lazy dog", "user", "assistant"] * 5
    tok = train_tokenizer(texts, vocab_size=300)
    config = MMDLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vision_config={"kind": "vit", "image_size": 64, "patch_size": 16, "width": 32, "depth": 1,
                                        "heads": 2},
                         image_tokenizer_config={"image_size": 64, "codebook_size": CODEBOOK},
                         **config_token_fields(tok, codebook_size=CODEBOOK))
    processor = MMDLMProcessor.from_config(config, tok)
    return tok, config, processor


def _image(color):
    return Image.new("RGB", (64, 64), color)


def _examples():
    codes = torch.arange(N_CODES) % CODEBOOK
    return [
        {"task": "understanding", "images": [_image("red")],
         "messages": [{"role": "user", "content": "<image>\nwhat color is the circle?"},
                      {"role": "assistant", "content": "red"}]},
        {"task": "t2i", "prompt": "a large red circle at the center.", "image": _image("blue"), "image_codes": codes},
        {"task": "text", "text": "the quick brown fox jumps over the lazy dog"},
        {"task": "understanding", "images": [_image("green"), _image("white")],
         "messages": [{"role": "user", "content": "<image>\n<image>\nDescribe the image."},
                      {"role": "assistant", "content": "two squares"},
                      {"role": "user", "content": "what color is the circle?"},
                      {"role": "assistant", "content": "green"}]},
    ]


def test_mixed_batch_layout(setup):
    tok, config, processor = setup
    ids = processor.token_ids
    collator = MultiTaskCollator(processor, max_length=256, config=config)
    batch = collator(_examples())
    B, L = batch["input_ids"].shape
    assert B == 4 and batch["loss_mask"].shape == (B, L) and batch["attention_mask"].shape == (B, L)
    assert batch["task_ids"].tolist() == [TASK_IDS["understanding"], TASK_IDS["t2i"], TASK_IDS["text"],
                                          TASK_IDS["understanding"]]

    # Understanding rows: one slot per feature of each image, images row-major in pixel_values.
    slots = (batch["input_ids"] == config.image_token_id).sum(1)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert slots.tolist() == [processor.num_image_tokens, 0, 0, 2 * processor.num_image_tokens]
    assert int(slots.sum()) == batch["pixel_values"].shape[0] * processor.num_image_tokens
    assert not bool((batch["loss_mask"] & (batch["input_ids"] == config.image_token_id)).any())

    # t2i row: the codes (offset into the image range) sit between <|soi|> and <|eoi|>; only they are targets,
    # and its padding is invisible.
    row = batch["input_ids"][1]
    soi, eoi = int((row == ids["soi_token_id"]).nonzero()), int((row == ids["eoi_token_id"]).nonzero())
    codes = row[soi + 1:eoi]
    assert len(codes) == N_CODES
    assert bool(((codes >= config.image_token_offset) & (codes < config.image_token_offset + CODEBOOK)).all())
    assert (codes - config.image_token_offset).tolist() == (torch.arange(N_CODES) % CODEBOOK).tolist()
    assert row[:2].tolist() == [ids["t2i_token_id"], ids["bos_token_id"]]
    assert batch["loss_mask"][1].nonzero().flatten().tolist() == list(range(soi + 1, eoi))
    assert batch["attention_mask"][1, :eoi + 1].all() and not batch["attention_mask"][1, eoi + 1:].any()

    # Text / understanding rows: all-visible, EOS padding is a target (LLaDA).
    for r in (0, 2, 3):
        assert batch["attention_mask"][r].all()
        assert batch["loss_mask"][r, -1] and batch["input_ids"][r, -1] == ids["eos_token_id"]
    assert batch["input_ids"][2, 0] == ids["bos_token_id"] and not batch["loss_mask"][2, 0]
    assert batch["loss_mask"][2, 1:].all()


def test_understanding_targets_are_the_answers(setup):
    tok, config, processor = setup
    collator = MultiTaskCollator(processor, max_length=256, config=config)
    ex = _examples()[3]
    ids, targets = collator.encode(ex)
    target_ids = [t for t, m in zip(ids, targets) if m]
    text = tok.decode(target_ids, skip_special_tokens=False)
    # Both assistant turns (content + <|eot_id|>) and the closing EOS; never the user turns.
    assert text == "two squares<|eot_id|>green<|eot_id|><|endoftext|>"
    # The prompt of the last turn is tokenized exactly as the sampler will tokenize it.
    prompt = tok.apply_chat_template(ex["messages"][:3], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    unexpanded = [t for t in ids if t != config.image_token_id]
    assert unexpanded[:len(prompt_ids) - 2] == [t for t in prompt_ids if t != config.image_token_id]


def test_truncation_and_errors(setup):
    tok, config, processor = setup
    long_answer = {"task": "understanding", "images": [],
                   "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fox " * 100}]}
    collator = MultiTaskCollator(processor, max_length=40, config=config)
    ids, targets = collator.encode(long_answer)
    assert len(ids) == 40 and targets[-1] == 1 and targets[0] == 0
    with pytest.raises(ValueError, match="max_length"):  # the prompt (image slots) alone does not fit
        MultiTaskCollator(processor, max_length=12, config=config).encode(_examples()[0])
    with pytest.raises(ValueError, match="max_length"):  # 16 codes cannot be cut
        MultiTaskCollator(processor, max_length=16, config=config).encode(_examples()[1])
    bad_codes = dict(_examples()[1], image_codes=torch.full((N_CODES,), CODEBOOK))
    with pytest.raises(ValueError, match="image codes must lie"):
        collator.encode(bad_codes)
    no_codes = {"task": "t2i", "prompt": "x", "image": _image("red")}
    with pytest.raises(ValueError, match="precompute_image_codes"):
        collator.encode(no_codes)


def test_precompute_image_codes_encodes_each_image_once():
    vq = VQImageTokenizer(VQConfig(image_size=64, base_channels=8, channel_mult=(1, 1, 2, 2), embed_dim=4,
                                   codebook_size=CODEBOOK))
    shared = _image("red")
    examples = [{"task": "t2i", "prompt": "a", "image": shared}, {"task": "t2i", "prompt": "b", "image": shared},
                {"task": "t2i", "prompt": "c", "image": _image("blue")}, {"task": "text", "text": "x"}]
    assert precompute_image_codes(examples, vq, batch_size=1) == 2
    codes = examples[0]["image_codes"]
    assert codes.shape == (vq.num_tokens,) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < CODEBOOK
    assert torch.equal(codes, examples[1]["image_codes"])
    assert torch.equal(codes, vq.encode(vq.preprocess([shared])).flatten())
    assert "image_codes" not in examples[3]
    assert precompute_image_codes(examples, vq) == 0  # cached


def test_mixture_sampling_is_deterministic_per_step_and_rank():
    from mmdlm.training.mixture import LoadedSource, Mixture

    texts = [{"task": "text", "text": f"t{i}"} for i in range(50)]
    draws = [{"task": "t2i", "prompt": f"p{i}", "image_codes": torch.zeros(1)} for i in range(10)]
    mix = Mixture([LoadedSource("a", texts, 1.0), LoadedSource("b", draws, 3.0)], seed=0)
    assert mix.task_shares() == pytest.approx({"text": 0.25, "t2i": 0.75})
    a = mix.sample(64, 2, 10, 0, 0)
    assert a == mix.sample(64, 2, 10, 0, 0)  # same (stage, step, micro, rank): same batch, e.g. after a resume
    assert a != mix.sample(64, 2, 10, 0, 1) and a != mix.sample(64, 2, 11, 0, 0)
    assert 0.5 < sum(ex["task"] == "t2i" for ex in a) / 64 < 0.95
    grouped = [mix.sample(8, 0, s, 0, 0, group_by_task=True) for s in range(20)]
    assert all(len({ex["task"] for ex in b}) == 1 for b in grouped)
    assert {b[0]["task"] for b in grouped} == {"text", "t2i"}


def test_malformed_examples_are_rejected_with_their_location():
    from mmdlm.training.mixture import check_example

    good = _examples()[0]
    check_example(good, "x")
    bad_role = dict(good, messages=[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "<image>"}])
    with pytest.raises(ValueError, match="data.sources\\[0\\] example 3: message 0"):
        check_example(bad_role, "data.sources[0] example 3")
    with pytest.raises(ValueError, match="placeholder"):
        check_example(dict(good, images=[]), "x")
    with pytest.raises(ValueError, match="last message"):
        check_example(dict(good, messages=good["messages"][:1]), "x")
    with pytest.raises(ValueError, match="'task'"):
        check_example({"task": "video"}, "x")


def test_a_stage_can_train_on_some_tasks_only():
    from mmdlm.training.mixture import LoadedSource, Mixture

    rows = [{"task": "understanding", "i": i} for i in range(3)] + [{"task": "t2i", "i": i} for i in range(3)]
    mixture = Mixture([LoadedSource("a", rows, 1.0)], seed=0)
    reading = mixture.restricted(["understanding"])
    assert mixture.restricted(None) is mixture and reading.task_shares() == {"understanding": 1.0}
    assert {ex["task"] for step in range(20) for ex in reading.sample(8, 0, step)} == {"understanding"}
    assert {ex["task"] for step in range(20) for ex in mixture.sample(8, 0, step)} == {"understanding", "t2i"}
    with pytest.raises(ValueError, match="select no data"):
        mixture.restricted(["text"])


def test_a_stage_can_weigh_the_sources_its_own_way():
    from mmdlm.training.mixture import LoadedSource, Mixture

    captions = [{"task": "understanding", "kind": "caption", "i": i} for i in range(4)]
    questions = [{"task": "understanding", "kind": "question", "i": i} for i in range(4)]
    drawing = [{"task": "t2i", "kind": "draw", "i": i} for i in range(2)] + [{"task": "understanding",
                                                                            "kind": "digit", "i": 0}]
    mixture = Mixture([LoadedSource("c", captions, 1.0), LoadedSource("q", questions, 1.0),
                       LoadedSource("d", drawing, 3.0)], seed=0)
    assert mixture.reweighted(None) is mixture
    questions_only = mixture.reweighted([0, 1.0, 0])
    assert questions_only.task_shares() == {"understanding": 1.0} and questions_only.sources is mixture.sources
    assert {ex["kind"] for step in range(20) for ex in questions_only.sample(8, 0, step)} == {"question"}
    assert sorted(ex["kind"] for ex in questions_only.drawn_examples()) == ["question"] * 4
    # a source's weight is shared by its tasks as in the recipe's mixture: 2/3 of source d's rows are drawings
    heavy = mixture.reweighted([1.0, 0.0, 6.0]).task_shares()
    assert heavy == pytest.approx({"understanding": (1.0 + 2.0) / 7.0, "t2i": 4.0 / 7.0})
    assert mixture.source_shares() == pytest.approx({"c": 0.2, "q": 0.2, "d": 0.6})
    # the stage's weights replace the sources' own (d's 3.0 does not multiply its 6.0)
    assert mixture.reweighted([1.0, 0.0, 6.0]).source_shares() == pytest.approx({"c": 1 / 7, "q": 0.0, "d": 6 / 7})
    reading = mixture.reweighted([1.0, 0.0, 6.0]).restricted(["understanding"])
    assert {ex["kind"] for step in range(30) for ex in reading.sample(8, 0, step)} == {"caption", "digit"}
    assert sorted(ex["kind"] for ex in reading.drawn_examples()) == ["caption"] * 4 + ["digit"]
    assert mixture.weights == pytest.approx(Mixture(mixture.sources, seed=0).weights)  # the original is untouched
    with pytest.raises(ValueError, match="select no data; the mixture draws \\['understanding'\\]"):
        questions_only.restricted(["t2i"])
    for bad in ([1.0, 1.0], [0, 0, 0], [1.0, -1.0, 1.0]):
        with pytest.raises(ValueError, match="one per data source"):
            mixture.reweighted(bad)


def test_a_source_weighted_0_and_added_last_leaves_every_draw_unchanged():
    """configs/shapes-tiny-questions.yaml's first stage was trained as a 4-source recipe; the recipe adds a fifth
    source that this stage weighs 0. Its batches must be the ones that run drew."""
    from mmdlm.training.mixture import LoadedSource, Mixture

    captions = [{"task": "understanding", "kind": "caption", "i": i} for i in range(5)]
    questions = [{"task": "understanding", "kind": "question", "i": i} for i in range(7)]
    digits = [{"task": "t2i", "kind": "digit", "i": i} for i in range(3)]
    scenes = [{"task": "t2i", "kind": "scene", "i": i} for i in range(4)]
    run = Mixture([LoadedSource("c", captions, 1.2), LoadedSource("q", questions, 4.8),
                   LoadedSource("d", digits, 0.4)], seed=0)
    recipe = Mixture([LoadedSource("c", captions, 1.2), LoadedSource("q", questions, 4.8),
                      LoadedSource("d", digits, 0.4), LoadedSource("s", scenes, 3.0)], seed=0).reweighted(
        [1.2, 4.8, 0.4, 0.0])
    for grouped in (False, True):
        for step in range(50):
            assert recipe.sample(16, 0, step, 0, 0, group_by_task=grouped) == run.sample(16, 0, step, 0, 0,
                                                                                         group_by_task=grouped)
    # ...while weighing it above 0 changes them
    drawn = recipe.reweighted([1.2, 4.8, 0.4, 0.1])
    assert any(drawn.sample(16, 0, step, 0, 0) != run.sample(16, 0, step, 0, 0) for step in range(50))
