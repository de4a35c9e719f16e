"""The model's reading score of a text on an image (ELBO of the text as the image's caption) and the drawing
candidates it picks from."""

from __future__ import annotations

import numpy as np
import pytest

import mmdlm.reading_score as reading_score
from mmdlm.data.shapes import ShapesWorld
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.reading_score import caption_log_likelihoods

PROMPTS = ["a large red circle at the center.", "a small blue square at the top."]


def test_the_trained_model_reads_a_caption_best_on_its_own_scene(shapes_tiny_reader):
    samples = [ShapesWorld("test", 5, seed=0)[i] for i in range(5)]
    images = [s.image for s in samples]
    for s in samples:  # the reranker's question: which image holds this text?
        scores = caption_log_likelihoods(shapes_tiny_reader.model, shapes_tiny_reader.processor, images,
                                         [s.caption] * len(images))
        assert int(np.argmax(scores)) == samples.index(s), (s.caption, scores)
        # nats: the right scene's caption is nearly certain, and no other scene comes close
        assert max(scores) > -5.0 and sorted(scores)[-2] < max(scores) - 10.0


def test_scores_repeat_with_the_seed_and_need_one_text_per_image(tiny_pipeline, example_images):
    model, processor = tiny_pipeline.model, tiny_pipeline.processor
    images = [str(p) for p in example_images[:2]]
    a = caption_log_likelihoods(model, processor, images, PROMPTS, seed=3)
    assert a == caption_log_likelihoods(model, processor, images, PROMPTS, seed=3)
    assert a != caption_log_likelihoods(model, processor, images, PROMPTS, seed=4)
    assert all(x < 0 for x in a)  # log-likelihoods of a random model
    with pytest.raises(ValueError, match="one text per image"):
        caption_log_likelihoods(model, processor, images, PROMPTS[:1])


def test_candidates_keep_the_drawing_with_the_best_score(tiny_pipeline, monkeypatch):
    seen = {}

    def fake_scores(model, processor, images, texts, **_):
        seen["texts"] = texts
        return [-float(i % 3 != 1) - i / 4 for i in range(len(images))]  # best: the 2nd candidate of each prompt

    monkeypatch.setattr(reading_score, "caption_log_likelihoods", fake_scores)
    picked = tiny_pipeline.generate_image(PROMPTS, seed=7, candidates=3)
    assert seen["texts"] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert tiny_pipeline.last_image_scores == [[-1.0, -0.25, -1.5], [-1.75, -1.0, -2.25]]
    assert tiny_pipeline.last_stats.batch_size == 2
    # the same drawings as one plain call on the repeated prompts with that seed
    drawn = tiny_pipeline.generate_image([p for p in PROMPTS for _ in range(3)], seed=7)
    assert [np.asarray(im).tolist() for im in picked] == [np.asarray(drawn[i]).tolist() for i in (1, 4)]
    assert not np.array_equal(np.asarray(drawn[0]), np.asarray(drawn[1]))  # the pick is not the first by chance
    one = tiny_pipeline.generate_image(PROMPTS[0], seed=7, candidates=1)
    assert tiny_pipeline.last_image_scores is None
    assert np.array_equal(np.asarray(one), np.asarray(tiny_pipeline.generate_image(PROMPTS[0], seed=7)))


def test_candidates_pick_by_the_real_score_on_the_tiny_model(tiny_pipeline):
    picked = tiny_pipeline.generate_image(PROMPTS[0], seed=2, candidates=3)
    (scores,) = tiny_pipeline.last_image_scores
    drawn = tiny_pipeline.generate_image([PROMPTS[0]] * 3, seed=2)
    best = int(np.argmax(scores))
    assert np.array_equal(np.asarray(picked), np.asarray(drawn[best]))
    again = caption_log_likelihoods(tiny_pipeline.model, tiny_pipeline.processor, drawn, [PROMPTS[0]] * 3)
    assert again == scores


def test_the_generation_config_sets_the_default_number_of_candidates(tiny_pipeline):
    import copy

    config = copy.deepcopy(tiny_pipeline.generation_config)
    config.image_candidates = 2
    pipe = MMDLMPipeline(tiny_pipeline.model, tiny_pipeline.processor, config)
    pipe.generate_image(PROMPTS, seed=0)
    assert [len(s) for s in pipe.last_image_scores] == [2, 2]
    pipe.generate_image(PROMPTS[0], seed=0, candidates=3)  # an explicit value wins
    assert [len(s) for s in pipe.last_image_scores] == [3]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_candidates_say_what_to_pass(tiny_pipeline, bad):
    with pytest.raises(ValueError, match="candidates must be a whole number >= 1"):
        tiny_pipeline.generate_image(PROMPTS[0], candidates=bad)


def test_candidates_need_a_model_that_reads(tiny_pipeline):
    from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration

    cfg = tiny_pipeline.model.config.to_dict()
    cfg.pop("model_type", None)
    cfg.update(vision_config=None)
    pipe = MMDLMPipeline(MMDLMForConditionalGeneration(MMDLMConfig(**cfg)), tiny_pipeline.processor,
                         tiny_pipeline.generation_config)
    assert pipe.can_draw_images and not pipe.can_understand_images
    with pytest.raises(ValueError, match="cannot read images"):
        pipe.generate_image(PROMPTS[0], candidates=2)
    assert pipe.generate_image(PROMPTS[0], candidates=1, seed=0).size == tiny_pipeline.generate_image(PROMPTS[0]).size
