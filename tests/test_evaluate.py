"""`mmdlm eval` bookkeeping: an oracle that answers, captions and draws from the ground truth scores 100% (so the
metrics can reach their targets), a deliberate error shows up in exactly its column, and drawing options reach
``generate_image``."""

import json
from types import SimpleNamespace

import pytest

from mmdlm.data.digits import DIGIT_QUESTION, DIGIT_WORDS, digit_caption, load_digit_images
from mmdlm.data.shapes import CAPTION_PROMPT, ShapesWorld
from mmdlm.eval.evaluate import EVAL_SEED, format_table, run_evaluation

N = 8


class OraclePipe:
    """Looks every answer up in the ground truth of the evaluation's own (seeded) data; ``wrong_qtype`` answers
    that question type wrongly, ``wrong_objects`` every question about a scene with that many objects,
    ``always_yes`` says "yes" to every existence question, ``confuse_positions`` answers a position question with
    another object's cell ("nowhere" in one-object scenes). Records the drawing options it was given and the number
    of objects of each scene a position question was asked about."""

    def __init__(self, wrong_qtype=None, wrong_objects=None, n=N, always_yes=False, confuse_positions=False):
        self.model = SimpleNamespace(config=SimpleNamespace(can_draw_images=True))
        self.answers, self.renders, self.drawing, self.sampling = {}, {}, [], []
        self.objects, self.position_asked = {}, []
        for split in ("test", "compositional"):
            for s in ShapesWorld(split, n, EVAL_SEED):
                key = s.image.tobytes()
                self.answers[key, CAPTION_PROMPT] = s.caption
                self.objects[key] = len(s.scene.shapes)
                for qa in s.qas:
                    wrong = qa.qtype == wrong_qtype or len(s.scene.shapes) == wrong_objects
                    self.answers[key, qa.question] = "wrong" if wrong else \
                        "yes" if always_yes and qa.qtype == "exist" else qa.answer
                    if confuse_positions and qa.qtype == "position":
                        others = [o.position for o in s.scene.shapes if o.position != qa.answer]
                        self.answers[key, qa.question] = others[0] if others else "nowhere"
                self.renders[s.caption] = s.image
        for img, label in load_digit_images("test"):
            self.answers[img.tobytes(), DIGIT_QUESTION] = DIGIT_WORDS[label]
            self.renders.setdefault(digit_caption(label), img)  # a real scan of each digit as its "drawing"

    def answer(self, images, questions, **sampling):
        self.sampling.append(sampling)
        questions = questions if isinstance(questions, list) else [questions] * len(images)
        self.position_asked += [self.objects[img.tobytes()] for img, q in zip(images, questions)
                                if q.startswith("where is")]
        return [self.answers[img.tobytes(), q] for img, q in zip(images, questions)]

    def caption(self, images, **sampling):
        return self.answer(images, CAPTION_PROMPT, **sampling)

    def generate_image(self, prompts, seed=None, **drawing):
        self.drawing.append(drawing)
        return [self.renders[p] for p in prompts]


def test_ground_truth_scores_full_marks_and_files_are_written(tmp_path):
    pipe = OraclePipe()
    results = run_evaluation(pipe, n=N, batch_size=3, drawing={"steps": 5, "guidance_scale": 0.0}, out_dir=tmp_path)
    for split in ("test", "compositional"):
        m = results["splits"][split]
        assert m["vqa_accuracy"] == 1.0 and set(m["vqa_by_type"].values()) == {1.0}
        assert m["caption_exact_match"] == 1.0 and set(m["caption_attribute_accuracy"].values()) == {1.0}
        assert m["t2i_all_correct"] >= 0.99
    digits = results["splits"]["digits"]
    assert digits["digit_accuracy"] == 1.0 and digits["drawn_digit_accuracy"] >= 0.75
    assert pipe.drawing and all(d == {"steps": 5, "guidance_scale": 0.0} for d in pipe.drawing)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["drawing"] == {"steps": 5, "guidance_scale": 0.0} and saved["splits"]["test"]["vqa_accuracy"] == 1.0
    assert (tmp_path / "captions-test.png").is_file() and (tmp_path / "drawn-digits.png").is_file()
    report = (tmp_path / "eval.md").read_text()
    assert "| test | 100.0% | 100.0% |" in report
    assert results["splits"]["test"]["t2i_by_objects"] and "asked for" in report  # drawings by number of objects
    assert "| digits | count" not in report  # the digits split draws digits, not scenes: no drawing breakdown


def test_a_wrong_question_type_shows_in_its_column_only():
    results = run_evaluation(OraclePipe(wrong_qtype="count"), splits=["test"], n=N, draw=False)
    m = results["splits"]["test"]
    assert m["vqa_by_type"]["count"] == 0.0
    assert all(v == 1.0 for k, v in m["vqa_by_type"].items() if k != "count")
    assert 0.0 < m["vqa_accuracy"] < 1.0 and m["caption_exact_match"] == 1.0
    assert "t2i_all_correct" not in m
    assert "count 0.0%" in format_table(results)


def test_questions_on_scenes_of_one_object_count_show_in_their_column_only():
    results = run_evaluation(OraclePipe(wrong_objects=2, n=24), splits=["test"], n=24, draw=False)
    by_objects = results["splits"]["test"]["vqa_by_objects"]
    assert set(by_objects) == {"1", "2", "3"} and by_objects["2"] == 0.0
    assert by_objects["1"] == by_objects["3"] == 1.0
    assert "2: 0.0%" in format_table(results)


def test_saying_yes_to_every_existence_question_shows_as_wrong_on_absent_pairs_only():
    results = run_evaluation(OraclePipe(always_yes=True, n=48), splits=["test"], n=48, draw=False)
    m = results["splits"]["test"]
    assert m["vqa_exist_by_answer"] == {"yes": 1.0, "no": 0.0}
    assert m["vqa_by_type"]["color"] == 1.0 and 0.0 < m["vqa_by_type"]["exist"] < 1.0
    assert "exist when the answer is yes 100.0%, no 0.0%" in format_table(results)


def test_position_answers_naming_another_objects_cell_are_told_apart():
    right = run_evaluation(OraclePipe(n=48), splits=["test"], n=48, draw=False)["splits"]["test"]
    assert right["vqa_position_answers"] == {"right": 1.0, "another object's cell": 0.0, "an empty cell": 0.0,
                                             "no position": 0.0}
    pipe = OraclePipe(confuse_positions=True, n=48)
    results = run_evaluation(pipe, splits=["test"], n=48, draw=False)
    where = results["splits"]["test"]["vqa_position_answers"]
    several = sum(k > 1 for k in pipe.position_asked) / len(pipe.position_asked)
    assert 0 < several < 1 and where["right"] == where["an empty cell"] == 0.0
    assert where["another object's cell"] == pytest.approx(several) and where["no position"] == pytest.approx(1 - several)
    assert "position answered with another object's cell" in format_table(results)
    chance = sum(1 / k for k in pipe.position_asked) / len(pipe.position_asked)  # one object per cell
    by_random_object = results["splits"]["test"]["vqa_random_object_chance"]
    assert by_random_object["position"] == pytest.approx(chance) and 1 / 3 < chance < 1
    assert by_random_object["color"] < 1 and by_random_object["shape"] < 1  # some scenes hold other colours / shapes
    assert "a random object's answer would score color" in format_table(results)
    one_attribute = results["splits"]["test"]["vqa_position_by_one_attribute"]
    assert set(one_attribute) == {"color", "shape"} and all(chance < v <= 1 for v in one_attribute.values())
    assert one_attribute["shape"] < 1  # some asked object shares its shape with another object of its scene
    assert "the cell of an object found by its color alone" in format_table(results)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown evaluation split"):
        run_evaluation(OraclePipe(), splits=["train"], n=N)


def test_cli_sampler_options_reach_the_pipeline(monkeypatch, capsys):
    import mmdlm
    from mmdlm.eval.evaluate import main

    pipe = OraclePipe()
    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: pipe)
    main(["--splits", "test", "--n", str(N), "--no-draw", "--steps", "8", "--block-length", "4", "--threshold", "0.5"])
    assert pipe.sampling and all(s == {"steps": 8, "block_length": 4, "threshold": 0.5} for s in pipe.sampling)
    assert "| test | 100.0% | 100.0% |" in capsys.readouterr().out


def test_cli_drawing_options_reach_generate_image(monkeypatch):
    import mmdlm
    from mmdlm.eval.evaluate import main

    pipe = OraclePipe()
    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: pipe)
    main(["--splits", "test", "--n", "2", "--image-steps", "6", "--guidance-scale", "1.5",
          "--image-temperature", "0.5", "--candidates", "4"])
    assert pipe.drawing and all(d == {"steps": 6, "guidance_scale": 1.5, "temperature": 0.5, "candidates": 4}
                                for d in pipe.drawing)
